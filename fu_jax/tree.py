"""Small pytree helpers used across fu_jax (pure, jittable)."""
import jax
import jax.numpy as jnp
import numpy as np


def tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a, b):
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(a, s):
  return jax.tree.map(lambda x: x * s, a)


def tree_zeros_like(a):
  return jax.tree.map(jnp.zeros_like, a)


def tree_vdot(a, b):
  """sum_i <a_i, b_i> over all leaves."""
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_sq_norm(a):
  return tree_vdot(a, a)


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


def tree_num_params(a) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(a)))


def tree_all_finite(a):
  """Scalar bool: every element of every leaf is finite."""
  leaves = jax.tree.leaves(a)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
