"""The server side of FedAvg: aggregation, the server state and optimizer, divergence."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fu_jax import tree as tu


def aggregate(server_params, client_params, weights):
  """Weighted mean delta: sum_k w_k (theta_k - theta) / sum_k w_k (zero if all w_k = 0)."""
  deltas = jax.tree.map(lambda c, s: c - s[None], client_params, server_params)
  return tu.tree_weighted_mean(deltas, weights)


class ServerState(NamedTuple):
  params: Any
  opt_state: Any


def server_init(params, server_opt: optax.GradientTransformation) -> ServerState:
  return ServerState(params, server_opt.init(params))


def server_apply(state: ServerState, mean_delta, server_opt) -> ServerState:
  """Applies -mean_delta as a gradient: optax.sgd(1.0) gives theta + mean_delta."""
  grads = jax.tree.map(jnp.negative, mean_delta)
  updates, opt_state = server_opt.update(grads, state.opt_state, state.params)
  return ServerState(optax.apply_updates(state.params, updates), opt_state)


class DivergenceError(FloatingPointError):
  """Raised when a loss or parameter becomes NaN/inf: nothing is written as a result."""


_all_finite = jax.jit(tu.tree_all_finite)  # one program per model, not two per leaf shape


def check_finite(params, what: str):
  if not bool(_all_finite(params)):
    raise DivergenceError(
      f"{what}: parameters became NaN or inf (diverged); lower the "
      "learning rate. No results were written."
    )


@functools.lru_cache(maxsize=32)
def server_optimizer(lr: float) -> optax.GradientTransformation:
  """optax.sgd(lr), one object per lr (sgd(1) = plain FedAvg).

  The server optimizer is a static argument of the jitted server updates, and jit compares
  static arguments by equality, which for an optax transform (a tuple of closures) is
  identity: a fresh optax.sgd per phase would compile each update again.
  """
  return optax.sgd(lr)


@functools.partial(jax.jit, static_argnums=(3,))
def aggregate_apply(server, client_params, weights, server_opt):
  """server_apply of the aggregate, one jitted program per server optimizer."""
  return server_apply(server, aggregate(server.params, client_params, weights), server_opt)
