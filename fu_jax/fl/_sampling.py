"""Which clients train in a round: deterministic weighted sampling without replacement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax.fl._keys import STREAM_SAMPLE, fits, stream_key


def sample_clients(seed: int, round_idx: int, weights, num_sampled: int):
  """Clients for a round, deterministic in (seed, round).

  Gumbel top-k over clients with weight > 0 (sampling without replacement); the result has
  a fixed length `num_sampled` so removing a client never changes a shape. Returns
  (indices [num_sampled] sorted, active [num_sampled] bool): when fewer clients have
  weight > 0 than are asked for, the extra slots are inactive.
  """
  if (
    fits(seed, np.int32) and fits(round_idx, np.uint32) and not isinstance(weights, jax.core.Tracer)
  ):
    # One jitted program per (number of clients, num_sampled), not one per primitive.
    return _sample_clients_jit(
      np.int32(seed), np.uint32(round_idx), np.asarray(weights, np.float32), num_sampled
    )
  return sample_clients_traced(seed, round_idx, weights, num_sampled)


def sample_clients_traced(seed, round_idx, weights, num_sampled):
  """`sample_clients` traceable (jit): the Gumbel top-k itself."""
  weights = jnp.asarray(weights, jnp.float32)
  key = stream_key(seed, STREAM_SAMPLE, round_idx)
  g = jax.random.gumbel(key, weights.shape)
  score = jnp.where(weights > 0, g, -jnp.inf)
  _, idx = jax.lax.top_k(score, num_sampled)
  active = jnp.take(weights, idx) > 0
  order = jnp.argsort(idx)
  return idx[order], active[order]


_sample_clients_jit = jax.jit(sample_clients_traced, static_argnums=3)


def num_sampled_clients(clients_per_round, num_clients: int) -> int:
  """A fraction in (0, 1] of num_clients, or a whole count in [1, num_clients]."""
  v = clients_per_round
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    if 0 < v <= 1 and isinstance(v, float):
      return max(1, round(v * num_clients))
    if float(v).is_integer() and 1 <= v <= num_clients:
      return int(v)
  raise ValueError(
    f"clients_per_round={v!r}: allowed a fraction in (0, 1] or a whole count in [1, {num_clients}]"
  )
