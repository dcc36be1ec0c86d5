"""Shared containers passed between data, fl, methods and metrics.

All are NamedTuples so they are pytrees: they pass through jit/vmap unchanged.
"""

from typing import Any, NamedTuple

import numpy as np

Params = Any  # a Flax parameter pytree: {'params': ...} is never used, only the inner dict


class Dataset(NamedTuple):
  """A loaded data set, already normalised.

  x_*: float32 [n, H, W, C] (NHWC, per-channel standardised with train statistics).
  y_*: int32 [n], values in [0, num_classes).
  train_codes, train_lut: for uint8 sources, the training images as loaded (uint8
    [n, H, W, C]) and the lookup table float32 [256, C] that normalises them:
    train_lut[train_codes[..., c], c] == x_train[..., c] exactly. None otherwise.
    `fu_jax.images` stores these (4x smaller) as the one device copy of the training set.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str
  train_codes: np.ndarray | None = None
  train_lut: np.ndarray | None = None


class ClientData(NamedTuple):
  """Clients stacked into padded blocks with a leading client axis.

  x:     float32 [clients, max_n, H, W, C]: a padded image block (`data.stack_clients`), or
         `fu_jax.images.ClientImages`, the same index block over one copy of the training
         images (experiments; it indexes and converts like the block, see that module)
  y:     int32   [clients, max_n]
  valid: bool    [clients, max_n]  True where a real example sits
  count: int32   [clients]         number of valid examples (= valid.sum(1))
  index: int32   [clients, max_n]  position in Dataset.x_train, -1 on padding

  Padding rows are zeros with valid=False; every consumer masks by `valid`, so
  padding never changes a result. Forgetting samples is `valid & ~forget`, never a
  new shape.
  """

  x: Any
  y: Any
  valid: Any
  count: Any
  index: Any
