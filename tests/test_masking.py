"""Tests for fu_jax.masking: exact checks against independent (numpy, one-at-a-time) references.

Library calls are wrapped in jax.jit: one compilation is much cheaper on a shared CPU than
the many small per-op compilations of eager mode.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fu_jax import class_pruning, losses, masking

K = 5  # classes
N = 32  # batch


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3))(x)
    x = nn.GroupNorm(num_groups=2)(x)
    return nn.relu(x)


class TinyCNN(nn.Module):
  """2 conv (the second nested in a block, followed by GroupNorm) + dense classifier."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = Block(name="block")(x)
    return nn.Dense(K)(x.reshape((x.shape[0], -1)))


MODEL = TinyCNN()
CONV0, CONV1, DENSE = ("Conv_0",), ("block", "Conv_0"), ("Dense_0",)


def apply_fn(p, x):
  return MODEL.apply({"params": p}, x)


def loss_fn(p, x, y):
  return losses.masked_ce(apply_fn(p, x), y, jnp.ones(y.shape))


FORWARD = jax.jit(apply_fn)
# One jitted effects function so tests with the same shapes share one compilation.
EFFECTS = jax.jit(
  masking.channel_effects,
  static_argnums=0,
  static_argnames=("metric", "chunk_size", "layers", "method"),
)
TOP = jax.jit(masking.top_delta_channels, static_argnums=1)
TO_PARAM = jax.jit(masking.channel_mask_to_param_mask, static_argnames=("others",))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N, 8, 8, 1)), jnp.float32)
  # Shapes from flax (no compilation), values from numpy: cheaper than compiling init.
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), x[:1])["params"]
  params = jax.tree.map(
    lambda s: (rng.normal(size=s.shape) / math.sqrt(np.prod(s.shape[:-1]) or 1)).astype(np.float32),
    shapes,
  )
  params["block"]["GroupNorm_0"]["scale"] = np.ones(6, np.float32)
  # Labels: the model's own prediction for most rows (so accuracy can drop), random for some.
  pred = np.asarray(FORWARD(params, x)).argmax(-1)
  y = np.where(np.arange(N) < 24, pred, rng.integers(0, K, N))
  return params, x, jnp.asarray(y, jnp.int32)


@pytest.fixture(scope="module")
def effects(setup):
  # chunk_size 4: Conv_0 (C=4) is one vmap, block conv (6) two chunks of 3, dense (5) two
  # chunks of 3 with one padded row.
  params, x, y = setup
  return EFFECTS(apply_fn, params, x, y, jnp.ones((N,)), metric="both", chunk_size=4)


def _ref_acc_loss(params, x, y, valid):
  """Accuracy and mean CE over valid rows, computed in numpy from the logits."""
  logits = np.asarray(FORWARD(params, x), np.float64)
  y, valid = np.asarray(y), np.asarray(valid, bool)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  acc = np.mean((logits.argmax(-1) == y)[valid])
  return float(acc), float(np.mean(-logp[np.arange(len(y)), y][valid]))


def _np_zero_channel(params, path, ch):
  """Independent reference: numpy copy of params with the channel's slices set to 0."""
  out = jax.tree.map(np.array, params)
  layer = out
  for k in path:
    layer = layer[k]
  layer["kernel"][..., ch] = 0
  layer["bias"][ch] = 0
  return out


