"""Per-example losses and masked means shared by training and unlearning.

Padding rows (valid=False) must never change a result, so every mean here is a masked
mean: sum(mask * v) / max(sum(mask), 1).
"""

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "masked_mean", "masked_ce", "correct"]


def cross_entropy(logits, labels):
  """Per-example cross-entropy.

  labels: int [B] class indices, or float [B, K] probability vectors (soft labels).
  Returns float [B].
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if labels.ndim == logits.ndim:
    return -jnp.sum(labels * logp, axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def masked_mean(values, mask):
  """sum(mask * values) / max(sum(mask), 1): 0 when no row is valid."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_ce(logits, labels, mask):
  """Mean cross-entropy over the valid rows (int or soft labels, see cross_entropy)."""
  return masked_mean(cross_entropy(logits, labels), mask)


def correct(logits, labels):
  """float [B]: 1 where argmax(logits) == label."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
