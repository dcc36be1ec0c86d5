"""The pytree helpers optax.tree lacks (pure, jittable).

Sums, differences, scaling, zeros, inner products and norms come from `optax.tree` (add, sub,
scale, zeros_like, vdot, norm, size); what is here has no optax counterpart: a weighted mean over
a stacked leading axis that is safe when every weight is 0, the byte count from shapes, and
an all-finite check.
"""

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["tree_weighted_mean", "tree_num_bytes", "tree_all_finite"]


def tree_weighted_mean(stacked, weights):
  """Weighted mean over the leading axis of every leaf.

  sum_k w_k x_k / sum_k w_k; returns zeros when all weights are zero (a round in
  which every sampled client was forgotten changes nothing).
  """
  w = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(w)
  safe = jnp.where(total > 0, total, 1.0)

  def mean(x):
    return jnp.tensordot(w, x.astype(jnp.float32), axes=(0, 0)).astype(x.dtype) / safe

  return jax.tree.map(mean, stacked)


def tree_num_bytes(a) -> int:
  """Bytes a pytree occupies (what sending it costs), computed from shapes only."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(a)))


def tree_all_finite(a):
  """Scalar bool: every element of every leaf is finite."""
  leaves = jax.tree.leaves(a)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
