"""Channel selection: the top-delta or random channels per layer, and their parameter masks."""

import math
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax.masking._effects import ChannelEffects
from fu_jax.masking._layers import Path, channel_layers, keypath, resolve_layers


def num_selected(delta: float, c: int) -> int:
  """ceil(delta * C), robust to float noise (0.1 * 30 is 3.0000000000000004, not 4 channels)."""
  if not 0.0 <= float(delta) <= 1.0:
    raise ValueError(f"delta={delta}; must be in [0, 1]")
  return min(int(c), int(math.ceil(round(float(delta) * int(c), 9))))


def top_k_mask(primary, secondary, k):
  """bool [C] of the k channels highest in primary, ties broken by secondary, then index."""
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
    out[path] = top_k_mask(e, sec, num_selected(delta, e.shape[0]))
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
    path = keypath(kp)
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
    random_channels(resolve_layers(params, layers), delta, key), params, others=others
  )


def zero_masked(params, mask):
  """params with every entry where mask is True set to 0 (prune)."""
  return jax.tree.map(lambda p, m: jnp.where(m, jnp.zeros_like(p), p), params, mask)
