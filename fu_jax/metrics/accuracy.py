"""Batched prediction, per-example loss and (per-class / retain / forget) accuracy.

Host-side metrics: inputs are numpy (or jax) arrays, outputs are numpy arrays or plain python
floats. `apply_fn` follows the fu_jax model convention, `apply_fn(params, x) -> logits
[B, K]` (e.g. `fu_jax.models.logits_fn(module)`), and must have no batch-dependent behaviour (no
BatchNorm), so zero padding rows never change the other rows' logits.

Protocol (docs/design.md §6): test accuracy; retain accuracy = test samples of the kept classes;
forget accuracy = test samples of the forgotten classes; per-class accuracy.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np

ApplyFn = Callable  # apply_fn(params, x) -> logits [B, K]


@functools.partial(jax.jit, static_argnums=0)
def _forward(apply_fn, params, x):
  return apply_fn(params, x)


def _bucket(n: int, batch_size: int) -> int:
  """Padded batch size for n rows: batch_size, or the next power of two when n is smaller.

  Padding a 10-example set to 1024 rows would waste a full batch of compute; rounding up to
  a power of two bounds the number of compiled shapes to log2(batch_size) + 1 instead.
  """
  if n >= batch_size:
    return batch_size
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def predict_logits(apply_fn: ApplyFn, params, x, *, batch_size: int = 1024) -> np.ndarray:
  """Logits of `x` in jitted batches: float32 [n, K].

  Every batch has the same padded shape (the last partial batch is zero-padded and its
  padding rows dropped), so a data set of any size compiles at most log2(batch_size) + 1
  shapes per model. Batches are dispatched asynchronously and gathered at the end.
  Keep `apply_fn` equal across calls (e.g. `models.logits_fn(module)`), not a fresh lambda:
  it is the jit cache key.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  x = np.asarray(x)
  n = x.shape[0]
  if n == 0:
    raise ValueError("predict_logits got an empty x (0 rows)")
  bs = _bucket(n, batch_size)
  outs = []
  for start in range(0, n, bs):
    batch = x[start : start + bs]
    m = batch.shape[0]
    if m < bs:
      pad = np.zeros((bs - m,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    outs.append((_forward(apply_fn, params, batch), m))
  return np.concatenate([np.asarray(o, np.float32)[:m] for o, m in outs])


def log_softmax64(logits) -> np.ndarray:
  """Host float64 log-softmax [n, K], precise for confident rows.

  log p_j = x_j - M - log1p(sum_{i != argmax} exp(x_i - M)), M = max_i x_i. log1p keeps the
  loss of a memorised sample at, e.g., 1e-20 where float32 (and log(sum exp)) gives exactly
  0; membership attacks rank those tails.
  """
  x = np.asarray(logits, np.float64)
  if x.ndim != 2:
    raise ValueError(f"logits must be [n, K], got shape {x.shape}")
  top = np.argmax(x, axis=-1)[:, None]
  m = np.take_along_axis(x, top, axis=-1)
  e = np.exp(x - m)
  np.put_along_axis(e, top, 0.0, axis=-1)
  return x - m - np.log1p(e.sum(-1, keepdims=True))


def loss_from_logits(logits, y) -> np.ndarray:
  """Per-example cross-entropy -log softmax(logits)_y: float64 [n].

  The same quantity as fu_jax.losses.cross_entropy, computed on the host in float64 (see
  `log_softmax64`) so that tiny losses stay distinguishable.
  """
  y = _labels(y)
  return -np.take_along_axis(log_softmax64(logits), y[:, None], axis=-1)[:, 0]


def per_example_loss(apply_fn: ApplyFn, params, x, y, *, batch_size: int = 1024) -> np.ndarray:
  """Per-example cross-entropy of the model on (x, y): float64 [n]."""
  return loss_from_logits(predict_logits(apply_fn, params, x, batch_size=batch_size), y)


def _preds(logits_or_preds) -> np.ndarray:
  a = np.asarray(logits_or_preds)
  if a.ndim == 2:
    return np.argmax(a, axis=-1)
  if a.ndim == 1:
    return a.astype(np.int64)
  raise ValueError(f"expected logits [n, K] or predictions [n], got shape {a.shape}")


def _labels(y, num_classes: int | None = None) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be an int vector [n], got {y.dtype} {y.shape}")
  if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  return y.astype(np.int64)


def accuracy(logits_or_preds, y) -> float:
  """Fraction of argmax(logits) (or predictions) equal to y; nan when there are no rows."""
  p, y = _preds(logits_or_preds), _labels(y)
  if p.shape != y.shape:
    raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in length")
  return float(np.mean(p == y)) if y.size else float("nan")


def per_class_accuracy(logits_or_preds, y, num_classes: int) -> np.ndarray:
  """Accuracy on the rows of each class: float64 [num_classes], nan for absent classes."""
  p, y = _preds(logits_or_preds), _labels(y, num_classes)
  if p.shape != y.shape:
    raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in length")
  total = np.bincount(y, minlength=num_classes).astype(np.float64)
  hits = np.bincount(y, weights=(p == y).astype(np.float64), minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def _check_classes(classes: Sequence[int], num_classes: int) -> np.ndarray:
  c = np.asarray(list(classes), np.int64).reshape(-1)
  bad = [int(v) for v in c if not 0 <= v < num_classes]
  if bad:
    raise ValueError(f"forget_classes {bad} outside [0, {num_classes})")
  return c


def evaluate(
  apply_fn: ApplyFn,
  params,
  x_test,
  y_test,
  num_classes: int,
  forget_classes: Sequence[int] = (),
  *,
  batch_size: int = 1024,
) -> dict:
  """Test / retain / forget accuracy, per-class accuracy and test loss.

  retain_acc is over the test rows whose class is not in `forget_classes`, forget_acc over
  those whose class is; either is nan when it has no rows (forget_acc always, for an empty
  `forget_classes`). All values are plain python floats (per_class_acc a list of floats with
  nan for classes absent from the test set). Note json.dumps writes nan as `NaN`.
  """
  forget = _check_classes(forget_classes, num_classes)
  y = _labels(y_test, num_classes)
  logits = predict_logits(apply_fn, params, x_test, batch_size=batch_size)
  if logits.shape != (y.shape[0], num_classes):
    raise ValueError(f"logits shape {logits.shape} != ({y.shape[0]}, {num_classes})")
  is_forget = np.isin(y, forget)
  return {
    "test_acc": accuracy(logits, y),
    "retain_acc": accuracy(logits[~is_forget], y[~is_forget]),
    "forget_acc": accuracy(logits[is_forget], y[is_forget]),
    "per_class_acc": [float(a) for a in per_class_accuracy(logits, y, num_classes)],
    "test_loss": float(np.mean(loss_from_logits(logits, y))),
  }
