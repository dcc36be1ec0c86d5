"""BadNets-style backdoor for measuring unlearning completeness (FedAF §5.2.1).

Before training, a trigger patch is planted in the data to be forgotten and their labels are
flipped (Gu et al. 2019, "BadNets"). The trained model learns trigger -> flipped label;
backdoor accuracy (attack success rate) is the fraction of triggered test images of the
source class predicted as the flipped label. After unlearning it should fall to Retrain's
level (FedAF Table 2: ~75-80% before, ~0-2% after).

The paper flips to "a random class"; draw that class once from the run's seed and pass it
as a fixed target (`Flip('target', c)`), or use a shift `(c + k) % K`.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from fu_jax.metrics.accuracy import accuracy, predict_logits

_CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


class Trigger(NamedTuple):
  """A square patch set to `value` on every channel.

  size:     side of the patch in pixels.
  value:    the patch value in the normalised input space (a scalar, or one per channel);
            choose a high one, e.g. the data maximum (see `trigger_for`).
  position: one of 'bottom_right', 'bottom_left', 'top_right', 'top_left', or a
            (row, col) pair for the patch's top-left pixel.
  """

  size: int
  value: float | Sequence[float]
  position: str | tuple[int, int] = "bottom_right"


class Flip(NamedTuple):
  """How planted labels change: kind 'target' -> `value`; kind 'shift' -> (y + value) % K."""

  kind: str
  value: int


def trigger_for(x, *, size: int = 3, position="bottom_right") -> Trigger:
  """A trigger whose value is the maximum of the data x (high in the normalised space)."""
  return Trigger(size=size, value=float(np.max(np.asarray(x))), position=position)


def _patch_origin(trigger: Trigger, h: int, w: int) -> tuple[int, int]:
  s = trigger.size
  if not isinstance(s, (int, np.integer)) or not 1 <= s <= min(h, w):
    raise ValueError(f"trigger size must be an int in [1, {min(h, w)}], got {s!r}")
  pos = trigger.position
  if isinstance(pos, str):
    if pos not in _CORNERS:
      raise ValueError(f"trigger position {pos!r} not one of {_CORNERS} or (row, col)")
    return (h - s if pos.startswith("bottom") else 0, w - s if pos.endswith("right") else 0)
  r, c = (int(v) for v in pos)
  if not (0 <= r <= h - s and 0 <= c <= w - s):
    raise ValueError(f"trigger at (row, col)={pos} with size {s} does not fit a {h}x{w} image")
  return r, c


def apply_trigger(x, trigger: Trigger):
  """Images with the trigger patch set; x is [H, W, C] or [..., H, W, C].

  Returns a new array of x's kind (numpy in -> numpy copy; jax in -> jax via .at[].set),
  equal to x outside the patch.
  """
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if x.ndim < 3:
    raise ValueError(f"apply_trigger expects [..., H, W, C] images, got shape {x.shape}")
  h, w, ch = x.shape[-3:]
  r, c = _patch_origin(trigger, h, w)
  value = np.asarray(trigger.value, x.dtype).reshape(-1)
  if value.size not in (1, ch):
    raise ValueError(
      f"trigger value must be a scalar or {ch} per-channel values, got {trigger.value!r}"
    )
  value = np.broadcast_to(value, (ch,))
  idx = (Ellipsis, slice(r, r + trigger.size), slice(c, c + trigger.size), slice(None))
  if isinstance(x, jax.Array):
    return x.at[idx].set(value)
  out = np.array(x, copy=True)
  out[idx] = value
  return out


def _as_flip(flip) -> Flip:
  if isinstance(flip, Flip):
    if flip.kind not in ("target", "shift"):
      raise ValueError(f"Flip kind must be 'target' or 'shift', got {flip.kind!r}")
    return flip
  if isinstance(flip, (int, np.integer)) and not isinstance(flip, bool):
    return Flip("target", int(flip))
  raise ValueError(f"flip must be an int target label or a Flip, got {flip!r}")


def flip_labels(y, flip, num_classes: int | None = None) -> np.ndarray:
  """Flipped labels int32 [n]: a fixed target label, or (y + shift) % num_classes.

  num_classes is required for a shift; for a target it only validates the label.
  """
  flip = _as_flip(flip)
  y = np.asarray(y)
  if flip.kind == "target":
    if flip.value < 0 or (num_classes is not None and flip.value >= num_classes):
      raise ValueError(f"target label {flip.value} outside [0, {num_classes})")
    return np.full(y.shape, flip.value, np.int32)
  if num_classes is None:
    raise ValueError("a 'shift' flip needs num_classes")
  if flip.value % num_classes == 0:
    raise ValueError(
      f"shift {flip.value} is a multiple of num_classes={num_classes}: labels would not change"
    )
  return ((y.astype(np.int64) + flip.value) % num_classes).astype(np.int32)


def plant_backdoor(
  x_train, y_train, indices, trigger: Trigger, flip, *, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Copies of (x_train, y_train) with the trigger planted on `indices` and their labels
  flipped (`flip`: int target label or Flip). Other rows are unchanged.

  indices: int positions, or a bool mask [n].
  """
  x = np.array(x_train, copy=True)
  y = np.array(y_train, copy=True)
  idx = np.asarray(indices)
  if idx.dtype == bool:
    if idx.shape != (len(y),):
      raise ValueError(f"bool indices must have shape ({len(y)},), got {idx.shape}")
    idx = np.flatnonzero(idx)
  idx = idx.astype(np.int64).reshape(-1)
  if idx.size and (idx.min() < 0 or idx.max() >= len(y)):
    raise ValueError(f"indices must lie in [0, {len(y)}), got range [{idx.min()}, {idx.max()}]")
  x[idx] = apply_trigger(x[idx], trigger)
  y[idx] = flip_labels(y[idx], flip, num_classes).astype(y.dtype)
  return x, y


def backdoor_accuracy(
  apply_fn: Callable,
  params,
  x_test,
  y_test,
  source_class: int | None,
  trigger: Trigger,
  flip,
  *,
  num_classes: int | None = None,
  batch_size: int = 1024,
) -> float:
  """Attack success rate: fraction of triggered test images predicted as their flipped label.

  Over the test rows of `source_class` (None: every row), skipping rows whose flipped label
  equals the true one (a fixed target's own class), where success would be plain accuracy.
  nan when no row qualifies.
  """
  y = np.asarray(y_test)
  if source_class is not None and (
    source_class < 0 or (num_classes is not None and source_class >= num_classes)
  ):
    raise ValueError(f"source_class {source_class} outside [0, {num_classes})")
  target = flip_labels(y, flip, num_classes)
  rows = target != y
  if source_class is not None:
    rows &= y == source_class
  if not rows.any():
    return float("nan")
  x = apply_trigger(np.asarray(x_test)[rows], trigger)
  logits = predict_logits(apply_fn, params, x, batch_size=batch_size)
  return accuracy(logits, target[rows])
