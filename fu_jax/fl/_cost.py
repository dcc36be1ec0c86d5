"""Communication and work of a round, the same rule for every method."""

from __future__ import annotations

import numpy as np


def round_cost(
  counts,
  weights,
  *,
  model_bytes: int,
  epochs: int,
  upload_bytes: int | None = None,
  download_bytes: int | None = None,
) -> dict:
  """Communication and work of one round, the same rule for every method.

  A sampled client takes part when it has rows to train on (counts > 0) and its update is
  aggregated (weights > 0): it downloads the current model and uploads its result. A
  client with nothing to train on does neither. The model broadcast after a method's last
  round is not counted (FedAvg's training and retrain do not count theirs either), so a
  method's first round downloads the model it starts from.

  counts, weights: [k] per sampled (or target) client; upload_bytes / download_bytes
  default to model_bytes (e.g. a masked update uploads only its packed entries);
  examples = rows trained on * epochs. Returns {'bytes_up', 'bytes_down', 'examples'}.
  """
  counts = np.asarray(counts)
  part = (counts > 0) & (np.asarray(weights) > 0)
  n = int(part.sum())
  up = model_bytes if upload_bytes is None else upload_bytes
  down = model_bytes if download_bytes is None else download_bytes
  return {
    "bytes_up": n * int(up),
    "bytes_down": n * int(down),
    "examples": int(counts[part].sum()) * int(epochs),
  }
