"""Image classifiers for federated simulation (Flax linen), for any input H, W >= 1 and C.

    module = create('cnn', num_classes=10)            # MODEL_NAMES lists the choices
    params = init_params(module, key, (28, 28, 1))    # the inner dict, no 'params' key
    logits = module.apply({'params': params}, x)      # x float32 [B, H, W, C] -> [B, K]

Models: `mlp` (2 x 200 ReLU), `cnn` (FedAF's MNIST net: 2 conv + 1 dense), `lenet5`,
`convnet` (the dataset-distillation ConvNet used by QuickDrop: 3 x [conv 3x3 128, instance
norm, ReLU, avg pool 2], dense), `resnet10` / `resnet18` (BasicBlock, 64-128-256-512, with a
3x3 stride-1 stem and no max pool for small images), `resnet20` (CIFAR ResNet, 3 x 3 blocks of
16-32-64) and `vgg11` (CIFAR VGG: 8 conv + 1 dense). Every model is a dataclass;
`create(name, num_classes, **overrides)` sets any field (widths, norm, conv_impl, kernel_init).

Normalisation policy: NO BatchNorm. BatchNorm's running mean/variance are per-client state
outside the gradient that FedAvg cannot average correctly (and mutable collections break the
"a model is its params" contract that masking, EWC and distillation rely on). ResNets and VGG
use GroupNorm with 2 groups (as Reddi et al. 2021, "Adaptive Federated Optimization", and
Hsieh et al. 2020 do for FL), ConvNet uses instance norm (GroupNorm with one channel per group,
affine, as in the dataset-distillation code), the rest use none. So `init` returns only the
'params' collection and `apply` needs no `mutable=`.

Layout: conv kernels [kh, kw, in, out], dense kernels [in, out], biases and norm scales [C].
The OUTPUT channel is the last axis of every kernel (channel masks address it). Layers keep
flax's automatic names (Conv_0, Dense_0, GroupNorm_0, BasicBlock_0/Conv_1, ...).

Small-input rule: every convolution is padding='SAME' (spatial size kept, divided by the
stride rounding up), and every pooling is a 2x2 window with stride 2 that floors an odd size
(drops the last row/column, as PyTorch's MaxPool2d(2)) and leaves an axis of size 1 alone.
So no layer fails on 8x8 digits: e.g. cnn 28 -> 14 -> 7, 8 -> 4 -> 2; vgg11 32 -> 1,
8 -> 4 -> 2 -> 1 -> 1 -> 1. Consequence: the flattening models (mlp, cnn, lenet5, convnet, vgg11)
have a first dense layer whose size depends on the input shape given to `init_params`;
ResNets end in global average pooling and do not. (Deviations from the PyTorch originals for
28x28: cnn/lenet5 convs are SAME instead of VALID, so their dense layers are wider.)

Convolution implementations (`conv_impl` field of every model, see `conv2d`):
  'xla'        lax.conv_general_dilated; supports every autodiff mode.
  'canonical'  the same forward, with a custom VJP whose two backward convolutions are written
               with explicit transposes in canonical NHWC/HWIO form. On XLA:CPU the default
               backward convs (kernel gradient with batch/feature swapped) take a slow generic
               path inside loops; with this VJP a train step inside lax.scan / lax.map runs as
               fast as a plain jitted step. Reverse mode of any order works; forward mode
               (jax.jvp, jacfwd, hessian) does not (custom_vjp).
  'im2col'     patches from shifted strided slices, then one matmul [.., kh*kw*in] @ [kh*kw*in,
               out]. No convolution op at all, so vmap over clients with separate weights
               becomes a batched matmul instead of XLA:CPU's slow grouped convolution.
All three give the same outputs and gradients (to float32 rounding) and the same params, so
a model can be re-created with another impl and keep its params. Which is fastest depends on the
program shape (benchmarks/conv_impl.py; figures in BUILD.md): plain jit -> xla or canonical;
step inside scan / lax.map -> canonical; vmap over clients or examples with separate weights ->
im2col.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MODEL_NAMES = ("mlp", "cnn", "lenet5", "convnet", "resnet10", "resnet18", "resnet20", "vgg11")
CONV_IMPLS = ("xla", "canonical", "im2col")
NORMS = ("group", "instance", "none")

Initializer = Callable[..., Any]
default_kernel_init = nn.initializers.lecun_normal()  # flax's nn.Conv / nn.Dense default
_DN = ("NHWC", "HWIO", "NHWC")
_EPS = 1e-5  # PyTorch's GroupNorm epsilon


# ---------------------------------------------------------------------------------------------
# Convolution


def _pair(v, what):
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f"{what} must be an int or a pair, got {v!r}")
  return v


def conv_padding(in_hw, kernel_hw, strides, padding):
  """Explicit ((lo, hi), (lo, hi)) pads for 'SAME' | 'VALID' | int | ((lo, hi), (lo, hi))."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(
        f"padding must be 'SAME', 'VALID', an int or two (lo, hi) pairs, got {padding!r}"
      )
    return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(tuple(int(a) for a in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding must be two (lo, hi) pairs, got {padding!r}")
  return pads


def _xla_conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, kernel, strides, pads):
  return _xla_conv(x, kernel, strides, pads)


def _canonical_fwd(x, kernel, strides, pads):
  return _xla_conv(x, kernel, strides, pads), (x, kernel)


def _canonical_bwd(strides, pads, res, g):
  """y = conv(pad(x), k, stride s)  =>
  dx = conv(dilate_s(g), flip(k) with in/out swapped)   (transposed convolution)
  dk[i, j, c, o] = sum_{b, h, w} pad(x)[b, s h + i, s w + j, c] g[b, h, w, o]
                 = conv with batch and feature axes swapped, kernel g dilated by s.
  Both are written as NHWC x HWIO convolutions on explicitly transposed copies."""
  x, kernel = res
  kh, kw = kernel.shape[:2]
  n, m = x.shape[1:3], g.shape[1:3]
  flipped = jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))
  tpads = [
    (k - 1 - lo, nn_ - (mm - 1) * s - 1 + lo)
    for k, (lo, _), nn_, mm, s in zip((kh, kw), pads, n, m, strides)
  ]
  dx = lax.conv_general_dilated(
    g, flipped, (1, 1), tpads, lhs_dilation=strides, dimension_numbers=_DN
  )
  dk = lax.conv_general_dilated(
    jnp.transpose(x, (3, 1, 2, 0)),
    jnp.transpose(g, (1, 2, 0, 3)),
    (1, 1),
    pads,
    rhs_dilation=strides,
    dimension_numbers=_DN,
  )
  dk = jnp.transpose(dk[:, :kh, :kw, :], (1, 2, 0, 3))
  return dx, dk.astype(kernel.dtype)