def _layer(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _bits(a):
  return np.asarray(a).view(np.uint32)


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


# ----------------------------------------------------------------------------- layers


def test_channel_layers(setup):
  params, _, _ = setup
  layers = masking.channel_layers(params)
  assert dict(layers) == {CONV0: 4, CONV1: 6, DENSE: K}
  assert ("block", "GroupNorm_0") not in dict(layers)
  # Deterministic: same order after a tree.map (which rebuilds dicts), natural name order.
  assert masking.channel_layers(jax.tree.map(np.asarray, params)) == layers
  fake = {f"Conv_{i}": {"kernel": np.zeros((1, 1, 1, i + 1))} for i in (10, 2, 1)}
  assert [p for p, _ in masking.channel_layers(fake)] == [("Conv_1",), ("Conv_2",), ("Conv_10",)]


def test_zero_channel(setup):
  params, _, _ = setup
  z = masking.zero_channel(params, CONV1, 3)
  assert _leaves_equal(z, _np_zero_channel(params, CONV1, 3))
  assert not _leaves_equal(z, params)
  with pytest.raises(ValueError, match="channel=6"):
    masking.zero_channel(params, CONV1, 6)
  with pytest.raises(ValueError, match="not found"):
    masking.zero_channel(params, ("nope",), 0)


# ----------------------------------------------------------------------------- effects


@pytest.mark.slow
def test_effects_match_one_at_a_time(setup, effects):
  params, x, y = setup
  eff = effects
  valid = np.ones(N)
  base_acc, base_loss = _ref_acc_loss(params, x, y, valid)
  assert base_acc >= 0.75
  nonzero = 0
  for path, c in masking.channel_layers(params):
    assert eff.acc[path].shape == (c,)
    for ch in range(c):
      acc, loss = _ref_acc_loss(_np_zero_channel(params, path, ch), x, y, valid)
      # Accuracy is a count over 32 rows: exactly equal. Loss: the vmapped conv may sum in
      # another order, so only to float precision.
      assert float(eff.acc[path][ch]) == np.float32(base_acc) - np.float32(acc), (path, ch)
      np.testing.assert_allclose(float(eff.loss[path][ch]), loss - base_loss, rtol=1e-4, atol=1e-6)
      nonzero += float(eff.acc[path][ch]) != 0
  assert nonzero >= 3  # the check above is not vacuous
  # metric='loss' gives the loss part (chunk_size 3: a third chunking of the 6 channels).
  loss_only = EFFECTS(
    apply_fn, params, x, y, jnp.ones((N,)), metric="loss", chunk_size=3, layers=(CONV1,)
  )
  assert list(loss_only) == [CONV1]
  np.testing.assert_allclose(loss_only[CONV1], eff.loss[CONV1], rtol=1e-5, atol=1e-6)
  # Zeroing through the parameters (any apply_fn) gives the same effects as masking the
  # layer outputs through flax interception (what 'auto' chose here).
  by_params = EFFECTS(
    apply_fn, params, x, y, jnp.ones((N,)), metric="both", chunk_size=4, method="params"
  )
  for p in by_params.acc:
    np.testing.assert_array_equal(by_params.acc[p], eff.acc[p])
    np.testing.assert_allclose(by_params.loss[p], eff.loss[p], rtol=1e-4, atol=1e-6)
  # A pre-jitted apply_fn (already traced: its cache bypasses flax interception) still
  # gives the right effects: 'auto' notices the interceptor did not run.
  pre_jitted = EFFECTS(
    FORWARD, params, x, y, jnp.ones((N,)), metric="both", chunk_size=4, layers=(CONV1,)
  )
  np.testing.assert_array_equal(pre_jitted.acc[CONV1], eff.acc[CONV1])
  with pytest.raises(ValueError, match="method='output'"):
    masking.channel_effects(FORWARD, params, x, y, method="output")
  # A fresh jitted apply_fn: the abstract probe traces it (the interceptor runs), the vmapped
  # pass then hits the cached trace (it does not): detected, redone through the parameters.
  fresh = jax.jit(lambda p, x: apply_fn(p, x))
  redone = EFFECTS(
    fresh, params, x, y, jnp.ones((N,)), metric="both", chunk_size=4, layers=(CONV0,)
  )
  np.testing.assert_array_equal(redone.acc[CONV0], eff.acc[CONV0])
  with pytest.raises(ValueError, match="interceptor never ran"):
    masking.channel_effects(jax.jit(lambda p, x: apply_fn(p, x)), params, x, y, method="output")
  with pytest.raises(ValueError, match="metric"):
    masking.channel_effects(apply_fn, params, x, y, metric="f1")
  with pytest.raises(ValueError, match="not in params"):
    masking.channel_effects(apply_fn, params, x, y, layers=[("block",)])


def test_effects_plain_jax_apply_fn():
  """A non-flax apply_fn: 'auto' falls back to zeroing parameters; 'output' refuses."""
  rng = np.random.default_rng(5)
  params = {
    "h": {
      "kernel": rng.normal(size=(6, 7)).astype(np.float32),
      "bias": rng.normal(size=7).astype(np.float32),
    },
    "out": {"kernel": rng.normal(size=(7, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
  }

  def mlp(p, x):
    h = jax.nn.relu(x @ p["h"]["kernel"] + p["h"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]

  x = rng.normal(size=(32, 6)).astype(np.float32)  # 32 rows: accuracies exact in float32
  y = np.asarray(mlp(params, x)).argmax(-1)
  eff = jax.jit(lambda p: masking.channel_effects(mlp, p, x, y, chunk_size=3))(params)
  for path, c in masking.channel_layers(params):
    for ch in range(c):
      z = _np_zero_channel(params, path, ch)
      acc = np.mean(np.asarray(mlp(z, x)).argmax(-1) == y)
      assert float(eff[path][ch]) == np.float32(1.0) - np.float32(acc)
  assert float(eff[("out",)].max()) > 0
  with pytest.raises(ValueError, match="method='output'"):
    masking.channel_effects(mlp, params, x, y, method="output")


class PlainDense(nn.Module):
  """A custom dense layer (not nn.Dense); `opt_in` sets channel_output_maskable."""

  features: int

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    return x @ k + self.param("bias", nn.initializers.normal(1.0), (self.features,))


class MaskableDense(PlainDense):
  channel_output_maskable = True


class TwoLayer(nn.Module):
  layer: type

  @nn.compact
  def __call__(self, x):
    return self.layer(3)(jax.nn.relu(self.layer(7)(x)))


def test_effects_custom_flax_layer_opt_in():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  for layer, maskable in ((PlainDense, False), (MaskableDense, True)):
    model = TwoLayer(layer)
    # Shapes by abstract init, values from numpy (no compilation).
    params = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      jax.eval_shape(model.init, jax.random.key(0), x)["params"],
    )
    fn = lambda p, x, model=model: model.apply({"params": p}, x)
    if not maskable:  # raises after an abstract trace, before any compilation
      with pytest.raises(ValueError, match="method='output'"):
        masking.channel_effects(fn, params, x, np.zeros(32, np.int32), method="output")
      continue

    @jax.jit
    def both(p, fn=fn):
      y = jnp.argmax(fn(p, x), -1)
      return (
        masking.channel_effects(fn, p, x, y, method="output"),
        masking.channel_effects(fn, p, x, y, method="params"),
      )

    out, ref = both(params)
    for p in ref:
      np.testing.assert_array_equal(out[p], ref[p])
    assert max(float(v.max()) for v in out.values()) > 0


@pytest.mark.slow
def test_effects_ignore_padding(setup):
  params, x, y = setup
  n = 20
  valid = (jnp.arange(N) < n).astype(jnp.float32)  # same dtype as the fixture: no recompile
  # Padding rows get wrong labels; they must not matter.
  y_pad = jnp.where(valid, y, (y + 1) % K)
  eff = EFFECTS(apply_fn, params, x, y_pad, valid, metric="both", chunk_size=4)
  base_acc, base_loss = _ref_acc_loss(params, x, y, valid)
  for path, c in masking.channel_layers(params):
    for ch in range(c):
      acc, loss = _ref_acc_loss(_np_zero_channel(params, path, ch), x, y, valid)
      np.testing.assert_allclose(eff.acc[path][ch], base_acc - acc, atol=1e-6)
      np.testing.assert_allclose(eff.loss[path][ch], loss - base_loss, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- selection


def test_num_selected():
  assert masking.num_selected(0.1, 30) == 3  # 0.1 * 30 == 3.0000000000000004 in floats
  assert masking.num_selected(0.2, 6) == 2
  assert masking.num_selected(0.05, 16) == 1
  assert masking.num_selected(0.0, 16) == 0 and masking.num_selected(1.0, 16) == 16
  with pytest.raises(ValueError, match="delta"):
    masking.num_selected(1.5, 4)


@pytest.mark.slow
def test_top_delta_count_choice_and_ties(setup, effects):
  params, _, _ = setup
  eff = effects
  for delta in (0.2, 0.5):
    chosen = TOP(eff, delta)
    for path, c in masking.channel_layers(params):
      ref = np.lexsort((np.arange(c), -np.asarray(eff.loss[path]), -np.asarray(eff.acc[path])))
      expect = np.zeros(c, bool)
      expect[ref[: math.ceil(delta * c)]] = True
      np.testing.assert_array_equal(chosen[path], expect)
  # Hand-made ties: accuracy ties broken by loss, then by lower index.
  acc = {("L",): np.array([0.1, 0.3, 0.3, 0.3, 0.0, 0.3], np.float32)}
  loss = {("L",): np.array([9.0, 0.05, 0.7, 0.7, 9.0, 0.1], np.float32)}
  got = masking.top_delta_channels(acc, 0.5, tie_break=loss)[("L",)]
  np.testing.assert_array_equal(got, [False, False, True, True, False, True])
  got = masking.top_delta_channels(acc, 0.5)[("L",)]  # no tie-break: lower indices
  np.testing.assert_array_equal(got, [False, True, True, True, False, False])
  got = masking.top_delta_channels(masking.ChannelEffects(acc, loss), 0.3)[("L",)]
  np.testing.assert_array_equal(got, [False, False, True, True, False, False])
  with pytest.raises(ValueError, match="tie_break"):
    masking.top_delta_channels(masking.ChannelEffects(acc, loss), 0.3, tie_break=loss)


@pytest.mark.slow
def test_param_mask_layout(setup, effects):
  params, _, _ = setup
  cm = TOP(effects, 0.5)
  pm = TO_PARAM(cm, params)
  assert jax.tree.structure(pm) == jax.tree.structure(params)
  for path, _ in masking.channel_layers(params):
    k, b = np.asarray(_layer(pm, path)["kernel"]), np.asarray(_layer(pm, path)["bias"])
    assert k.dtype == bool and k.shape == _layer(params, path)["kernel"].shape
    # kernel: channel mask broadcast along the last axis; bias: the channel mask.
    assert np.all(k == np.asarray(cm[path]))
    np.testing.assert_array_equal(b, cm[path])
  assert not np.any(pm["block"]["GroupNorm_0"]["scale"])
  pm_t = TO_PARAM({CONV0: cm[CONV0]}, params, others=True)
  assert np.all(pm_t["block"]["GroupNorm_0"]["scale"]) and np.all(pm_t["Dense_0"]["kernel"])
  np.testing.assert_array_equal(pm_t["Conv_0"]["bias"], cm[CONV0])
  assert _leaves_equal(masking.top_delta_mask(effects, 0.5, params), pm)
  with pytest.raises(ValueError, match="not a layer"):
    masking.channel_mask_to_param_mask({("block",): cm[CONV0]}, params)
  with pytest.raises(ValueError, match="shape"):
    masking.channel_mask_to_param_mask({CONV0: cm[CONV1]}, params)


@pytest.mark.slow
def test_random_mask():
  params = {
    "a": {"kernel": np.zeros((3, 40)), "bias": np.zeros((40,))},
    "b": {"kernel": np.zeros((2, 2, 3, 17))},
  }
  rand = jax.jit(masking.random_mask, static_argnums=1, static_argnames="layers")
  m1 = rand(params, 0.2, jax.random.key(1))
  m2 = rand(params, 0.2, jax.random.key(2))
  assert int(m1["a"]["bias"].sum()) == 8 and int(m1["b"]["kernel"][0, 0, 0].sum()) == 4
  assert np.all(np.asarray(m1["a"]["kernel"]) == np.asarray(m1["a"]["bias"]))
  assert _leaves_equal(m1, rand(params, 0.2, jax.random.key(1)))
  assert not np.array_equal(m1["a"]["bias"], m2["a"]["bias"])
  # A layer's draw depends only on the key and its own name, not on which layers are listed.
  only_a = rand(params, 0.2, jax.random.key(1), layers=(("a",),))
  np.testing.assert_array_equal(only_a["a"]["bias"], m1["a"]["bias"])
  assert not np.any(only_a["b"]["kernel"])


# ----------------------------------------------------------------------------- masked update


@pytest.mark.slow
@pytest.mark.parametrize("base", ["sgd_momentum", "adamw"])
def test_masked_update_bit_identical(setup, effects, base):
  params, x, y = setup
  pmask = TO_PARAM(TOP(effects, 0.34), params)
  # A -0.0 among frozen parameters must stay -0.0 (p + 0.0 would make it +0.0).
  frozen_ch = int(np.argmin(np.asarray(pmask["Conv_0"]["bias"])))
  params = jax.tree.map(np.array, params)
  params["Conv_0"]["kernel"][0, 0, 0, frozen_ch] = -0.0
  inner = optax.sgd(0.1, momentum=0.9) if base == "sgd_momentum" else optax.adamw(0.01, 0.1)
  opt = optax.chain(inner, masking.masked_update(pmask))

  @jax.jit
  def train(p, s):
    def step(_, ps):
      p, s = ps
      u, s = opt.update(jax.grad(loss_fn)(p, x, y), s, p)
      return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, 4, step, (p, s))[0]

  new = train(params, opt.init(params))
  changed = 0
  for p0, p1, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(pmask)):
    m = np.asarray(m)
    np.testing.assert_array_equal(_bits(p1)[~m], _bits(p0)[~m])
    changed += int(np.sum(np.asarray(p1)[m] != np.asarray(p0)[m]))
  assert changed > 0.5 * sum(int(np.sum(m)) for m in jax.tree.leaves(pmask))
  assert _bits(new["Conv_0"]["kernel"][0, 0, 0, frozen_ch]) == _bits(np.float32(-0.0))


@pytest.mark.slow
def test_masked_update_per_client_under_vmap(setup):
  params, x, y = setup
  layers = masking.channel_layers(params)
  masks = [
    TO_PARAM(masking.random_channels(layers, 0.5, jax.random.key(i)), params) for i in range(2)
  ]
  opt = optax.chain(optax.sgd(0.1, momentum=0.9), masking.masked_update())
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)

  @jax.jit
  def per_client(stacked_masks):
    states = jax.vmap(lambda m: masking.set_mask(opt.init(params), m))(stacked_masks)
    return jax.vmap(opt.update, in_axes=(None, 0, None))(grads, states, params)[0]

  ups = per_client(jax.tree.map(lambda *a: jnp.stack(a), *masks))
  for i, m in enumerate(masks):
    for u, g, mm in zip(jax.tree.leaves(ups), jax.tree.leaves(grads), jax.tree.leaves(m)):
      u, g, mm = np.asarray(u[i]), np.asarray(g), np.asarray(mm)
      assert np.all(u[~mm] == 0)
      np.testing.assert_allclose(u[mm], -0.1 * g[mm], rtol=1e-6)
  # init_masked_state is the state masked_update's init builds from the same mask.
  assert _leaves_equal(
    masking.masked_update(masks[0]).init(params), masking.init_masked_state(masks[0])
  )


# ----------------------------------------------------------------------------- packing


@pytest.mark.slow
def test_pack_unpack_roundtrip_and_bytes(setup, effects):
  params, _, _ = setup
  cm = TOP(effects.acc, 0.5)
  pmask = TO_PARAM(cm, params)
  rng = np.random.default_rng(3)
  delta = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  counts = {p: masking.num_selected(0.5, c) for p, c in masking.channel_layers(params)}
  assert masking.channel_counts(cm) == counts

  @jax.jit
  def roundtrip(d, m):
    packed = masking.pack_channels(d, m, counts)
    return packed, masking.unpack_channels(packed, m, params)

  packed, back = roundtrip(delta, cm)
  expect = jax.tree.map(lambda d, m: np.where(m, d, 0), delta, pmask)
  assert _leaves_equal(back, expect)
  n_values = sum(int(np.sum(m)) for m in jax.tree.leaves(pmask))
  n_index = sum(counts.values())
  assert masking.packed_num_bytes(packed) == n_values * 4 + n_index * 4
  assert masking.selected_num_bytes(cm, params) == n_values * 4 + n_index * 4
  assert n_values < sum(p.size for p in jax.tree.leaves(params))
  np.testing.assert_array_equal(packed[CONV1].index, np.flatnonzero(cm[CONV1]))
  # Host-side packing derives the counts from concrete masks.
  one = masking.pack_channels(
    {"d": {"kernel": np.arange(6.0).reshape(2, 3)}}, {("d",): np.array([True, False, True])}
  )
  np.testing.assert_array_equal(one[("d",)].index, [0, 2])
  np.testing.assert_array_equal(one[("d",)].kernel, [[0, 2], [3, 5]])
  assert one[("d",)].bias is None and masking.packed_num_bytes(one) == 4 * 4 + 2 * 4
  # A mask with fewer True entries than its count is padded with an out-of-range index
  # that unpack drops (nothing but the selection comes through).
  short = {**cm, CONV0: jnp.zeros((4,), bool).at[1].set(True)}
  sp, sb = roundtrip(delta, short)
  np.testing.assert_array_equal(sp[CONV0].index, [1, 4])
  np.testing.assert_array_equal(sb["Conv_0"]["bias"], [0, delta["Conv_0"]["bias"][1], 0, 0])
  with pytest.raises(ValueError, match="counts"):
    jax.jit(masking.pack_channels)(delta, cm)


# ----------------------------------------------------------------------------- CDP


def _conv(x, p):
  return (
    jax.lax.conv_general_dilated(
      x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + p["bias"]
  )


def test_layer_outputs_match_manual_forward(setup):
  params, x, _ = setup
  outs = jax.jit(functools.partial(masking.layer_outputs, MODEL))(params, x)
  assert set(outs) == {CONV0, CONV1, DENSE}  # (jit returns dicts with sorted keys)

  @jax.jit
  def manual(params, x):
    h0 = _conv(x, params["Conv_0"])
    h1 = _conv(jax.nn.relu(h0), params["block"]["Conv_0"])
    g = nn.GroupNorm(num_groups=2).apply({"params": params["block"]["GroupNorm_0"]}, h1)
    flat = jax.nn.relu(g).reshape((x.shape[0], -1))
    return h0, h1, flat @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]

  for path, ref in zip((CONV0, CONV1, DENSE), manual(params, x)):
    np.testing.assert_allclose(outs[path], ref, rtol=1e-5, atol=1e-5)
  acts = jax.jit(functools.partial(class_pruning.channel_activations, MODEL))(params, x)
  assert list(acts) == [CONV0, CONV1]  # conv layers only, classifier excluded
  np.testing.assert_allclose(
    acts[CONV1], np.maximum(np.asarray(outs[CONV1]), 0).mean((1, 2)), rtol=1e-5, atol=1e-6
  )


def _tfidf_reference(a, coe=0.0):
  """Loop version of Wang et al.'s calc_tf_idf on class means a [K, C]."""
  a = np.asarray(a, np.float64)
  kk, c = a.shape
  bal = math.log(c / coe * math.e) if coe else 1.0
  out = np.zeros((kk, c))
  for ch in range(c):
    rel = sum(a[k, ch] >= a[:, ch].mean() for k in range(kk))
    idf = math.log(kk / (rel + 1.0))
    for k in range(kk):
      out[k, ch] = a[k, ch] / a[k].sum() * bal * idf if a[k].sum() > 0 else 0.0
  return out


@pytest.mark.slow
def test_cdp_scores_and_prune_mask(setup):
  params, x, y = setup
  n = 28
  valid = jnp.arange(N) < n

  @jax.jit
  def scores_and_acts(params, x, y, valid):
    return (
      class_pruning.class_channel_scores(MODEL, params, x, y, valid, K),
      class_pruning.channel_activations(MODEL, params, x),
    )

  scores, acts = scores_and_acts(params, x, y, valid)
  assert list(scores) == [CONV0, CONV1]
  yy = np.asarray(y)[:n]
  for path in scores:
    a = np.asarray(acts[path])[:n]
    means = np.stack(
      [a[yy == k].mean(0) if np.any(yy == k) else np.zeros(a.shape[1]) for k in range(K)]
    )
    np.testing.assert_allclose(scores[path], _tfidf_reference(means), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
      class_pruning.tfidf_scores({path: means}, coe=2.0)[path],
      _tfidf_reference(means, coe=2.0),
      rtol=1e-4,
      atol=1e-6,
    )
  target = int(yy[0])
  prune = class_pruning.cdp_prune_channels(scores, target, 0.5)
  for path, m in prune.items():
    m = np.asarray(m)
    assert int(np.sum(m)) == math.ceil(0.5 * scores[path].shape[1])
    s = np.asarray(scores[path][target])
    assert np.min(s[m]) >= np.max(s[~m])
  pm = class_pruning.cdp_prune_mask(scores, target, 0.5, params)
  assert not np.any(pm["Dense_0"]["kernel"]) and not np.any(pm["Dense_0"]["bias"])
  pruned = masking.zero_masked(params, pm)
  for path, m in prune.items():
    m, kern = np.asarray(m), np.asarray(_layer(pruned, path)["kernel"])
    assert np.all(kern[..., m] == 0) and np.all(kern[..., ~m] != 0)
  with pytest.raises(ValueError, match="target_class"):
    class_pruning.cdp_prune_channels(scores, K, 0.5)


def test_class_activation_sums_aggregate(setup):
  """Summing two clients' class sums equals one pooled computation (federated CDP)."""
  params, x, y = setup
  sums = jax.jit(lambda p, x, y: class_pruning.class_activation_sums(MODEL, p, x, y, None, K))
  a, b, full = sums(params, x[:16], y[:16]), sums(params, x[16:], y[16:]), sums(params, x, y)
  np.testing.assert_allclose(a.counts + b.counts, full.counts)
  assert float(full.counts.sum()) == N
  for p in full.sums:
    np.testing.assert_allclose(a.sums[p] + b.sums[p], full.sums[p], rtol=1e-5, atol=1e-6)
