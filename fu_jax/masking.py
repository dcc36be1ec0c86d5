"""Channel effects, channel masks, masked updates and channel packing.

Implements the channel-explanation unlearning of Xu et al., "Update Selective Parameters:
Federated Machine Unlearning Based on Model Explanation".
The TF-IDF channel scores of the CDP baseline (Wang et al.) are in `fu_jax.cdp`.

Conventions (Flax): a *layer* is any dict in the params tree holding a 'kernel' leaf; its
output channels are the LAST axis of the kernel and the only axis of its 'bias'. A layer is
addressed by its path, a tuple of dict keys (e.g. ('Conv_0',) or ('block1', 'Dense_0')).
Channel masks are dicts path -> bool [C]; parameter masks are pytrees shaped like params.

Choices the Xu et al. paper leaves open, and what we do:
- Layers: Algorithm 1 iterates over "all layers in model M*" and Sec. 4.2 gives both conv and
  linear layers as parameterised layers, so every conv/dense layer is scored, the final
  classifier included (its output channels are the class logits). Restrict with `layers=`.
- Pruning a channel zeroes its kernel slice and its bias entry (Def. 4, Fig. 4: the output
  channel of the layer becomes 0). A norm layer that follows is not touched.
- Order: Alg. 1 line 12 says "sort from small to large", but the text (Sec. 4.3, 4.5) keeps
  the channels with the HIGHEST effect; we follow the text. Count per layer: ceil(delta * C).
- Ties: accuracy on a small batch has few distinct values, so ties are common and the paper
  does not break them. With `metric='both'` we break accuracy ties by the loss increase
  (then by channel index). This never overrides the paper's accuracy order; it only
  chooses among channels the paper ranks equal.
"""

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import losses
from fu_jax import tree as tu

__all__ = [
  "channel_layers",
  "zero_channel",
  "ChannelEffects",
  "channel_effects",
  "num_selected",
  "top_delta_channels",
  "random_channels",
  "channel_mask_to_param_mask",
  "top_delta_mask",
  "random_mask",
  "zero_masked",
  "MaskedUpdateState",
  "init_masked_state",
  "set_mask",
  "masked_update",
  "PackedLayer",
  "channel_counts",
  "pack_channels",
  "unpack_channels",
  "packed_num_bytes",
  "selected_num_bytes",
  "layer_outputs",
]

Path = tuple  # tuple of dict keys

_METRICS = ("acc", "loss", "both")


# ----------------------------------------------------------------------------- layers


def _natural_key(path):
  """Sort key: 'Conv_2' before 'Conv_10'."""
  out = []
  for k in path:
    parts = []
    for chunk in _split_digits(str(k)):
      parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
    out.append(tuple(parts))
  return tuple(out)


def _split_digits(s):
  chunks, cur = [], ""
  for ch in s:
    if cur and (ch.isdigit() != cur[-1].isdigit()):
      chunks.append(cur)
      cur = ""
    cur += ch
  if cur:
    chunks.append(cur)
  return chunks


def _walk_layers(tree, prefix, out):
  if hasattr(tree, "items"):
    if "kernel" in tree and not hasattr(tree["kernel"], "items"):
      out.append((prefix, tree))
    for k, v in tree.items():
      if hasattr(v, "items"):
        _walk_layers(v, prefix + (k,), out)


def _layer_dicts(params):
  out = []
  _walk_layers(params, (), out)
  out.sort(key=lambda pv: _natural_key(pv[0]))
  return out


def channel_layers(params) -> list:
  """Every conv/dense layer as (path, num_out), sorted by path (natural order of names).

  The order is name-based (Conv_2 < Conv_10), so it is the same after any jax.tree.map
  (which re-sorts dict keys); for flat auto-named models (Conv_0, Conv_1, Dense_0) it is
  also the forward order. layer_outputs gives the true call order.
  """
  return [(path, int(d["kernel"].shape[-1])) for path, d in _layer_dicts(params)]


