"""Per-client epoch order and mini-batches over padded client blocks (pure, jitted)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fu_jax import images
from fu_jax.fl._programs import Batch


def epoch_order(key, valid):
  """Permutation of positions with valid examples first, in a random order.

  Each position's sort key comes from fold_in(key, position), so the order of the valid
  examples is the same however far the client is padded.
  """
  n = valid.shape[0]
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(n))
  return jnp.argsort(jnp.where(valid, u, 2.0 + jnp.arange(n) / n))


def take_batch(data, valid, order, step, batch_size):
  """Batch `step` of an epoch ordered by `order`; rows past the end are masked out.

  data may hold `images.ClientImages` (a client's index row into the one copy of the
  training images): the batch's index entries are selected first and only those images
  gathered (and normalised, by table lookup) here, inside the jitted step.
  """
  n = valid.shape[0]
  pos = step * batch_size + jnp.arange(batch_size)
  idx = order[jnp.minimum(pos, n - 1)]
  in_range = pos < n
  x, y = images.materialize(jax.tree.map(lambda a: jnp.take(a, idx, axis=0), (data[0], data[1])))
  return Batch(x, y, jnp.take(valid, idx) & in_range)


def guarded_step(step_fn, batch_size, state, data, valid, order, step, key):
  batch = take_batch(data, valid, order, step, batch_size)
  new_state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
  nonempty = jnp.any(batch.mask)
  state = jax.tree.map(lambda n, o: jnp.where(nonempty, n, o), new_state, state)
  n = jnp.sum(batch.mask).astype(jnp.float32)
  return state, jax.tree.map(lambda m: m * n, metrics), n


def epoch_start(key, epoch, valid):
  """(the epoch's key fold_in(key, epoch), its example order epoch_order(that key, valid))."""
  ek = jax.random.fold_in(key, epoch)
  return ek, epoch_order(ek, valid)


def steps_per_epoch(max_n: int, batch_size: int) -> int:
  return max(1, math.ceil(max_n / batch_size))
