"""FRR rapid retraining (fu_jax/methods/frr.py): the local step against a numpy computation
of per-example gradients, diagonal Fisher and the momentum update; end-to-end on digits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import digits
from fu_jax import fl, models
from fu_jax import tree as tu
from fu_jax.methods import base, frr
from tests import pretrain_cache
from tests.test_sga import small_config as _small_config

K = 3


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(K)(x)


def _numpy_steps(w, b, x, y, mask, steps, *, lr, b1, b2, eps):
  """The FRR local steps on one fixed batch, per-example gradients of softmax regression."""
  m = [np.zeros_like(w), np.zeros_like(b)]
  v = [np.zeros_like(w), np.zeros_like(b)]
  onehot = np.eye(K)[y]
  wt = mask / mask.sum()
  for t in range(1, steps + 1):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - onehot  # dl_i/dlogits
    gw_i = x[:, :, None] * r[:, None, :]  # [n, d, K]
    gb_i = r
    for j, gi in enumerate((gw_i, gb_i)):
      e = wt.reshape((-1,) + (1,) * (gi.ndim - 1))
      g, f = np.sum(e * gi, 0), np.sum(e * gi * gi, 0)
      m[j] = b1 * m[j] + (1 - b1) * g
      v[j] = b2 * v[j] + (1 - b2) * f * f
      d = (m[j] / (1 - b1**t)) / (np.sqrt(v[j] / (1 - b2**t)) + eps)
      if j == 0:
        w = w - lr * d
      else:
        b = b - lr * d
  return w, b


@pytest.mark.parametrize("b1, b2", [(0.9, 0.999), (0.0, 0.0)])
def test_local_steps_match_numpy(b1, b2):
  rng = np.random.RandomState(0)
  n, d = 6, 4
  x = rng.randn(n, d).astype(np.float32)
  y = rng.randint(0, K, n).astype(np.int32)
  mask = np.array([1, 1, 1, 0, 1, 1], bool)  # a padded row must not count
  x[~mask] = 50.0
  module = Linear()
  params = module.init(jax.random.key(0), jnp.zeros((1, d)))["params"]
  prog = frr.frr_program(module, lr=0.01, beta1=b1, beta2=b2, eps=1e-3)
  state = prog.init(params, None, None)
  batch = fl.Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
  step = jax.jit(prog.step)
  for _ in range(3):
    state, metrics = step(state, batch, jax.random.key(0))
  w, b = _numpy_steps(
    np.asarray(params["Dense_0"]["kernel"], np.float64),
    np.asarray(params["Dense_0"]["bias"], np.float64),
    x.astype(np.float64),
    y,
    mask.astype(np.float64),
    3,
    lr=0.01,
    b1=b1,
    b2=b2,
    eps=1e-3,
  )
  np.testing.assert_allclose(np.asarray(state.params["Dense_0"]["kernel"]), w, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.params["Dense_0"]["bias"]), b, rtol=2e-4, atol=1e-6)
  assert int(state.t) == 3 and np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_conv_impl_model_equals_im2col_steps():
  # frr.conv_impl='model' (XLA's convolution) and the default im2col take the same steps on
  # a conv net: only the implementation of the per-example gradients differs.
  module = models.create("cnn", 3)
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(5, 8, 8, 1).astype(np.float32))
  y = jnp.asarray(rng.randint(0, 3, 5).astype(np.int32))
  batch = fl.Batch(x, y, jnp.asarray([1, 1, 0, 1, 1], bool))
  params = module.init(jax.random.key(0), x[:1])["params"]
  out = {}
  for impl in ("im2col", "model"):
    prog = frr.frr_program(module, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-4, conv_impl=impl)
    state = prog.init(params, None, None)
    for _ in range(2):
      state, _ = jax.jit(prog.step)(state, batch, jax.random.key(0))
    out[impl] = state.params
  # Dividing by the Fisher amplifies float rounding where it is tiny: compare the moves
  # against the largest move, per leaf.
  for a, b, p in zip(*(jax.tree.leaves(t) for t in (out["model"], out["im2col"], params))):
    move = float(jnp.max(jnp.abs(a - p)))
    assert move > 1e-3  # the steps did something
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-3 * move
  with pytest.raises(ValueError, match=r"conv_impl='xla': allowed \('im2col', 'model'\)"):
    frr.frr_program(module, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-4, conv_impl="xla")


def test_plain_step_is_gradient_over_fisher():
  g = {"a": jnp.asarray([0.5, -0.2, 0.0])}
  f = {"a": jnp.asarray([0.5, 0.04, 0.0])}
  z = jax.tree.map(jnp.zeros_like, g)
  d, _, _ = frr.frr_direction(g, f, z, z, 1.0, beta1=0.0, beta2=0.0, eps=1e-2)
  np.testing.assert_allclose(np.asarray(d["a"]), [0.5 / 0.51, -0.2 / 0.05, 0.0], rtol=1e-6)


def test_kinds_follow_the_request_kinds():
  assert set(frr.METHODS["frr"].kinds) >= {"class", "client_class", "client"}
  assert ("samples" in frr.METHODS["frr"].kinds) == ("samples" in base.REQUEST_KINDS)


def test_bad_settings_name_the_key():
  c = digits.get_config()
  c.frr.init = "random"
  with pytest.raises(ValueError, match=r"frr.init='random': allowed \('trained', 'scratch'\)"):
    frr.validate(c)
  c = digits.get_config()
  c.frr.beta2 = 1.0
  with pytest.raises(ValueError, match=r"frr.beta2=1.0: must be in \[0, 1\)"):
    frr.validate(c)
  c = digits.get_config()
  c.frr.conv_impl = "xla"
  with pytest.raises(ValueError, match=r"frr.conv_impl='xla': allowed \('im2col', 'model'\)"):
    frr.validate(c)


def small_config(method, **overrides):
  return _small_config(method, **{"unlearn.kind": "class", **overrides})


def test_defaults_are_the_papers_protocol():
  # A fresh initialisation, the training's rounds, retrain's convolution, the paper's eta.
  c = digits.get_config()
  assert (c.frr.init, c.frr.rounds, c.frr.conv_impl) == ("scratch", 20, "model")
  assert (c.frr.lr, c.frr.beta1, c.frr.beta2) == (0.001, 0.9, 0.999)
  c.fl.rounds = 5
  assert c.frr.rounds == 5


@pytest.mark.slow
def test_class_forgets_like_retrain_and_keeps_utility(tmp_path):
  runs = {
    m: pretrain_cache.run(small_config(m), str(tmp_path)) for m in ("retrain", "fedavg", "frr")
  }
  fr, noop, ref = runs["frr"], runs["fedavg"], runs["retrain"]
  cfg = small_config("frr")
  # The paper's protocol: retraining from a fresh init (here in retrain's rounds).
  assert fr["frr_init"] == "scratch" and fr["rounds"] == fr["frr_rounds"] == ref["rounds"] == 4
  assert noop["forget_acc"] >= 0.9
  assert fr["forget_acc"] <= ref["forget_acc"] + 0.05  # forgets like retrain: near 0
  assert fr["forget_acc"] <= 0.05
  assert abs(fr["retain_acc"] - ref["retain_acc"]) <= 0.05  # utility near retrain
  # Every round each of the 5 clients downloads and uploads the model (55210 float32).
  model_bytes = tu.tree_num_bytes(
    models.init_params(models.create("mlp", 10), jax.random.key(0), (8, 8, 1))
  )
  assert model_bytes == 4 * 55210
  assert fr["bytes_up"] == fr["bytes_down"] == cfg.frr.rounds * 5 * model_bytes


@pytest.mark.slow
def test_the_trained_start_variant_still_runs(tmp_path):
  cfg = small_config("frr", **{"frr.init": "trained", "frr.conv_impl": "im2col"})
  res = pretrain_cache.run(cfg, str(tmp_path))
  assert res["frr_init"] == "trained" and res["rounds"] == cfg.frr.rounds == 4
  assert res["forget_acc"] <= res["original"]["forget_acc"] - 0.5  # beyond the no-op
  assert abs(res["retain_acc"] - res["original"]["retain_acc"]) <= 0.05