_canonical_conv.defvjp(_canonical_fwd, _canonical_bwd)


def _im2col_conv(x, kernel, strides, pads):
  """Patches [B, H', W', kh*kw*in] ordered (i, j, c), matching kernel.reshape(-1, out)."""
  kh, kw, c, out = kernel.shape
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  b, hp, wp, _ = xp.shape
  sh, sw = strides
  oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  cols = [
    lax.slice(
      xp, (0, i, j, 0), (b, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return patches @ kernel.reshape(kh * kw * c, out)


_CONV_FNS = {"xla": _xla_conv, "canonical": _canonical_conv, "im2col": _im2col_conv}


def conv2d(x, kernel, strides=1, padding="SAME", impl="xla"):
  """2-D convolution (cross-correlation, as nn.Conv), NHWC input, HWIO kernel.

  x: [..., H, W, in] (any number of leading batch axes, or none); kernel: [kh, kw, in, out].
  Returns [..., H', W', out] with H' = ceil(H / s) for 'SAME', (H - kh) // s + 1 for 'VALID'.
  impl: one of CONV_IMPLS (see the module docstring).
  """
  if impl not in _CONV_FNS:
    raise ValueError(f"conv impl {impl!r} is not one of {CONV_IMPLS}")
  strides = _pair(strides, "strides")
  if x.ndim < 3 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(
      f"conv2d needs x [..., H, W, C] and kernel [kh, kw, C, out], got {x.shape} and {kernel.shape}"
    )
  lead = x.shape[:-3]
  x4 = x.reshape((-1,) + x.shape[-3:])
  pads = conv_padding(x4.shape[1:3], kernel.shape[:2], strides, padding)
  y = _CONV_FNS[impl](x4, kernel, strides, pads)
  return y.reshape(lead + y.shape[1:])


class Conv(nn.Module):
  """Drop-in for nn.Conv (same 'kernel' [kh, kw, in, out] and 'bias' [out] params and default
  initialisers) with a selectable implementation `impl` in CONV_IMPLS."""

  # Output channel c depends only on kernel[..., c] and bias[c]: masking.channel_effects may
  # zero the output instead of the parameters (one forward up to this layer, not C of them).
  channel_output_maskable = True
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  use_bias: bool = True
  impl: str = "xla"
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair(self.kernel_size, "kernel_size")
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32
    )
    y = conv2d(x, kernel.astype(x.dtype), self.strides, self.padding, self.impl)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# Pooling and normalisation


def pool2(x, kind="max"):
  """2x2 pooling with stride 2 over the H, W axes of [..., H, W, C].

  An odd size is floored (last row/column dropped, as PyTorch's MaxPool2d(2) / AvgPool2d(2));
  an axis of size 1 is left unpooled, so this never fails on small maps. Written as
  crop + reshape + reduce rather than reduce_window: same values, and on XLA:CPU its gradient
  is elementwise instead of select-and-scatter (faster train steps; BUILD.md).
  """
  if kind not in ("max", "avg"):
    raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")
  *lead, h, w, c = x.shape
  fh, fw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
  if fh == fw == 1:
    return x
  x = x[..., : h // fh * fh, : w // fw * fw, :].reshape(*lead, h // fh, fh, w // fw, fw, c)
  reduce = jnp.max if kind == "max" else jnp.mean
  return reduce(x, axis=(-4, -2))


def _norm(kind, groups, x):
  """'group' (`groups` groups), 'instance' (one channel per group) or 'none'; affine."""
  if kind == "none":
    return x
  if kind == "group":
    return nn.GroupNorm(num_groups=groups, epsilon=_EPS)(x)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=_EPS)(x)
  raise ValueError(f"norm {kind!r} is not one of {NORMS}")


def _flatten(x):
  return x.reshape(x.shape[:-3] + (-1,))


# ---------------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
  """Flatten -> [Dense(h) -> ReLU] for h in hidden -> Dense(num_classes)."""

  num_classes: int
  hidden: Sequence[int] = (200, 200)
  conv_impl: str = "xla"  # unused; every model has the field
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    x = _flatten(x)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


class CNN(nn.Module):
  """FedAF's MNIST net ("2 convolutional layers followed by 1 fully-connected layer"; the paper
  gives no sizes, these are the common PyTorch MNIST ones): [Conv 5x5 f -> ReLU -> max pool 2]
  for f in (32, 64) -> flatten -> [Dense(h) -> ReLU for h in hidden] -> Dense(num_classes)."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  kernel_size: int = 5
  hidden: Sequence[int] = ()
  conv_impl: str = "xla"
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    for f in self.features:
      x = Conv(f, (self.kernel_size,) * 2, impl=self.conv_impl, kernel_init=self.kernel_init)(x)
      x = pool2(nn.relu(x), "max")
    x = _flatten(x)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling: Conv 5x5 6 -> pool -> Conv 5x5 16
  -> pool -> Dense 120 -> Dense 84 -> Dense(num_classes). Convs are SAME (see module doc)."""

  num_classes: int
  conv_impl: str = "xla"
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    for f in (6, 16):
      x = Conv(f, (5, 5), impl=self.conv_impl, kernel_init=self.kernel_init)(x)
      x = pool2(nn.relu(x), "max")
    x = _flatten(x)
    for h in (120, 84):
      x = nn.relu(nn.Dense(h, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


class ConvNet(nn.Module):
  """Dataset-distillation ConvNet (Zhao et al. 2021, used by QuickDrop): depth x [Conv 3x3
  width -> norm -> ReLU -> avg pool 2] -> flatten -> Dense(num_classes). norm: instance | group
  | none. (The DC code pads MNIST's first conv by 3 to reach 32x32; we do not.)"""

  num_classes: int
  width: int = 128
  depth: int = 3
  norm: str = "instance"
  norm_groups: int = 2  # only for norm='group'
  conv_impl: str = "xla"
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = Conv(self.width, (3, 3), impl=self.conv_impl, kernel_init=self.kernel_init)(x)
      x = pool2(nn.relu(_norm(self.norm, self.norm_groups, x)), "avg")
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(_flatten(x))


class BasicBlock(nn.Module):
  """relu(norm(conv3x3(relu(norm(conv3x3_s(x))))) + shortcut(x)); the shortcut is
  norm(conv1x1_s(x)) when the stride or width changes (projection, He et al.'s option B)."""

  features: int
  strides: int = 1
  norm: str = "group"
  norm_groups: int = 2
  conv_impl: str = "xla"
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(
      Conv, use_bias=False, impl=self.conv_impl, kernel_init=self.kernel_init
    )
    y = conv(self.features, (3, 3), self.strides)(x)
    y = nn.relu(_norm(self.norm, self.norm_groups, y))
    y = _norm(self.norm, self.norm_groups, conv(self.features, (3, 3))(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _norm(self.norm, self.norm_groups, conv(self.features, (1, 1), self.strides)(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Stem Conv 3x3 widths[0] (stride 1, no max pool) -> norm -> ReLU -> stages of BasicBlocks
  (first stage stride 1, later stages stride 2) -> global average pool -> Dense(num_classes).
  Convs have no bias (a norm follows each); with norm='none' they still have none."""

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  norm: str = "group"
  norm_groups: int = 2
  conv_impl: str = "xla"
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"stage_sizes {self.stage_sizes} and widths {self.widths} differ in length")
    x = Conv(
      self.widths[0], (3, 3), use_bias=False, impl=self.conv_impl, kernel_init=self.kernel_init
    )(x)
    x = nn.relu(_norm(self.norm, self.norm_groups, x))
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        x = BasicBlock(
          width,
          2 if i > 0 and j == 0 else 1,
          self.norm,
          self.norm_groups,
          self.conv_impl,
          self.kernel_init,
        )(x)
    x = jnp.mean(x, axis=(-3, -2))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
  """CIFAR VGG: cfg of Conv 3x3 widths (-> norm -> ReLU) and 'M' (max pool 2) -> flatten ->
  [Dense(h) -> ReLU for h in hidden] -> Dense(num_classes). 32x32 inputs flatten to 512."""

  num_classes: int
  cfg: Sequence[Any] = VGG11_CFG
  hidden: Sequence[int] = ()
  norm: str = "group"
  norm_groups: int = 2
  conv_impl: str = "xla"
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    for v in self.cfg:
      if v == "M":
        x = pool2(x, "max")
      else:
        x = Conv(int(v), (3, 3), impl=self.conv_impl, kernel_init=self.kernel_init)(x)
        x = nn.relu(_norm(self.norm, self.norm_groups, x))
    x = _flatten(x)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


_MAKERS = {
  "mlp": MLP,
  "cnn": CNN,
  "lenet5": LeNet5,
  "convnet": ConvNet,
  "resnet10": functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), widths=(64, 128, 256, 512)),
  "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
  "resnet20": functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64)),
  "vgg11": functools.partial(VGG, cfg=VGG11_CFG),
}
assert tuple(_MAKERS) == MODEL_NAMES


def create(name: str, num_classes: int, **overrides) -> nn.Module:
  """The model `name` (one of MODEL_NAMES) with `num_classes` outputs; `overrides` set fields,
  e.g. create('resnet20', 10, conv_impl='im2col', norm='none')."""
  if name not in _MAKERS:
    raise ValueError(f"unknown model {name!r}; allowed: {MODEL_NAMES}")
  maker = _MAKERS[name]
  cls = maker.func if isinstance(maker, functools.partial) else maker
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"model {name!r} has no field(s) {bad}; allowed: {sorted(fields)}")
  if overrides.get("conv_impl", "xla") not in CONV_IMPLS:
    raise ValueError(f"conv_impl {overrides['conv_impl']!r} is not one of {CONV_IMPLS}")
  if overrides.get("norm", "group") not in NORMS:
    raise ValueError(f"norm {overrides['norm']!r} is not one of {NORMS}")
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  # Config files give lists; module fields must be hashable.
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return maker(num_classes=int(num_classes), **overrides)


def with_conv_impl(module: nn.Module, impl: str) -> nn.Module:
  """The same model (same parameters, same outputs) computing its convolutions with `impl`,
  if it uses XLA's own ('xla'); a model that already chose an implementation, or has no
  convolutions, is returned as is. See CONV_IMPLS for which program shape wants which."""
  if getattr(module, "conv_impl", None) == "xla":
    return module.clone(conv_impl=impl)
  return module


@functools.partial(jax.jit, static_argnums=0)
def _init(module: nn.Module, key, x):
  # module static (equal modules hash equally): one compile per architecture and shape,
  # where jax.jit(module.init) per call compiled again for every new module object.
  return module.init(key, x)


def init_params(module: nn.Module, key, input_shape: tuple[int, int, int]):
  """Parameters of `module` for inputs of shape `input_shape` = (H, W, C).

  Returns variables['params'] (the inner dict). Raises if the module created any other
  collection (e.g. batch statistics), which would break federated averaging.
  """
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape}")
  variables = _init(module, key, np.zeros((1,) + tuple(input_shape), np.float32))
  extra = set(variables) - {"params"}
  if extra:
    raise ValueError(
      f"model has non-param collections {sorted(extra)}; fu_jax models must be "
      f"pure params (no BatchNorm)"
    )
  return variables["params"]


@dataclasses.dataclass(frozen=True)
class LogitsFn:
  """`apply_fn(params, x) -> logits` of a Flax module: fu_jax's model convention.

  Equal modules give equal (and equally hashing) LogitsFn objects, so a jit cache keyed on
  apply_fn (a static argument, or jax.jit(apply_fn)) hits across calls, where a fresh
  `lambda p, x: module.apply({'params': p}, x)` per call would recompile.
  """

  module: nn.Module

  def __call__(self, params, x):
    return self.module.apply({"params": params}, x)


def logits_fn(module: nn.Module) -> LogitsFn:
  """The (params, x) -> logits function every fu_jax transform, runner and metric takes."""
  return LogitsFn(module)
