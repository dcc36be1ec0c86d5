"""Bounded stochastic gradient ascent (SGA) on the data to forget.

The SGA baseline of FedAF (Wu et al. 2022, "Federated Unlearning: Guarantee the Right of
Clients to Forget", IEEE Network 36(5)) and QuickDrop's unlearning step both *maximise* the
cross-entropy of the forget data, theta <- theta + lr * grad L(theta). Unbounded ascent
diverges (the loss has no maximum), so two bounds are offered, usable together:

  * projection (Halimi et al. 2022, "Federated Unlearning: How to Efficiently Erase a Client
    in FL?"): after every step, project theta onto the L2 ball of radius `radius` around a
    reference model `ref_params` (Halimi: the mean of the other clients' models; the global
    model before unlearning also works). The norm is the global L2 norm over all leaves.
  * loss threshold: stop as soon as the loss of the current batch (measured before its
    step) exceeds `max_loss`; that step and all later ones are skipped. E.g. max_loss =
    log(K) stops at the loss of a uniform prediction.

Mini-batches are drawn from a per-epoch permutation in which valid examples come first in a
random order that depends only on `key` and each example's index, so padding rows (appended
at the end, valid=False) change neither the batches nor the result; a batch with no valid
example changes nothing.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fu_jax import losses
from fu_jax import tree as tree_lib


def sga_step(params, grads, lr):
  """One ascent step: params + lr * grads."""
  return jax.tree.map(lambda p, g: p + lr * g, params, grads)


def project_l2_ball(params, center, radius):
  """Closest point to params in {theta : ||theta - center||_2 <= radius} (global norm).

  center + (params - center) * min(1, radius / ||params - center||)."""
  delta = tree_lib.tree_sub(params, center)
  norm = jnp.sqrt(tree_lib.tree_sq_norm(delta))
  scale = jnp.minimum(1.0, radius / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
  return jax.tree.map(lambda c, d: c + (d * scale).astype(d.dtype), center, delta)


class GradientAscentState(NamedTuple):
  """gradient_ascent is stateless."""


def gradient_ascent() -> optax.GradientTransformation:
  """Negates the updates: `optax.chain(gradient_ascent(), optax.sgd(lr))` ascends the loss
  whose gradient is fed in (params - lr * (-g) = params + lr * g)."""
  def init_fn(params):
    del params
    return GradientAscentState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(jnp.negative, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def epoch_batches(key, mask, batch_size: int):
  """Batch plan for one epoch: (index int32 [m, batch_size], valid bool [m, batch_size]).

  Valid rows come first, shuffled by per-index random bits u_i from fold_in(key, i); so for
  data padded at the end the valid rows' batches do not depend on the amount of padding.
  m = ceil(n / batch_size).
  """
  if int(batch_size) < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  mask = jnp.asarray(mask).astype(jnp.bool_)
  n = mask.shape[0]
  u = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), (), jnp.uint32))(
      jnp.arange(n))
  order = jnp.lexsort((u, ~mask))  # primary key: valid first; then by the random bits
  m = -(-n // int(batch_size))
  total = m * int(batch_size)
  idx = jnp.concatenate([order, jnp.zeros((total - n,), order.dtype)])
  valid = jnp.concatenate([mask[order], jnp.zeros((total - n,), jnp.bool_)])
  return idx.reshape(m, -1).astype(jnp.int32), valid.reshape(m, -1)


def sga_epoch(apply_fn: Callable[..., Any], params, x, y, mask, *, lr, batch_size: int, key,
              ref_params=None, radius=None, max_loss=None, unroll: int = 1):
  """One epoch of bounded stochastic gradient ascent on masked cross-entropy.

  For each mini-batch b (see `epoch_batches`):
    L_b = masked mean CE(apply_fn(theta, x_b), y_b)
    stop if max_loss is given and L_b > max_loss (this and every later batch are skipped)
    theta <- theta + lr * grad L_b
    theta <- project_l2_ball(theta, ref_params, radius)   if ref_params/radius are given

  Args:
    apply_fn: (params, x) -> logits [B, K].
    params: model parameters to unlearn from.
    x, y, mask: [n, ...], int [n] (or soft [n, K]) labels, bool [n] valid rows.
    lr: ascent step size; batch_size: static int.
    key: PRNG key for the batch order.
    ref_params, radius: centre and radius of the L2 ball (both or neither).
    max_loss: loss threshold that ends the ascent (None: never stop).
    unroll: passed to lax.scan (a larger unroll helps conv models on CPU).

  Returns:
    the new params (same structure/dtypes).
  """
  if (ref_params is None) != (radius is None):
    raise ValueError('give both ref_params and radius for the L2-ball projection, or neither')
  idx, valid = epoch_batches(key, mask, batch_size)

  def loss_fn(p, xb, yb, mb):
    return losses.masked_ce(apply_fn(p, xb), yb, mb)

  def body(carry, inp):
    p, stopped = carry
    ib, mb = inp
    loss, g = jax.value_and_grad(loss_fn)(p, x[ib], y[ib], mb)
    if max_loss is not None:
      stopped = stopped | (loss > max_loss)
    new = sga_step(p, g, lr)
    if ref_params is not None:
      new = project_l2_ball(new, ref_params, radius)
    take = jnp.any(mb) & ~stopped
    p = jax.tree.map(lambda a, b: jnp.where(take, a, b), new, p)
    return (p, stopped), None

  (params, _), _ = jax.lax.scan(body, (params, jnp.zeros((), jnp.bool_)), (idx, valid),
                                unroll=unroll)
  return params
