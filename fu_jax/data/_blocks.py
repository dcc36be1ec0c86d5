"""Client blocks: the partition as padded [clients, max_n] index or image blocks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fu_jax import containers
from fu_jax.data._normalise import check_int


def index_clients(
  y, parts: Sequence[np.ndarray], *, pad_to: int | None = None
) -> containers.ClientData:
  """Clients as [clients, max_n] index blocks into the training set, without images.

  max_n = pad_to or the largest client. index[i, j] = parts[i][j] (order kept), -1 past
  count[i]; y, valid and count as in `stack_clients`; x is None: the images stay in one
  copy (`fu_jax.images.ClientImages(index, table)` takes x's place). Vectorised: cost
  O(examples), not a Python loop over clients' rows.
  """
  y = np.asarray(y)
  if len(parts) == 0:
    raise ValueError("parts must hold at least one client")
  parts = [np.asarray(p) for p in parts]
  for i, p in enumerate(parts):
    if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
      raise ValueError(
        f"parts[{i}] must be a 1-D integer index array, got shape {p.shape} dtype {p.dtype}"
      )
    if p.size and (p.min() < 0 or p.max() >= y.shape[0]):
      raise ValueError(f"parts[{i}] has indices outside [0, {y.shape[0]})")
  count = np.array([p.size for p in parts], np.int32)
  max_n = int(count.max())
  if pad_to is not None:
    pad_to = check_int(pad_to, "pad_to", 0)
    if pad_to < max_n:
      raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({max_n})")
    max_n = pad_to
  index = np.full((len(parts), max_n), -1, np.int32)
  rows = np.repeat(np.arange(len(parts)), count)
  cols = np.arange(rows.size) - np.repeat(np.cumsum(count) - count, count)
  index[rows, cols] = np.concatenate(parts) if rows.size else []
  valid = index >= 0
  ys = np.where(valid, y[np.where(valid, index, 0)], 0).astype(np.int32)
  return containers.ClientData(x=None, y=ys, valid=valid, count=count, index=index)


def stack_clients(
  x, y, parts: Sequence[np.ndarray], *, pad_to: int | None = None
) -> containers.ClientData:
  """Gathers each client's examples into [clients, max_n, ...] numpy blocks.

  max_n = pad_to or the largest client. Row j of client i is x[parts[i][j]] (order kept);
  rows past count[i] are zeros with valid=False, y=0 and index=-1. The padded layout:
  memory clients x max_n images (experiments use `index_clients` + `fu_jax.images`).
  """
  x, y = np.asarray(x), np.asarray(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
  clients = index_clients(y, parts, pad_to=pad_to)
  valid = clients.valid
  safe = np.where(valid, clients.index, 0)
  xs = np.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x[safe], 0).astype(x.dtype)
  return clients._replace(x=xs)
