"""Validation and per-channel standardisation shared by every source (train statistics)."""

from __future__ import annotations

import numpy as np

from fu_jax import containers
from fu_jax.data._errors import DataError


def _as_nhwc(x: np.ndarray, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise DataError(f"{what}: expected images [n, H, W] or [n, H, W, C], got shape {x.shape}")
  if x.shape[0] == 0:
    raise DataError(f"{what}: contains no examples (shape {x.shape})")
  if not (
    np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_
  ):
    raise DataError(f"{what}: expected integer or float images, got dtype {x.dtype}")
  return x


def _unit_scale(x: np.ndarray, top: int | None = None) -> np.ndarray:
  """A new float32 array, in [0, 1] for unsigned integer images (x * 1/top, top = the dtype's
  max unless given, e.g. 16 for digits).

  Float images keep their values. The per-channel standardisation that follows removes any
  constant scale, so this only keeps intermediate values small and makes the documented
  [0, 1] step explicit.
  """
  out = x.astype(np.float32)  # always a copy: later steps work in place
  if np.issubdtype(x.dtype, np.unsignedinteger):
    out *= np.float32(1.0 / (top or np.iinfo(x.dtype).max))
  return out


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std over (n, H, W), accumulated in float64 chunk by chunk."""
  total = np.zeros(x.shape[-1], np.float64)
  total_sq = np.zeros(x.shape[-1], np.float64)
  for i in range(0, x.shape[0], chunk):
    block = x[i : i + chunk].astype(np.float64)
    total += block.sum(axis=(0, 1, 2))
    total_sq += np.square(block).sum(axis=(0, 1, 2))
  count = x.shape[0] * x.shape[1] * x.shape[2]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  std = np.where(std > 1e-8, std, 1.0)  # a constant channel is centred, not blown up
  return mean, std


def _check_finite(x: np.ndarray, what: str):
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    raise DataError(f"{what}: images contain NaN or Inf values")


def _standardise_inplace(x_train: np.ndarray, *others: np.ndarray):
  """Standardises x_train and `others` in place with x_train's per-channel statistics."""
  mean, std = _channel_stats(x_train)
  for x in (x_train,) + others:
    x -= mean.astype(np.float32)
    x /= std.astype(np.float32)


def standardise(
  x_train: np.ndarray, x_test: np.ndarray, name: str = "images"
) -> tuple[np.ndarray, np.ndarray]:
  """(x - mean_c) / std_c for both splits (new float32 arrays) with the TRAIN split's
  per-channel mean and std over (n, H, W); a constant channel gets std 1."""
  x_train = np.array(x_train, np.float32)
  x_test = np.array(x_test, np.float32)
  _check_finite(x_train, name)
  _check_finite(x_test, name)
  _standardise_inplace(x_train, x_test)
  return x_train, x_test


def check_labels(y, what: str, num_classes: int | None = None) -> np.ndarray:
  """int32 labels, 1-D, integral, >= 0 and (if given) < num_classes."""
  y = np.asarray(y)
  if y.ndim != 1:
    raise DataError(f"{what}: expected labels of shape [n], got shape {y.shape}")
  if np.issubdtype(y.dtype, np.floating):
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
      raise DataError(f"{what}: float labels must be whole numbers")
  elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
    raise DataError(f"{what}: expected integer labels, got dtype {y.dtype}")
  if y.size and y.min() < 0:
    raise DataError(f"{what}: labels must be >= 0, found {y.min()}")
  if y.size and y.max() >= np.iinfo(np.int32).max:
    raise DataError(f"{what}: label {y.max()} does not fit int32")
  if num_classes is not None and y.size and y.max() >= num_classes:
    raise DataError(f"{what}: labels must be < num_classes={num_classes}, found {y.max()}")
  return y.astype(np.int32)


def capped_subset(n: int, cap: int | None, rng: np.random.Generator, what: str) -> np.ndarray:
  """Sorted indices of a seeded random subset of size min(n, cap) (all of them if cap=None)."""
  if cap is None:
    return np.arange(n)
  if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
    raise ValueError(f"{what} must be a positive int or None, got {cap!r}")
  if cap >= n:
    return np.arange(n)
  return np.sort(rng.choice(n, size=int(cap), replace=False))


def finish_dataset(
  name,
  x_train,
  y_train,
  x_test,
  y_test,
  *,
  num_classes=None,
  seed=0,
  max_test=None,
  scaled=False,
  top=None,
) -> containers.Dataset:
  """Validate, optionally subsample, scale, standardise and pack a Dataset.

  uint8 training images are also kept as codes with the lookup table that normalises them
  (`Dataset.train_codes`, `train_lut`), computed by the same operations as x_train.
  """
  x_train = _as_nhwc(x_train, f"{name} train images")
  x_test = _as_nhwc(x_test, f"{name} test images")
  y_train = check_labels(y_train, f"{name} train labels", num_classes)
  y_test = check_labels(y_test, f"{name} test labels", num_classes)
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    if x.shape[0] != y.shape[0]:
      raise DataError(f"{name}: {split} has {x.shape[0]} images but {y.shape[0]} labels")
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(
      f"{name}: train images {x_train.shape[1:]} and test images "
      f"{x_test.shape[1:]} must have the same [H, W, C]"
    )
  rng = np.random.default_rng(seed)
  keep = capped_subset(x_test.shape[0], max_test, rng, "max_test")
  if keep.size < x_test.shape[0]:
    x_test, y_test = x_test[keep], y_test[keep]
  if num_classes is None:
    num_classes = int(max(y_train.max(), y_test.max())) + 1
  _check_finite(x_train, f"{name} train")
  _check_finite(x_test, f"{name} test")
  codes = lut = None
  if scaled:  # already float in [0, 1]; copy so the caller's arrays are never modified
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
  else:
    if x_train.dtype == np.uint8:
      codes = x_train
      values = np.arange(256, dtype=np.uint8)[:, None, None, None]
      lut = _unit_scale(np.broadcast_to(values, (256, 1, 1, x_train.shape[-1])), top)
    x_train, x_test = _unit_scale(x_train, top), _unit_scale(x_test, top)
  _standardise_inplace(x_train, x_test, *(() if lut is None else (lut,)))
  if lut is not None:
    lut = lut.reshape(256, -1)
  return containers.Dataset(
    x_train, y_train, x_test, y_test, int(num_classes), name, train_codes=codes, train_lut=lut
  )


def check_int(value, name: str, low: int, high: int | None = None) -> int:
  """value as an int in [low, high] (not a bool); ValueError naming `name` otherwise."""
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < low or (high is not None and value > high):
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")
  return int(value)
