"""Tests for fu_jax.ascent (bounded stochastic gradient ascent)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fu_jax import ascent, losses, models

K = 3
N_VALID, N_PAD, BS = 10, 14, 4


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(4)(x))
    return nn.Dense(K)(x)


MODULE = TinyMLP()
APPLY = models.logits_fn(MODULE)  # (params, x) -> logits


@functools.lru_cache(maxsize=None)
def _setup():
  rng = np.random.RandomState(0)
  x = rng.randn(N_PAD, 2).astype(np.float32)
  y = rng.randint(0, K, N_PAD).astype(np.int32)
  x[N_VALID:] = 30.0  # garbage in padding rows
  mask = np.arange(N_PAD) < N_VALID
  params = jax.jit(MODULE.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
  return params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


_epoch = jax.jit(ascent.sga_epoch, static_argnums=0, static_argnames=("batch_size", "unroll"))
_plan = jax.jit(ascent.epoch_batches, static_argnums=2)
_loss = jax.jit(lambda p, x, y, m: losses.masked_ce(MODULE.apply({"params": p}, x), y, m))
_grad = jax.jit(jax.grad(lambda p, x, y, m: losses.masked_ce(MODULE.apply({"params": p}, x), y, m)))


def test_sga_step_and_gradient_ascent_transform():
  p = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
  g = {"a": jnp.array([0.5, -1.0]), "b": jnp.array(2.0)}
  np.testing.assert_allclose(_flat(ascent.sga_step(p, g, 0.1)), [1.05, 1.9, 3.2])
  tx = optax.chain(ascent.gradient_ascent(), optax.sgd(0.1))
  upd, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(_flat(optax.apply_updates(p, upd)), [1.05, 1.9, 3.2])


def test_project_l2_ball():
  c = {"a": jnp.array([1.0, 1.0]), "b": jnp.array(0.0)}
  inside = {"a": jnp.array([1.5, 1.0]), "b": jnp.array(0.5)}
  np.testing.assert_allclose(_flat(ascent.project_l2_ball(inside, c, 1.0)), _flat(inside))
  outside = {"a": jnp.array([4.0, 1.0]), "b": jnp.array(4.0)}  # distance 5
  got = _flat(ascent.project_l2_ball(outside, c, 2.0))
  np.testing.assert_allclose(got, [1.0 + 3.0 * 0.4, 1.0, 4.0 * 0.4], rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got - _flat(c)), 2.0, rtol=1e-6)
  np.testing.assert_allclose(_flat(ascent.project_l2_ball(c, c, 0.5)), _flat(c))  # no NaN


def test_epoch_batches_is_a_padding_invariant_permutation():
  key = jax.random.PRNGKey(3)
  mask = jnp.arange(N_PAD) < N_VALID
  idx, valid = _plan(key, mask, BS)
  assert idx.shape == valid.shape == (4, BS)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert sorted(idx[valid].tolist()) == list(range(N_VALID))
  assert valid.reshape(-1).tolist() == [True] * N_VALID + [False] * (16 - N_VALID)
  idx2, valid2 = _plan(key, jnp.ones(N_VALID, bool), BS)
  np.testing.assert_array_equal(np.asarray(idx2)[np.asarray(valid2)], idx[valid])
  idx3, _ = _plan(jax.random.PRNGKey(4), mask, BS)
  assert not np.array_equal(np.asarray(idx3)[valid], idx[valid])
  with pytest.raises(ValueError, match="batch_size"):
    ascent.epoch_batches(key, mask, 0)


def _manual(params, x, y, key, lr, ref=None, radius=None, max_loss=None):
  """Python loop over the same batch plan, with numpy projection."""
  idx, valid = _plan(key, jnp.arange(N_PAD) < N_VALID, BS)
  for ib, mb in zip(np.asarray(idx), np.asarray(valid)):
    if not mb.any():
      continue
    xb, yb = x[ib], y[ib]
    if max_loss is not None and float(_loss(params, xb, yb, jnp.asarray(mb))) > max_loss:
      break
    g = _grad(params, xb, yb, jnp.asarray(mb))
    params = jax.tree.map(lambda p, gg: p + lr * gg, params, g)
    if ref is not None:
      flat, unravel = ravel_pytree(params)
      c = ravel_pytree(ref)[0]
      d = np.asarray(flat - c, np.float64)
      nd = np.linalg.norm(d)
      if nd > radius:
        params = unravel(jnp.asarray(np.asarray(c) + d * radius / nd, jnp.float32))
  return params


@pytest.mark.slow
def test_sga_epoch_matches_manual_loop_and_increases_loss():
  params, x, y, mask = _setup()
  key = jax.random.PRNGKey(1)
  got = _epoch(APPLY, params, x, y, mask, lr=0.5, batch_size=BS, key=key)
  want = _manual(params, x, y, key, 0.5)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-6)
  assert float(_loss(got, x, y, mask)) > float(_loss(params, x, y, mask)) + 0.05
  # Padding never changes the result.
  unpadded = _epoch(
    APPLY, params, x[:N_VALID], y[:N_VALID], jnp.ones(N_VALID, bool), lr=0.5, batch_size=BS, key=key
  )
  np.testing.assert_allclose(_flat(unpadded), _flat(got), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sga_epoch_projection_stays_in_ball():
  params, x, y, mask = _setup()
  key = jax.random.PRNGKey(2)
  ref = jax.tree.map(lambda p: p + 0.01, params)
  radius = 0.2
  got = _epoch(
    APPLY, params, x, y, mask, lr=1.0, batch_size=BS, key=key, ref_params=ref, radius=radius
  )
  dist = np.linalg.norm(_flat(got) - _flat(ref))
  assert dist <= radius * (1 + 1e-5)
  assert dist > 0.9 * radius  # the bound was active
  want = _manual(params, x, y, key, 1.0, ref=ref, radius=radius)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sga_epoch_max_loss_stops_the_ascent():
  params, x, y, mask = _setup()
  key = jax.random.PRNGKey(1)
  # Below the initial loss: nothing moves.
  start = float(_loss(params, x, y, mask))
  got = _epoch(APPLY, params, x, y, mask, lr=0.5, batch_size=BS, key=key, max_loss=0.1 * start)
  np.testing.assert_array_equal(_flat(got), _flat(params))
  # A threshold reached mid-epoch: the first step(s) are taken, then the rest skipped.
  full = _epoch(APPLY, params, x, y, mask, lr=0.5, batch_size=BS, key=key, max_loss=None)
  idx, valid = _plan(key, mask, BS)
  b0 = float(_loss(params, x[idx[0]], y[idx[0]], valid[0]))
  p1 = ascent.sga_step(params, _grad(params, x[idx[0]], y[idx[0]], valid[0]), 0.5)
  b1 = float(_loss(p1, x[idx[1]], y[idx[1]], valid[1]))
  assert b1 > b0  # so a threshold in between stops after exactly one step
  mid = 0.5 * (b0 + b1)
  got = _epoch(APPLY, params, x, y, mask, lr=0.5, batch_size=BS, key=key, max_loss=mid)
  np.testing.assert_allclose(_flat(got), _flat(p1), rtol=1e-6)
  np.testing.assert_allclose(
    _flat(got), _flat(_manual(params, x, y, key, 0.5, max_loss=mid)), rtol=1e-6
  )
  assert not np.allclose(_flat(full), _flat(got))


def test_bad_inputs():
  params, x, y, mask = _setup()
  with pytest.raises(ValueError, match="ref_params and radius"):
    ascent.sga_epoch(
      APPLY, params, x, y, mask, lr=0.1, batch_size=BS, key=jax.random.PRNGKey(0), ref_params=params
    )