def _get(params, path):
  node = params
  for k in path:
    if not hasattr(node, "items") or k not in node:
      raise ValueError(
        f"layer path {path!r} not found in params; layers are "
        f"{[p for p, _ in channel_layers(params)]}"
      )
    node = node[k]
  if not hasattr(node, "items") or "kernel" not in node:
    raise ValueError(
      f"{path!r} is not a layer (no kernel); layers are {[p for p, _ in channel_layers(params)]}"
    )
  return node


def _keypath(kp):
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in kp)


def _map_layer_leaves(fn, params, layer_paths):
  """Maps fn(layer_path, leaf_name, leaf) over 'kernel'/'bias' leaves of the given layers."""
  layer_paths = set(layer_paths)

  def f(kp, leaf):
    path = _keypath(kp)
    if len(path) >= 1 and path[:-1] in layer_paths and path[-1] in ("kernel", "bias"):
      return fn(path[:-1], path[-1], leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(f, params)


def _scale_channels(params, path, m):
  """params with layer `path`'s output channels multiplied by m [C] (kernel slice and bias)."""

  def fn(_, name, leaf):
    if name == "kernel" or leaf.shape == m.shape:
      return leaf * m.astype(leaf.dtype)
    return leaf

  return _map_layer_leaves(fn, params, [path])


def zero_channel(params, layer_path, channel: int):
  """params with output channel `channel` of layer `layer_path` zeroed (kernel[..., c], bias[c]).

  The reference, one-channel-at-a-time version of what `channel_effects` vectorises.
  """
  layer_path = tuple(layer_path)
  c = int(_get(params, layer_path)["kernel"].shape[-1])
  if not 0 <= channel < c:
    raise ValueError(
      f"channel={channel} out of range for layer {layer_path!r} with {c} output channels"
    )

  def fn(_, name, leaf):
    if name == "kernel":
      return jnp.asarray(leaf).at[..., channel].set(0)
    if leaf.shape == (c,):
      return jnp.asarray(leaf).at[channel].set(0)
    return leaf

  return _map_layer_leaves(fn, params, [layer_path])


# ----------------------------------------------------------------------------- effects


class ChannelEffects(NamedTuple):
  """Both effects of every channel: acc = accuracy drop, loss = CE increase (dicts path->[C])."""

  acc: dict
  loss: dict


def _acc_loss(apply_fn, params, x, y, valid):
  logits = apply_fn(params, x)
  acc = losses.masked_mean(losses.correct(logits, y), valid)
  loss = losses.masked_mean(losses.cross_entropy(logits, y), valid)
  return acc, loss


def _resolve_layers(params, layers):
  all_layers = channel_layers(params)
  if layers is None:
    return all_layers
  by_path = dict(all_layers)
  out = []
  for p in layers:
    p = tuple(p)
    if p not in by_path:
      raise ValueError(f"layer {p!r} not in params; layers are {list(by_path)}")
    out.append((p, by_path[p]))
  return out


def _chunked_map(f, xs, chunk_size):
  """vmap f over the rows of xs in ceil(n / chunk_size) balanced chunks (lax.map over chunks).

  Rows are padded to n_chunks * rows_per_chunk by repeating the last row (results dropped);
  padding is < n_chunks rows. One traced body (no separate remainder), so compiles once.
  """
  n = xs.shape[0]
  n_chunks = -(-n // chunk_size)
  if n_chunks == 1:
    return jax.vmap(f)(xs)
  per = -(-n // n_chunks)
  pad = n_chunks * per - n
  if pad:
    xs = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, axis=0)], axis=0)
  out = jax.lax.map(jax.vmap(f), xs.reshape((n_chunks, per) + xs.shape[1:]))
  return jax.tree.map(lambda o: o.reshape((n_chunks * per,) + o.shape[2:])[:n], out)


# Layers whose output channel c is a function of kernel[..., c] and bias[c] only (and linear
# in them), so zeroing the output channel == zeroing the kernel slice and bias entry. Other
# modules opt in with a class attribute `channel_output_maskable = True`.
_OUTPUT_MASKABLE = (nn.Dense, nn.Conv, nn.ConvTranspose)


