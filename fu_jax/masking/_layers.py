"""Channel layers of a Flax params tree: finding them by path, zeroing a channel."""

import jax
import jax.numpy as jnp

Path = tuple  # tuple of dict keys


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


def layer_at(params, path):
  """The layer dict (holding 'kernel') at `path` in params; ValueError naming the layers if none."""
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


def keypath(kp):
  """A jax key path as a tuple of plain dict keys / names / indices."""
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in kp)


def _map_layer_leaves(fn, params, layer_paths):
  """Maps fn(layer_path, leaf_name, leaf) over 'kernel'/'bias' leaves of the given layers."""
  layer_paths = set(layer_paths)

  def f(kp, leaf):
    path = keypath(kp)
    if len(path) >= 1 and path[:-1] in layer_paths and path[-1] in ("kernel", "bias"):
      return fn(path[:-1], path[-1], leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(f, params)


def scale_channels(params, path, m):
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
  c = int(layer_at(params, layer_path)["kernel"].shape[-1])
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


def resolve_layers(params, layers):
  """[(path, C)] of `layers` (default: every channel layer), checked against params."""
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
