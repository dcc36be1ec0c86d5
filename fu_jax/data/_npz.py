"""The npz:<file> source: arrays x, y, x_test, y_test."""

from __future__ import annotations

import os

import numpy as np

from fu_jax import containers
from fu_jax.data._errors import DataError, DataNotFoundError
from fu_jax.data._normalise import finish_dataset


def load_npz(path: str, **kwargs) -> containers.Dataset:
  """The arrays x, y, x_test, y_test of the .npz at `path` as a Dataset."""
  keys = ("x", "y", "x_test", "y_test")
  if not os.path.isfile(path):
    raise DataNotFoundError(
      f"{path}: file not found (source npz:<file> with arrays {', '.join(keys)})"
    )
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in keys if k not in f.files]
      if missing:
        raise DataError(
          f"{path}: missing arrays {missing}; expected {list(keys)}, found {sorted(f.files)}"
        )
      arrays = {k: f[k] for k in keys}
  except DataError:
    raise
  except Exception as e:  # zipfile.BadZipFile, pickled objects, truncated members, ...
    raise DataError(f"{path}: not a readable .npz with arrays {list(keys)} ({e!r})") from e
  return finish_dataset(
    f"npz:{path}", arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], **kwargs
  )
