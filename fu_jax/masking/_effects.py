"""Channel effects (Xu et al., Alg. 1): each channel's accuracy/loss drop when zeroed."""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fu_jax import losses
from fu_jax.masking._layers import Path, layer_at, resolve_layers, scale_channels

_METRICS = ("acc", "loss", "both")


class ChannelEffects(NamedTuple):
  """Both effects of every channel: acc = accuracy drop, loss = CE increase (dicts path->[C])."""

  acc: dict
  loss: dict


def _acc_loss(apply_fn, params, x, y, valid):
  logits = apply_fn(params, x)
  acc = losses.masked_mean(losses.correct(logits, y), valid)
  loss = losses.masked_mean(losses.cross_entropy(logits, y), valid)
  return acc, loss


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
  todo = resolve_layers(params, layers)
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
    kernel = layer_at(params, path)["kernel"]
    keep = 1.0 - jnp.eye(c, dtype=kernel.dtype)  # row i zeroes channel i

    def by_params(m, path=path):
      return _acc_loss(apply_fn, scale_channels(params, path, m), x, y, valid)

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