def _is_output_maskable(mod):
  return (
    isinstance(mod, _OUTPUT_MASKABLE)
    or getattr(type(mod), "channel_output_maskable", False) is True
  )


_METHODS = ("auto", "output", "params")


def _output_masker(path, m, seen):
  """flax interceptor: multiplies the output of the layer module at `path` by m [C]."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and _is_output_maskable(mod):
      mpath = tuple(mod.path)
      seen.add(mpath)
      if mpath == path:
        return out * m.astype(out.dtype)
    return out

  return interceptor


def _output_maskable_layers(apply_fn, params, x):
  """Layer paths whose output a flax interceptor can mask (one abstract trace, no compile)."""
  seen = set()

  def f(p, xx):
    with nn.intercept_methods(_output_masker((), jnp.ones(()), seen)):
      return apply_fn(p, xx)

  jax.eval_shape(f, params, x)
  return seen


def channel_effects(
  apply_fn: Callable,
  params,
  x,
  y,
  mask=None,
  *,
  metric: str = "acc",
  chunk_size: int = 64,
  layers: Sequence[Path] | None = None,
  method: str = "auto",
):
  """Effect of every output channel of every layer on a batch (Xu et al., Def. 4 / Alg. 1).

    S_{l,i} = H_b(M*, I) - H(M'_{l,i}, I)

  where H is accuracy on the batch I (forget-class data) and M'_{l,i} is the model with
  output channel i of layer l zeroed. metric='loss' gives instead the increase of the mean
  cross-entropy, CE(M'_{l,i}, I) - CE(M*, I); metric='both' returns ChannelEffects(acc, loss)
  from the same forward passes (use it for loss-tie-broken selection, see top_delta_channels).

  Vectorised: for a layer with C channels the C keep-masks are the rows of 1 - I_C; the
  forward pass is vmapped over them, in ceil(C / chunk_size) balanced chunks run by lax.map,
  so memory is bounded by chunk_size forward passes. Jittable (apply_fn, metric, chunk_size,
  layers and method static).

  How a channel is zeroed (`method`; same numbers up to float summation order):
    'params': multiply the kernel's last axis and the bias by the mask. Works for any
      apply_fn, but every vmapped copy carries its own kernel (a grouped conv on CPU).
    'output': multiply the layer's output by the mask through a flax interceptor
      (nn.intercept_methods) on the nn.Dense / nn.Conv / nn.ConvTranspose module at the
      layer's path (or any module class with `channel_output_maskable = True`, for custom
      layers whose output channel c is x * kernel[..., c] + bias[c]): the layer and
      everything before it run once, unbatched (several times faster than 'params' on
      a small CNN; BUILD.md).
    'auto': 'output' for the layers an abstract trace shows it can reach, else 'params'
      (also when the interceptor did not run, e.g. a pre-jitted apply_fn hit its cache).

  Args:
    apply_fn: (params, x) -> logits [B, K], e.g. lambda p, x: module.apply({'params': p}, x).
    params: parameter pytree.
    x, y: the batch (int labels [B]).
    mask: optional bool/float [B]; rows with mask 0 (padding) are ignored.
    metric: 'acc' (the paper), 'loss', or 'both'.
    chunk_size: channels per vmapped chunk.
    layers: optional subset of layer paths (default: all of channel_layers(params)).
    method: 'auto', 'output' or 'params' (see above).
  Returns:
    dict path -> float32 [C] (or ChannelEffects for metric='both').
  """
  if metric not in _METRICS:
    raise ValueError(f"metric={metric!r}; allowed: {_METRICS}")
  if method not in _METHODS:
    raise ValueError(f"method={method!r}; allowed: {_METHODS}")
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size={chunk_size}; must be >= 1")
  todo = _resolve_layers(params, layers)
  maskable = set() if method == "params" else _output_maskable_layers(apply_fn, params, x)
  if method == "output":
    missing = [p for p, _ in todo if p not in maskable]
    if missing:
      raise ValueError(
        f"method='output' cannot reach layers {missing}: they are not "
        "nn.Dense/nn.Conv/nn.ConvTranspose (or channel_output_maskable) "
        "modules called by apply_fn at that path; use method='params' or "
        "'auto'"
      )
  valid = jnp.ones(y.shape[:1], jnp.float32) if mask is None else mask
  base_acc, base_loss = _acc_loss(apply_fn, params, x, y, valid)
  acc_eff, loss_eff = {}, {}
  for path, c in todo:
    kernel = _get(params, path)["kernel"]
    keep = 1.0 - jnp.eye(c, dtype=kernel.dtype)  # row i zeroes channel i

    def by_params(m, path=path):
      return _acc_loss(apply_fn, _scale_channels(params, path, m), x, y, valid)

    def by_output(m, fired, path=path):
      with nn.intercept_methods(_output_masker(path, m, fired)):
        return _acc_loss(apply_fn, params, x, y, valid)

    if path in maskable:
      fired = set()
      accs, ls = _chunked_map(functools.partial(by_output, fired=fired), keep, int(chunk_size))
      if path not in fired:
        # The module code did not run while tracing (e.g. apply_fn is itself jitted and hit
        # its cache), so nothing was masked: redo this layer through the parameters.
        if method == "output":
          raise ValueError(
            f"method='output': the interceptor never ran for layer {path!r} "
            "(is apply_fn a cached jax.jit function?); use method='auto'"
          )
        accs, ls = _chunked_map(by_params, keep, int(chunk_size))
    else:
      accs, ls = _chunked_map(by_params, keep, int(chunk_size))
    acc_eff[path] = (base_acc - accs).astype(jnp.float32)
    loss_eff[path] = (ls - base_loss).astype(jnp.float32)
  if metric == "acc":
    return acc_eff
  if metric == "loss":
    return loss_eff
  return ChannelEffects(acc=acc_eff, loss=loss_eff)


# ----------------------------------------------------------------------------- selection


def num_selected(delta: float, c: int) -> int:
  """ceil(delta * C), robust to float noise (0.1 * 30 is 3.0000000000000004, not 4 channels)."""
  if not 0.0 <= float(delta) <= 1.0:
    raise ValueError(f"delta={delta}; must be in [0, 1]")
  return min(int(c), int(math.ceil(round(float(delta) * int(c), 9))))


def _top_k_mask(primary, secondary, k):
  c = primary.shape[0]
  idx = jnp.arange(c)
  keys = (idx, -secondary, -primary) if secondary is not None else (idx, -primary)
  order = jnp.lexsort(keys)  # last key is the primary one; index breaks remaining ties
  return jnp.zeros((c,), bool).at[order[:k]].set(True)


def top_delta_channels(effects, delta: float, *, tie_break: dict | None = None) -> dict:
  """Per layer, the ceil(delta * C) channels with the highest effect (Alg. 1 lines 12-13).

  Args:
    effects: dict path -> [C] (primary key, descending), or ChannelEffects (acc primary,
      loss as tie-break).
    delta: selection factor in [0, 1].
    tie_break: optional dict path -> [C]; among equal effects the higher tie_break value
      wins. Remaining ties go to the lower channel index (deterministic).
  Returns:
    dict path -> bool [C] with exactly ceil(delta * C) True entries per layer.
  """
  if isinstance(effects, ChannelEffects):
    if tie_break is not None:
      raise ValueError(
        "tie_break given with ChannelEffects (which already carries loss); pass one or the other"
      )
    effects, tie_break = effects.acc, effects.loss
  out = {}
  for path, e in effects.items():
    e = jnp.asarray(e)
    sec = None if tie_break is None else jnp.asarray(tie_break[path])
    out[path] = _top_k_mask(e, sec, num_selected(delta, e.shape[0]))
  return out


def _layer_seed(path):
  return zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF


def random_channels(layers: Sequence, delta: float, key) -> dict:
  """The same count per layer as top_delta_channels, chosen uniformly at random (DE-random).

  layers: list of (path, C) as from channel_layers. Each layer's draw uses
  fold_in(key, crc32(path)), so it depends only on the key and the layer's own name.
  """
  out = {}
  for path, c in layers:
    k = num_selected(delta, c)
    perm = jax.random.permutation(jax.random.fold_in(key, _layer_seed(path)), c)
    out[tuple(path)] = jnp.zeros((c,), bool).at[perm[:k]].set(True)
  return out


def channel_mask_to_param_mask(channel_masks: dict, params, *, others: bool = False, dtype=bool):
  """Parameter mask (pytree like params) from channel masks.

  kernel leaf of a listed layer: its [C] mask broadcast along the last axis; its bias: the
  [C] mask; every other leaf (unlisted layers, norm scales/biases, other leaves of a listed
  layer) is all-`others`.
  """
  by_path = dict(channel_layers(params))
  for p, m in channel_masks.items():
    if p not in by_path:
      raise ValueError(
        f"channel mask for {p!r}, which is not a layer of params; layers are {list(by_path)}"
      )
    if tuple(np.shape(m)) != (by_path[p],):
      raise ValueError(
        f"channel mask for {p!r} has shape {np.shape(m)}, layer has {by_path[p]} output channels"
      )

  def f(kp, leaf):
    path = _keypath(kp)
    layer = path[:-1]
    if layer in channel_masks and path[-1] in ("kernel", "bias"):
      m = jnp.asarray(channel_masks[layer]).astype(dtype)
      if path[-1] == "kernel":
        return jnp.broadcast_to(m, leaf.shape)
      if leaf.shape == m.shape:
        return m
    return jnp.full(leaf.shape, others, dtype)

  return jax.tree_util.tree_map_with_path(f, params)


def top_delta_mask(
  effects, delta: float, params, *, tie_break: dict | None = None, others: bool = False
):
  """Parameter mask of the top ceil(delta * C) channels per scored layer (see top_delta_channels).

  Layers absent from `effects` (and non-layer leaves) get `others`.

  Examples:
    A one-layer model whose channel 0 alone makes class 0 win: zeroing it costs the whole
    accuracy on class-0 data, the other channels cost nothing, so it is the one selected.

    >>> import jax.numpy as jnp
    >>> from fu_jax import masking
    >>> params = {'Dense_0': {'kernel': jnp.eye(3), 'bias': jnp.full(3, 0.5)}}
    >>> apply_fn = lambda p, x: x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
    >>> x, y = jnp.array([[1., 0., 0.], [2., 0., 0.]]), jnp.array([0, 0])   # class-0 data
    >>> effects = masking.channel_effects(apply_fn, params, x, y)
    >>> print(effects[('Dense_0',)])                     # accuracy drop per zeroed channel
    [1. 0. 0.]
    >>> mask = masking.top_delta_mask(effects, 0.3, params)   # ceil(0.3 * 3) = 1 channel
    >>> print(mask['Dense_0']['bias'], mask['Dense_0']['kernel'][0])
    [ True False False] [ True False False]
  """
  return channel_mask_to_param_mask(
    top_delta_channels(effects, delta, tie_break=tie_break), params, others=others
  )


def random_mask(
  params, delta: float, key, *, layers: Sequence[Path] | None = None, others: bool = False
):
  """Parameter mask of ceil(delta * C) random channels per layer (the DE-random ablation)."""
  return channel_mask_to_param_mask(
    random_channels(_resolve_layers(params, layers), delta, key), params, others=others
  )


def zero_masked(params, mask):
  """params with every entry where mask is True set to 0 (prune)."""
  return jax.tree.map(lambda p, m: jnp.where(m, jnp.zeros_like(p), p), params, mask)


# ----------------------------------------------------------------------------- masked update


class MaskedUpdateState(NamedTuple):
  """State of masked_update: bool pytree like params (True = may change)."""

  mask: Any


def init_masked_state(mask) -> MaskedUpdateState:
  """State for masked_update from a parameter mask (e.g. to vmap over per-client masks)."""
  return MaskedUpdateState(mask=jax.tree.map(lambda m: jnp.asarray(m).astype(bool), mask))


def set_mask(opt_state, mask):
  """opt_state with the mask of every MaskedUpdateState inside it replaced (no re-init).

  Through optax.tree.set, wherever the chain put the state; raises KeyError when opt_state
  holds no MaskedUpdateState."""
  return optax.tree.set(opt_state, MaskedUpdateState=init_masked_state(mask))


def masked_update(mask=None) -> optax.GradientTransformation:
  """Zeroes updates where the parameter mask (carried in the STATE) is False.

    u'_i = u_i if mask_i else -0.0

  Unselected parameters stay bit-identical through optax.apply_updates (p + -0.0 == p for
  every float p, including -0.0, while p + 0.0 turns -0.0 into +0.0). Place it LAST:

    opt = optax.chain(optax.sgd(lr, momentum=0.9), masked_update())

  so momentum, weight decay or Adam's normalisation upstream cannot move frozen parameters
  (upstream statistics of frozen entries still evolve; they are never applied).

  Args:
    mask: optional bool pytree like params, or a callable params -> mask, used by init; None
      means all-True. Because the mask lives in the state, clients can carry different masks
      under vmap: build states with init_masked_state(mask) or swap with set_mask.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from fu_jax import masking
    >>> params = {'w': jnp.array([1., 2., 3.])}
    >>> opt = optax.chain(optax.sgd(0.5), masking.masked_update())
    >>> state = masking.set_mask(opt.init(params), {'w': jnp.array([True, False, True])})
    >>> updates, state = opt.update({'w': jnp.ones(3)}, state, params)
    >>> print(optax.apply_updates(params, updates)['w'])   # the middle entry is frozen
    [0.5 2.  2.5]
  """

  def init_fn(params):
    m = mask(params) if callable(mask) else mask
    if m is None:
      m = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    else:
      m = jax.tree.map(
        lambda mm, p: jnp.broadcast_to(jnp.asarray(mm).astype(bool), jnp.shape(p)), m, params
      )
    return MaskedUpdateState(mask=m)

  def update_fn(updates, state, params=None):
    del params
    new = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.array(-0.0, u.dtype)), updates, state.mask)
    return new, state

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- packing


class PackedLayer(NamedTuple):
  """The selected channels of one layer, as sent: indices and values."""

  index: Any  # int32 [k], sorted ascending
  kernel: Any  # kernel.shape[:-1] + (k,)
  bias: Any  # [k] or None when the layer has no bias


def channel_counts(channel_masks: dict) -> dict:
  """Host side: number of selected channels per layer (the static sizes pack_channels needs)."""
  return {p: int(np.asarray(m).sum()) for p, m in channel_masks.items()}


def pack_channels(delta_tree, channel_masks: dict, counts: dict | None = None) -> dict:
  """Gathers only the selected channels' values (kernel slices and bias entries).

  Args:
    delta_tree: pytree like params (e.g. a client update).
    channel_masks: dict path -> bool [C].
    counts: static dict path -> int of selected channels per layer; needed under jit (e.g.
      {p: num_selected(delta, C)}); derived from concrete masks when None. A mask with fewer
      True entries than its count pads the index with C, which unpack drops.
  Returns:
    dict path -> PackedLayer. Leaves outside the listed layers are not sent: training with a
    parameter mask built with others=False leaves them unchanged (zero delta).
  """
  if counts is None:
    try:
      counts = channel_counts(channel_masks)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
      raise ValueError(
        "pack_channels under jit needs static counts=; pass {path: num_selected(delta, C)}"
      ) from e
  out = {}
  for path, m in channel_masks.items():
    layer = _get(delta_tree, path)
    c = layer["kernel"].shape[-1]
    idx = jnp.nonzero(jnp.asarray(m), size=int(counts[path]), fill_value=c)[0]
    idx = idx.astype(jnp.int32)
    kern = jnp.take(layer["kernel"], idx, axis=-1, mode="fill", fill_value=0)
    bias = layer.get("bias")
    if bias is not None and bias.shape == (c,):
      bias = jnp.take(bias, idx, mode="fill", fill_value=0)
    else:
      bias = None
    out[path] = PackedLayer(index=idx, kernel=kern, bias=bias)
  return out


def unpack_channels(packed: dict, channel_masks: dict | None, like_params):
  """Scatters packed channels back into a pytree like `like_params`, zeros elsewhere.

  If channel_masks is given the result is also multiplied by the parameter mask, so nothing
  outside the selection can come through (e.g. a tampered or padded index).
  """
  for p in packed:
    _get(like_params, p)

  def f(kp, leaf):
    path = _keypath(kp)
    layer, name = path[:-1], path[-1]
    z = jnp.zeros_like(leaf)
    if layer not in packed or name not in ("kernel", "bias"):
      return z
    pk = packed[layer]
    if name == "kernel":
      v = z.at[..., pk.index].set(pk.kernel.astype(leaf.dtype), mode="drop")
    elif pk.bias is not None:
      v = z.at[pk.index].set(pk.bias.astype(leaf.dtype), mode="drop")
    else:
      return z
    if channel_masks is not None and layer in channel_masks:
      m = jnp.asarray(channel_masks[layer]).astype(bool)
      v = jnp.where(m if name == "bias" else jnp.broadcast_to(m, v.shape), v, 0)
    return v

  return jax.tree_util.tree_map_with_path(f, like_params)


def packed_num_bytes(packed) -> int:
  """Bytes of what is sent: values plus int32 channel indices (from shapes)."""
  return tu.tree_num_bytes(packed)


def selected_num_bytes(channel_masks: dict, params, *, index_bytes: int = 4) -> int:
  """Host side: bytes pack_channels would send for these masks (values + indices).

  Per layer: k * (prod(kernel.shape[:-1]) + [bias]) * itemsize + k * index_bytes. The
  indices are counted although in Xu et al.'s protocol the server broadcasts the selected
  set once (Alg. 2 line 1): counting them makes the figure an upper bound per upload.
  """
  total = 0
  for path, m in channel_masks.items():
    layer = _get(params, path)
    kern = layer["kernel"]
    c = kern.shape[-1]
    k = int(np.asarray(m).sum())
    per = int(np.prod(kern.shape[:-1])) * np.dtype(kern.dtype).itemsize
    bias = layer.get("bias")
    if bias is not None and bias.shape == (c,):
      per += np.dtype(bias.dtype).itemsize
    total += k * (per + index_bytes)
  return int(total)


# ----------------------------------------------------------------------------- layer outputs


def _intermediate_layers(inter, prefix, out):
  """(path, output) for every submodule __call__ in insertion (= call) order, depth first."""
  for k, v in inter.items():
    if k == "__call__":
      if prefix:
        out.append((prefix, v))
    elif hasattr(v, "items"):
      _intermediate_layers(v, prefix + (k,), out)


def layer_outputs(module, params, x, *, layers: Sequence[Path] | None = None) -> dict:
  """Outputs (pre-activation) of the conv/dense layers, via flax capture_intermediates.

  Runs module.apply({'params': params}, x, capture_intermediates=True,
  mutable=['intermediates']) and picks the `__call__` output of each submodule whose path
  is a layer path. Returns a dict path -> array in call order (a jax.jit output re-sorts
  dict keys). A layer called more than once (weight sharing) is rejected.
  """
  _, state = module.apply(
    {"params": params}, x, capture_intermediates=True, mutable=["intermediates"]
  )
  wanted = set(p for p, _ in _resolve_layers(params, layers))
  found = []
  _intermediate_layers(state["intermediates"], (), found)
  out = {}
  for path, outs in found:
    if path in wanted:
      if len(outs) != 1:
        raise ValueError(
          f"layer {path!r} was called {len(outs)} times; layer_outputs needs one call per layer"
        )
      out[path] = outs[0]
  missing = wanted - set(out)
  if missing:
    raise ValueError(
      f"no captured output for layers {sorted(missing)}: the module holding "
      "the kernel must be a submodule whose __call__ returns the layer output"
    )
  return out
