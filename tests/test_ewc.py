"""Tests for fu_jax.ewc (diagonal / CountSketch Fisher, EWC penalty and transform)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fu_jax import ewc, models

K = 3
N_VALID, N_PAD = 10, 13


class TinyMLP(nn.Module):
  hidden: int = 3

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(self.hidden)(x))
    return nn.Dense(K)(x)


MODULE = TinyMLP()
APPLY = models.logits_fn(MODULE)  # (params, x) -> logits
LOSS = ewc.example_ce_loss(APPLY)


@functools.lru_cache(maxsize=None)
def _setup():
  rng = np.random.RandomState(0)
  x = rng.randn(N_PAD, 2).astype(np.float32)
  y = rng.randint(0, K, N_PAD).astype(np.int32)
  mask = np.arange(N_PAD) < N_VALID
  x[N_VALID:] = 50.0  # padding rows hold garbage that must not matter
  params = jax.jit(MODULE.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
  grad_one = jax.jit(jax.grad(LOSS))
  jac = np.stack(
    [np.asarray(ravel_pytree(grad_one(params, x[i], y[i]))[0], np.float64) for i in range(N_VALID)]
  )  # [n_valid, d]: rows are per-example gradients
  return params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), jac


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _flat_rows(tree):
  """Sketch leaves (t,)+shape -> [t, d] in ravel_pytree order."""
  t = jax.tree.leaves(tree)[0].shape[0]
  return np.stack([_flat(jax.tree.map(lambda a: a[r], tree)) for r in range(t)])


_fisher = jax.jit(ewc.fisher_diagonal, static_argnums=0, static_argnames="chunk_size")
_sketch = jax.jit(ewc.count_sketch, static_argnums=0, static_argnames=("width", "chunk_size"))


def test_per_example_grads_match_loop():
  params, x, y, _, jac = _setup()
  g = jax.jit(ewc.per_example_grads, static_argnums=0)(LOSS, params, x[:N_VALID], y[:N_VALID])
  for a, p in zip(jax.tree.leaves(g), jax.tree.leaves(params)):
    assert a.shape == (N_VALID,) + p.shape
  np.testing.assert_allclose(_flat_rows(g), jac, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 4, 13])
def test_fisher_diagonal_matches_loop(chunk_size):
  params, x, y, mask, jac = _setup()
  f = _fisher(LOSS, params, x, y, mask, chunk_size=chunk_size)
  np.testing.assert_allclose(_flat(f), (jac**2).mean(0), rtol=1e-5, atol=1e-8)


def test_fisher_padding_and_empty():
  params, x, y, mask, _ = _setup()
  padded = _fisher(LOSS, params, x, y, mask, chunk_size=4)
  unpadded = _fisher(LOSS, params, x[:N_VALID], y[:N_VALID], jnp.ones(N_VALID, bool), chunk_size=4)
  np.testing.assert_allclose(_flat(padded), _flat(unpadded), rtol=1e-6)
  empty = _fisher(LOSS, params, x, y, jnp.zeros(N_PAD, bool), chunk_size=4)
  np.testing.assert_array_equal(_flat(empty), 0.0)


def _explicit_s(key, width):
  bucket, sign = jax.jit(ewc.sketch_hash, static_argnums=(1, 2))(key, N_PAD, width)
  s = np.zeros((width, N_VALID))
  s[np.asarray(bucket)[:N_VALID], np.arange(N_VALID)] = np.asarray(sign)[:N_VALID]
  return s


@pytest.mark.slow
def test_count_sketch_equals_explicit_s_times_j():
  params, x, y, mask, jac = _setup()
  key = jax.random.PRNGKey(7)
  sk = _sketch(LOSS, params, x, y, mask, key, width=4, chunk_size=4)
  for a, p in zip(jax.tree.leaves(sk), jax.tree.leaves(params)):
    assert a.shape == (4,) + p.shape
  s = _explicit_s(key, 4)
  assert set(np.unique(np.abs(s[s != 0]))) == {1.0}
  np.testing.assert_array_equal((s != 0).sum(0), 1)  # one bucket per example
  np.testing.assert_allclose(_flat_rows(sk), s @ jac, rtol=1e-5, atol=1e-6)
  # Padding rows appended at the end change nothing (same key -> same buckets).
  sk2 = _sketch(
    LOSS, params, x[:N_VALID], y[:N_VALID], jnp.ones(N_VALID, bool), key, width=4, chunk_size=4
  )
  np.testing.assert_allclose(_flat_rows(sk2), _flat_rows(sk), rtol=1e-6, atol=1e-7)
  # Another key hashes differently.
  assert not np.allclose(_explicit_s(jax.random.PRNGKey(8), 4), s)


def test_sketch_quadratic_form_is_unbiased():
  params, x, y, mask, jac = _setup()
  delta = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
  d = _flat(delta)
  exact = float(((jac @ d) ** 2).sum() / N_VALID)  # Delta^T (J^T J / n) Delta
  anchor = jax.tree.map(jnp.zeros_like, params)
  width, num_keys = 3, 2000

  @jax.jit
  def per_key(key):
    sk = ewc.count_sketch(LOSS, params, x, y, mask, key, width=width)
    quad = 2.0 * ewc.ewc_penalty_sketch(delta, anchor, sk, 1.0, N_VALID)
    diag = jax.tree.map(lambda a: jnp.sum(a * a, 0) / N_VALID, sk)
    return quad, diag

  # lax.map rather than vmap: XLA:CPU compiles a vmapped PRNG much more slowly.
  quad, diag = jax.lax.map(per_key, jax.random.split(jax.random.PRNGKey(0), num_keys))
  quad = np.asarray(quad, np.float64)
  se = quad.std() / np.sqrt(num_keys)
  assert quad.std() > 0.05 * exact  # the estimate really is random at this width
  print(f"sketch quad: mean {quad.mean():.5f} exact {exact:.5f} se {se:.5f}")
  assert abs(quad.mean() - exact) < 5 * se, (quad.mean(), exact, se)
  # E diag((SJ)^T SJ) / n = the diagonal empirical Fisher.
  diag = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(diag), np.float64)
  want = (jac**2).mean(0)
  se_d = diag.std(0) / np.sqrt(num_keys)
  assert np.all(np.abs(diag.mean(0) - want) < 5 * se_d + 1e-7)


def _max_intermediate_size(jaxpr):
  """Largest array any equation (at any nesting depth) produces."""
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
    for p in eqn.params.values():
      subs = p if isinstance(p, (list, tuple)) else [p]
      for sub in subs:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          best = max(best, _max_intermediate_size(sub))
  return best


@pytest.mark.parametrize("fn", ["fisher", "sketch"])
def test_never_materialises_per_example_jacobian(fn):
  wide = TinyMLP(hidden=64)
  loss = ewc.example_ce_loss(models.logits_fn(wide))
  params = jax.eval_shape(wide.init, jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  n = 256
  x = jnp.zeros((n, 2))
  y = jnp.zeros((n,), jnp.int32)
  mask = jnp.ones((n,), bool)
  biggest_leaf = max(a.size for a in jax.tree.leaves(params))

  def run(chunk):
    if fn == "fisher":
      return ewc.fisher_diagonal(loss, params, x, y, mask, chunk_size=chunk)
    return ewc.count_sketch(
      loss, params, x, y, mask, jax.random.PRNGKey(0), width=4, chunk_size=chunk
    )

  size = lambda chunk: _max_intermediate_size(jax.make_jaxpr(lambda: run(chunk))().jaxpr)
  assert size(8) < n * biggest_leaf / 4
  assert size(None) >= n * biggest_leaf  # the check does see a full per-example Jacobian


@pytest.mark.slow
def test_penalties_match_numpy():
  params, x, y, mask, jac = _setup()
  anchor = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  d = _flat(params) - _flat(anchor)
  f = _fisher(LOSS, params, x, y, mask, chunk_size=4)
  got = ewc.ewc_penalty_diag(params, anchor, f, 10.0)
  np.testing.assert_allclose(got, 5.0 * (_flat(f) * d * d).sum(), rtol=1e-5)
  key = jax.random.PRNGKey(3)
  sk = _sketch(LOSS, params, x, y, mask, key, width=4, chunk_size=4)
  got = ewc.ewc_penalty_sketch(params, anchor, sk, 10.0, N_VALID)
  want = 5.0 * ((_explicit_s(key, 4) @ jac @ d) ** 2).sum() / N_VALID
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _states():
  params, x, y, mask, _ = _setup()
  anchor = jax.tree.map(lambda p: p - 0.2, params)
  f = _fisher(LOSS, anchor, x, y, mask, chunk_size=4)
  sk = _sketch(LOSS, anchor, x, y, mask, jax.random.PRNGKey(1), width=4, chunk_size=4)
  return params, ewc.ewc_state_diag(anchor, f), ewc.ewc_state_sketch(anchor, sk, N_VALID)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diag", "sketch"])
def test_transform_adds_gradient_of_penalty(kind):
  params, diag_state, sketch_state = _states()
  state = diag_state if kind == "diag" else sketch_state
  lam = 10.0
  tx = ewc.add_ewc_gradient(lam, kind=kind, width=4)
  g_in = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  out, new_state = jax.jit(tx.update)(g_in, state, params)
  want = jax.grad(lambda p: ewc.ewc_penalty(p, state, lam))(params)
  np.testing.assert_allclose(_flat(out), _flat(want) + 0.5, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(new_state, state)  # the state is data, never updated
  # The neutral init state adds nothing, and has the structure of the real state.
  neutral = tx.init(params)
  assert jax.tree.structure(neutral) == jax.tree.structure(state)
  out0, _ = tx.update(g_in, neutral, params)
  np.testing.assert_allclose(_flat(out0), _flat(g_in))


def test_transform_in_chain_per_client_vmap_and_no_retrace():
  params, diag_state, _ = _states()
  tx = optax.chain(ewc.add_ewc_gradient(2.0), optax.sgd(0.1))
  zero_g = jax.tree.map(jnp.zeros_like, params)
  # Two clients with different anchors / Fisher values, stacked on a leading axis.
  states = [
    diag_state,
    ewc.ewc_state_diag(
      jax.tree.map(lambda a: a + 1.0, diag_state.anchor),
      jax.tree.map(lambda f: 3.0 * f, diag_state.fisher),
    ),
  ]

  def step(p, s):
    opt_state = (s, tx.init(p)[1])
    upd, _ = tx.update(zero_g, opt_state, p)
    return optax.apply_updates(p, upd)

  step_once = jax.jit(chex.assert_max_traces(step, n=1))
  singles = [step_once(params, s) for s in states]  # second call: new values, no retrace
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  batched = jax.jit(jax.vmap(step, in_axes=(None, 0)))(params, stacked)
  for c in range(2):
    want = jax.tree.map(
      lambda p, a, f: p - 0.1 * 2.0 * f * (p - a), params, states[c].anchor, states[c].fisher
    )
    np.testing.assert_allclose(_flat(singles[c]), _flat(want), rtol=1e-6)
    np.testing.assert_allclose(_flat(jax.tree.map(lambda a: a[c], batched)), _flat(want), rtol=1e-6)


def test_bad_inputs():
  params, diag_state, _ = _states()
  with pytest.raises(ValueError, match="diag, sketch"):
    ewc.add_ewc_gradient(1.0, kind="kfac")
  with pytest.raises(ValueError, match="width"):
    ewc.add_ewc_gradient(1.0, kind="sketch")
  with pytest.raises(ValueError, match="params"):
    ewc.add_ewc_gradient(1.0).update(params, diag_state)
  with pytest.raises(ValueError, match="EwcDiagState or EwcSketchState"):
    ewc.ewc_penalty(params, (params, params), 1.0)
  with pytest.raises(ValueError, match="width"):
    ewc.count_sketch(
      LOSS,
      params,
      jnp.zeros((2, 2)),
      jnp.zeros(2, jnp.int32),
      jnp.ones(2, bool),
      jax.random.PRNGKey(0),
      width=0,
    )
  with pytest.raises(ValueError, match="chunk_size"):
    ewc.fisher_diagonal(
      LOSS, params, jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32), jnp.ones(2, bool), chunk_size=0
    )
