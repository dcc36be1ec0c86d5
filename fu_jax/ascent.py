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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fu_jax import losses

__all__ = ["sga_step", "project_l2_ball", "gradient_ascent", "epoch_batches", "sga_epoch"]


def sga_step(params, grads, lr):
  """One ascent step: params + lr * grads."""
  return jax.tree.map(lambda p, g: p + lr * g, params, grads)


def project_l2_ball(params, center, radius):
  """Closest point to params in {theta : ||theta - center||_2 <= radius} (global norm).

  center + P(params - center), P optax's projection onto the L2 ball of that radius around
  0: delta * radius / max(||delta||, radius) (delta = 0 stays 0, no division by zero)."""
  delta = optax.tree.sub(params, center)
  return optax.tree.add(center, optax.projections.projection_l2_ball(delta, radius))


def gradient_ascent() -> optax.GradientTransformation:
  """Negates the updates, `optax.scale(-1.0)`: `optax.chain(gradient_ascent(), optax.sgd(lr))`
  ascends the loss whose gradient is fed in (params - lr * (-g) = params + lr * g).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from fu_jax import ascent
    >>> tx = optax.chain(ascent.gradient_ascent(), optax.sgd(0.5))
    >>> params, grads = jnp.array([1.0, 1.0]), jnp.array([2.0, -4.0])
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> print(optax.apply_updates(params, updates))     # params + 0.5 * grads
    [ 2. -1.]
    >>> print(ascent.project_l2_ball(jnp.array([3., 4.]), jnp.zeros(2), 1.0))   # back to the ball
    [0.6 0.8]
  """
  return optax.scale(-1.0)


def epoch_batches(key, mask, batch_size: int):
  """Batch plan for one epoch: (index int32 [m, batch_size], valid bool [m, batch_size]).

  Valid rows come first, shuffled by per-index random bits u_i from fold_in(key, i); so for
  data padded at the end the valid rows' batches do not depend on the amount of padding.
  m = ceil(n / batch_size).
  """
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  mask = jnp.asarray(mask).astype(jnp.bool_)
  n = mask.shape[0]
  u = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), (), jnp.uint32))(jnp.arange(n))
  order = jnp.lexsort((u, ~mask))  # primary key: valid first; then by the random bits
  m = -(-n // int(batch_size))
  total = m * int(batch_size)
  idx = jnp.concatenate([order, jnp.zeros((total - n,), order.dtype)])
  valid = jnp.concatenate([mask[order], jnp.zeros((total - n,), jnp.bool_)])
  return idx.reshape(m, -1).astype(jnp.int32), valid.reshape(m, -1)


def sga_epoch(
  apply_fn: Callable[..., Any],
  params,
  x,
  y,
  mask,
  *,
  lr,
  batch_size: int,
  key,
  ref_params=None,
  radius=None,
  max_loss=None,
  unroll: int = 1,
):
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

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from fu_jax import ascent, losses
    >>> apply_fn = lambda p, x: x @ p['w']
    >>> params = {'w': jnp.eye(2)}                       # classifies e_0 as 0 and e_1 as 1
    >>> x, y, mask = jnp.eye(2), jnp.array([0, 1]), jnp.ones(2, bool)
    >>> loss = lambda p: float(losses.masked_ce(apply_fn(p, x), y, mask))
    >>> new = ascent.sga_epoch(apply_fn, params, x, y, mask, lr=1.0, batch_size=1,
    ...                        key=jax.random.key(0), ref_params=params, radius=1.0)
    >>> loss(new) > loss(params)                         # the forget loss went up ...
    True
    >>> print(round(float(jnp.linalg.norm(new['w'] - params['w'])), 4) <= 1.0)  # ... in the ball
    True
  """
  if (ref_params is None) != (radius is None):
    raise ValueError("give both ref_params and radius for the L2-ball projection, or neither")
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

  (params, _), _ = jax.lax.scan(
    body, (params, jnp.zeros((), jnp.bool_)), (idx, valid), unroll=unroll
  )
  return params
