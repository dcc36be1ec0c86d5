"""Tests for fu_jax.models.

Shape/layout checks run under jax.eval_shape (tracing only, no compilation) so every model x
input size is covered cheaply; numerics are checked on small convolutions and the cnn.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fu_jax import models

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]
# The big models on fewer sizes to keep the file fast (8x8 is the pooling edge case).
CASES = [
  (name, shape)
  for name in models.MODEL_NAMES
  for shape in SHAPES
  if not (name == "resnet18" and shape != (32, 32, 3))
  and not (name in ("vgg11", "resnet20") and shape == (28, 28, 1))
]
KEY = jax.random.PRNGKey(0)

# name -> (conv layers, dense layers, last dense kernel shape given 7 classes, or None when it
# depends on the input size). resnet18: stem + 8 blocks x 2 + 3 projections; resnet20: stem +
# 9 blocks x 2 + 2 projections; vgg11 flattens 1x1x512 at 8x8 and 32x32.
EXPECTED = {
  "mlp": (0, 3, (200, 7)),
  "cnn": (2, 1, None),
  "lenet5": (2, 3, (84, 7)),
  "convnet": (3, 1, None),
  "resnet10": (12, 1, (512, 7)),
  "resnet18": (20, 1, (512, 7)),
  "resnet20": (21, 1, (64, 7)),
  "vgg11": (8, 1, (512, 7)),
}


def _abstract(module, shape, batch=3):
  """(logits, variables without intermediates, intermediates) as shapes; traces once."""
  x = jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
  logits, variables = jax.eval_shape(
    lambda k, x: module.init_with_output(k, x, capture_intermediates=True), KEY, x
  )
  variables = dict(variables)
  return logits, variables, variables.pop("intermediates")


def _layers(tree, path=()):
  """(path, dict) for every sub-dict that holds a 'kernel'."""
  if "kernel" in tree:
    yield path, tree
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _layers(v, path + (k,))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


@pytest.mark.parametrize("name,shape", CASES)
def test_logits_shape_params_only_and_output_axis_last(name, shape):
  module = models.create(name, 7)
  logits, variables, inter = _abstract(module, shape)
  assert logits.shape == (3, 7)
  assert set(variables) == {"params"}
  layers = list(_layers(variables["params"]))
  for path, layer in layers:
    kernel, out = layer["kernel"], _get(inter, path)["__call__"][0]
    assert kernel.ndim in (2, 4), path
    # The layer's output channel count is the kernel's LAST axis (and the bias's only axis).
    assert out.shape[-1] == kernel.shape[-1], path
    if "bias" in layer:
      assert layer["bias"].shape == (kernel.shape[-1],), path
    if kernel.ndim == 4:
      assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] in (1, 3, 5), path
  convs = [l["kernel"].shape for _, l in layers if l["kernel"].ndim == 4]
  dense = [l["kernel"].shape for _, l in layers if l["kernel"].ndim == 2]
  n_conv, n_dense, last = EXPECTED[name]
  assert (len(convs), len(dense)) == (n_conv, n_dense)
  assert dense[-1] == (last or (dense[-1][0], 7))
  for p, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
    if any("GroupNorm" in str(k) for k in p):
      assert leaf.ndim == 1  # norm scale/bias [C]
  if name == "cnn" and shape == (28, 28, 1):
    # SAME 5x5 convs and two 2x pools: 28 -> 14 -> 7, then 7x7x64 -> dense.
    assert jax.tree.map(lambda a: a.shape, variables["params"]) == {
      "Conv_0": {"kernel": (5, 5, 1, 32), "bias": (32,)},
      "Conv_1": {"kernel": (5, 5, 32, 64), "bias": (64,)},
      "Dense_0": {"kernel": (7 * 7 * 64, 7), "bias": (7,)},
    }
  if name == "convnet":
    side = {8: 1, 28: 3, 32: 4}[shape[0]]  # 8->4->2->1, 28->14->7->3, 32->16->8->4
    assert dense[-1] == (side * side * 128, 7)


def test_overrides_and_errors():
  with pytest.raises(ValueError, match="resnet18"):
    models.create("resnet99", 10)
  with pytest.raises(ValueError, match="'mlp'.*'vgg11'"):
    models.create("nope", 10)
  with pytest.raises(ValueError, match="im2col"):
    models.create("cnn", 10, conv_impl="fft")
  with pytest.raises(ValueError, match="no field"):
    models.create("cnn", 10, width=3)
  with pytest.raises(ValueError, match="norm"):
    models.create("convnet", 10, norm="batch")
  m = models.create("convnet", 5, width=16, depth=2, norm="none")
  assert models.create("mlp", 3, hidden=[4, 5]).hidden == (4, 5)  # lists from configs
  logits, v, _ = _abstract(m, (8, 8, 1))
  assert logits.shape == (3, 5) and v["params"]["Conv_1"]["kernel"].shape == (3, 3, 16, 16)
  assert "GroupNorm_0" not in v["params"]


def test_init_params_returns_inner_dict_and_rejects_batchnorm():
  module = models.create("mlp", 4, hidden=())
  params = models.init_params(module, KEY, (8, 8, 1))
  assert jax.tree.map(lambda a: a.shape, params) == {"Dense_0": {"kernel": (64, 4), "bias": (4,)}}
  assert float(jnp.std(params["Dense_0"]["kernel"])) > 0.05  # initialised, not zeros
  logits = module.apply({"params": params}, jnp.ones((2, 8, 8, 1)))
  assert logits.shape == (2, 4) and bool(jnp.all(jnp.isfinite(logits)))

  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(x.reshape(x.shape[0], -1))

  with pytest.raises(ValueError, match="batch_stats"):
    models.init_params(BN(), KEY, (2, 2, 1))
  with pytest.raises(ValueError, match="input_shape"):
    models.init_params(module, KEY, (8, 8))


def _np_pool(x, kind):
  b, h, w, c = x.shape
  fh, fw = (2 if h > 1 else 1), (2 if w > 1 else 1)
  out = np.zeros((b, h // fh, w // fw, c), np.float32)
  for i in range(h // fh):
    for j in range(w // fw):
      win = x[:, i * fh : (i + 1) * fh, j * fw : (j + 1) * fw, :]
      out[:, i, j] = win.max((1, 2)) if kind == "max" else win.mean((1, 2))
  return out


@pytest.mark.parametrize("hw", [(4, 6), (5, 7), (1, 5), (3, 1), (1, 1)])
def test_pool2_matches_loop(hw):
  x = np.random.default_rng(0).standard_normal((2,) + hw + (3,)).astype(np.float32)
  for kind in ("max", "avg"):
    np.testing.assert_allclose(
      models.pool2(jnp.asarray(x), kind), _np_pool(x, kind), rtol=1e-6, atol=1e-6
    )
  with pytest.raises(ValueError, match="max"):
    models.pool2(jnp.asarray(x), "min")


def _np_conv(x, k, s, pads):
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  kh, kw, _, o = k.shape
  oh, ow = (xp.shape[1] - kh) // s + 1, (xp.shape[2] - kw) // s + 1
  y = np.zeros((x.shape[0], oh, ow, o))
  for i in range(oh):
    for j in range(ow):
      y[:, i, j] = np.einsum("bhwc,hwco->bo", xp[:, i * s : i * s + kh, j * s : j * s + kw], k)
  return y


# (x shape, kernel size, stride, padding)
CONV_CASES = [
  ((2, 7, 6, 3), 3, 1, "SAME"),
  ((2, 8, 7, 2), 3, 2, "SAME"),
  ((1, 7, 7, 3), 1, 2, "SAME"),
  ((2, 9, 8, 2), 3, 2, "VALID"),
  ((1, 6, 5, 2), 3, 1, ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("xshape,ks,s,pad", CONV_CASES)
def test_conv2d_impls_match_loop_values_and_gradients(xshape, ks, s, pad):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(xshape).astype(np.float32)
  k = rng.standard_normal((ks, ks, xshape[-1], 4)).astype(np.float32)
  pads = models.conv_padding(xshape[1:3], (ks, ks), (s, s), pad)
  ref = _np_conv(x, k, s, pads)
  g = rng.standard_normal(ref.shape).astype(np.float32)

  @jax.jit
  def all_impls(x, k, g):
    out = {}
    for impl in models.CONV_IMPLS:
      y, vjp = jax.vjp(lambda x, k: models.conv2d(x, k, s, pad, impl), x, k)
      out[impl] = (y,) + vjp(g)
    return out

  out = all_impls(x, k, g)
  # Independent reference for the gradients: finite differences of <g, conv(x, k)> are exact
  # here (linear), so use the adjoint identity <g, conv(x, k)> = <dx, x> = <dk, k>.
  inner = float(np.sum(g * ref))
  for impl, (y, dx, dk) in out.items():
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4, err_msg=impl)
    np.testing.assert_allclose(np.sum(dx * x), inner, rtol=1e-4, atol=1e-3, err_msg=impl)
    np.testing.assert_allclose(np.sum(dk * k), inner, rtol=1e-4, atol=1e-3, err_msg=impl)
    np.testing.assert_allclose(dx, out["xla"][1], rtol=1e-4, atol=1e-4, err_msg=impl)
    np.testing.assert_allclose(dk, out["xla"][2], rtol=1e-4, atol=1e-4, err_msg=impl)


def test_conv2d_leading_axes_and_bad_input():
  x = jnp.ones((2, 3, 6, 6, 2))
  k = jnp.ones((3, 3, 2, 4))
  y, y12 = jax.jit(
    lambda x, k: (models.conv2d(x, k, impl="im2col"), models.conv2d(x[1, 2], k, impl="xla"))
  )(x, k)
  assert y.shape == (2, 3, 6, 6, 4) and y12.shape == (6, 6, 4)
  np.testing.assert_allclose(y[1, 2], y12, rtol=1e-6)
  assert float(y12[0, 0, 0]) == 8.0 and float(y12[2, 2, 0]) == 18.0  # corner / interior sums
  with pytest.raises(ValueError, match="conv impl"):
    models.conv2d(x, k, impl="winograd")
  with pytest.raises(ValueError, match="padding"):
    models.conv2d(x, k, padding="FULL")


def test_canonical_second_order_matches_xla():
  # QuickDrop differentiates a gradient-matching loss through grad(): reverse-over-reverse.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 2)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)

  @jax.jit
  def both(x, k):
    def outer(impl):
      def inner_grad(x):
        return jax.grad(lambda k: jnp.sum(jnp.tanh(models.conv2d(x, k, 2, "SAME", impl))))(k)

      return jax.grad(lambda x: jnp.sum(jnp.sin(inner_grad(x))))(x)

    return outer("xla"), outer("canonical"), outer("im2col")

  ref, canon, im2col = both(x, k)
  np.testing.assert_allclose(canon, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(im2col, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_vmap_over_clients_with_separate_kernels():
  # The runners vmap client updates: per-client kernels and data, gradients w.r.t. both.
  rng = np.random.default_rng(4)
  xs = jnp.asarray(rng.standard_normal((2, 3, 5, 5, 2)), jnp.float32)
  ks = jnp.asarray(rng.standard_normal((2, 3, 3, 2, 3)), jnp.float32)

  def grads(impl):
    loss = lambda x, k: jnp.sum(jnp.sin(models.conv2d(x, k, 2, "SAME", impl)))
    return jax.vmap(jax.grad(loss, argnums=(0, 1)))(xs, ks)

  out = jax.jit(lambda: {i: grads(i) for i in models.CONV_IMPLS})()
  for c in range(2):  # per-client reference, computed without vmap
    ref = jax.grad(lambda x, k: jnp.sum(jnp.sin(models.conv2d(x, k, 2))), (0, 1))(xs[c], ks[c])
    for impl in models.CONV_IMPLS:
      np.testing.assert_allclose(out[impl][0][c], ref[0], rtol=1e-4, atol=1e-5, err_msg=impl)
      np.testing.assert_allclose(out[impl][1][c], ref[1], rtol=1e-4, atol=1e-5, err_msg=impl)


@pytest.mark.slow
def test_cnn_impls_same_outputs_and_gradients():
  shape = (28, 28, 1)
  rng = np.random.default_rng(3)
  # Random params of the right shapes without compiling an initialiser (init_params is tested
  # above): N(0, 1/fan_in) kernels, small random biases.
  shapes = jax.eval_shape(models.create("cnn", 10).init, KEY, jnp.zeros((1,) + shape))["params"]
  params = jax.tree.map(
    lambda a: jnp.asarray(
      rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1])), jnp.float32
    ),
    shapes,
  )
  x = jnp.asarray(rng.standard_normal((4,) + shape), jnp.float32)
  y = jnp.arange(4) % 10

  @jax.jit
  def all_impls(params, x):
    out = {}
    for impl in models.CONV_IMPLS:
      m = models.create("cnn", 10, conv_impl=impl)

      def loss(p):
        logits = m.apply({"params": p}, x)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(4), y]), logits

      out[impl] = jax.grad(loss, has_aux=True)(params)
    return out

  out = all_impls(params, x)
  ref_grads, ref_logits = out["xla"]
  assert float(jnp.std(ref_logits)) > 1e-3
  for impl in ("canonical", "im2col"):
    grads, logits = out[impl]
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads, ref_grads
    )
  # Same parameter tree whichever implementation initialised it.
  for impl in ("canonical", "im2col"):
    p2 = jax.eval_shape(models.create("cnn", 10, conv_impl=impl).init, KEY, x)["params"]
    assert jax.tree.map(lambda a: a.shape, p2) == jax.tree.map(lambda a: a.shape, params)
