"""The masked update: an optax transform that keeps only the selected parameters' updates."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


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
