"""Channel packing: only the selected channels' entries of an update, and their bytes."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax import tree as tu
from fu_jax.masking._layers import keypath, layer_at


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
    layer = layer_at(delta_tree, path)
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
    layer_at(like_params, p)

  def f(kp, leaf):
    path = keypath(kp)
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
    layer = layer_at(params, path)
    kern = layer["kernel"]
    c = kern.shape[-1]
    k = int(np.asarray(m).sum())
    per = int(np.prod(kern.shape[:-1])) * np.dtype(kern.dtype).itemsize
    bias = layer.get("bias")
    if bias is not None and bias.shape == (c,):
      per += np.dtype(bias.dtype).itemsize
    total += k * (per + index_bytes)
  return int(total)
