"""PRNG key streams: every key of a run derived from (seed, stream, *ids) by fold_in."""

from __future__ import annotations

import jax
import numpy as np

# Streams keep independent randomness apart: key(seed) -> fold_in(stream) -> fold_in(...).
STREAM_INIT, STREAM_SAMPLE, STREAM_CLIENT, STREAM_UNLEARN, STREAM_EVAL = range(5)
STREAM_FORGET = 5  # which samples a kind='samples' request forgets (per client)
STREAM_BANK = 6  # the training seeds of an audit's model bank (experiments/audit.py)


def stream_key(seed: int, stream: int, *ids: int):
  """PRNG key for (seed, stream, *ids), derived only by fold_in (nothing to checkpoint).

  Called with host integers it is one jitted program per number of ids (the same bits:
  outside jit `key(seed)` and `fold_in` convert a Python int to an int32 / uint32 array
  too), instead of a program per primitive run eagerly in every process.
  """
  ids = (stream, *ids)
  if fits(seed, np.int32) and all(fits(i, np.uint32) for i in ids):
    return _stream_key_jit(np.int32(seed), np.asarray(ids, np.uint32))
  return fold_key(seed, *ids)


def fits(v, dtype) -> bool:
  """Whether v is a host integer within dtype's range."""
  info = np.iinfo(dtype)
  return isinstance(v, (int, np.integer)) and info.min <= int(v) <= info.max


def fold_key(seed, stream, *ids):
  """key(seed) folded with stream then each id: `stream_key` traceable (jit, vmap)."""
  key = jax.random.fold_in(jax.random.key(seed), stream)
  for i in ids:
    key = jax.random.fold_in(key, i)
  return key


@jax.jit
def _stream_key_jit(seed, ids):
  return fold_key(seed, *(ids[i] for i in range(ids.shape[0])))
