"""FedAvg rounds: one round (`fedavg_round`) and the one round loop every phase runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax.fl._cost import round_cost
from fu_jax.fl._keys import STREAM_CLIENT, fits, fold_key
from fu_jax.fl._runners import ClientResult, ClientRunner
from fu_jax.fl._sampling import sample_clients_traced
from fu_jax.fl._server import ServerState, aggregate_apply


class RoundResult(NamedTuple):
  server: ServerState
  sampled: np.ndarray
  metrics: dict  # weighted means over participating clients
  client: ClientResult
  counts: np.ndarray = None  # [num_sampled] valid rows of each sampled client
  weights: np.ndarray = None  # [num_sampled] its aggregation weight (0: not aggregated)


def _round_inputs(seed, round_idx, client_weights, leaves, valid, num_sampled, stream):
  """A round's sampled clients: (idx, the leaves of their data and extra, valid, client keys,
  example counts, aggregation weights = counts * client weight * active)."""
  idx, active = sample_clients_traced(seed, round_idx, client_weights, num_sampled)
  take = lambda a: jnp.take(a, idx, axis=0)
  taken, v = [take(a) for a in leaves], take(valid)
  keys = jax.vmap(lambda c: fold_key(seed, stream, round_idx, c))(idx)
  counts = jnp.sum(v, axis=1).astype(jnp.float32)
  w = counts * jnp.take(jnp.asarray(client_weights, jnp.float32), idx) * active
  return idx, taken, v, keys, counts, w


# One program per phase's shapes: sampling, selection and keys were ~25 eager programs. It
# takes the data's leaves, not its pytree: a node's metadata (e.g. the image table of
# ClientImages, one object per task) is part of jit's cache key, and an audit's K tasks
# would lower it K times.
_round_inputs_jit = jax.jit(_round_inputs, static_argnums=(5, 6))


def fedavg_round(
  server: ServerState,
  runner: ClientRunner,
  data,
  valid,
  extra,
  *,
  seed: int,
  round_idx: int,
  client_weights,
  num_sampled: int,
  server_opt: optax.GradientTransformation,
  stream: int = STREAM_CLIENT,
  server_update: Callable | None = None,
) -> RoundResult:
  """One FedAvg round: sample, run local programs, aggregate weighted by examples.

  data (x, y), valid, extra carry a leading axis over ALL clients; client_weights [N]
  scales each client's example count in the average (0 removes a client).
  server_update(server, client_params [k, ...], weights [k]) -> ServerState replaces the
  default aggregate + server_apply through server_opt (e.g. an exchange of packed
  channels, methods/channel.py); sampling, keys, weights and metrics stay the same.
  """
  leaves, treedef = jax.tree.flatten((data, extra))
  args = (seed, round_idx, client_weights, leaves, valid, num_sampled, stream)
  if fits(seed, np.int32) and fits(round_idx, np.uint32):
    weights = np.asarray(client_weights, np.float32)
    args = (np.int32(seed), np.uint32(round_idx), weights, *args[3:])
    idx, taken, v, keys, counts, w = _round_inputs_jit(*args)
  else:
    idx, taken, v, keys, counts, w = _round_inputs(*args)
  d, e = jax.tree.unflatten(treedef, taken)
  res = runner.run(server.params, d, v, e, keys)
  if server_update is None:
    server = aggregate_apply(server, res.params, w, server_opt)
  else:
    server = server_update(server, res.params, w)
  wn = np.asarray(w)
  metrics = {
    k: float(np.sum(np.asarray(m) * wn) / max(wn.sum(), 1e-12)) for k, m in res.metrics.items()
  }
  return RoundResult(server, np.asarray(idx), metrics, res, np.asarray(counts), wn)


# ---------------------------------------------------------------------------------------
# The round loop: every FedAvg phase, trainer and the audit's bank run their rounds here.


def run_rounds(phase: str, init_state, num_rounds: int, round_fn, params_fn=None):
  """state after round_fn(state, r) -> (state, metrics) for r in [0, num_rounds).

  The signature of the experiment loop's `env.rounds` (methods/base.py), which adds
  checkpoints, logs, evaluation and cost; this one keeps nothing, for callers outside an
  experiment (the audit's bank, benchmarks). phase and params_fn are unused.
  """
  del phase, params_fn
  state = init_state
  for r in range(num_rounds):
    state, _ = round_fn(state, r)
  return state


def fedavg_play(
  runner,
  data,
  valid,
  extra=None,
  *,
  seed: int,
  client_weights,
  num_sampled: int,
  server_opt: optax.GradientTransformation,
  stream: int = STREAM_CLIENT,
  server_update: Callable | None = None,
  server_of: Callable | None = None,
  extra_of: Callable | None = None,
) -> Callable:
  """play(state, round_idx) -> RoundResult: `fedavg_round` with everything fixed for a
  phase but the round. The round state may hold more than the server (e.g. stored
  updates, synthetic sets): server_of(state) is its ServerState (default: the state
  itself), extra_of(state) the clients' `extra` of the round (default: `extra`).
  """
  server_of = server_of or (lambda state: state)
  extra_of = extra_of or (lambda state: extra)

  def play(state, round_idx):
    return fedavg_round(
      server_of(state),
      runner,
      data,
      valid,
      extra_of(state),
      seed=seed,
      round_idx=round_idx,
      client_weights=client_weights,
      num_sampled=num_sampled,
      server_opt=server_opt,
      stream=stream,
      server_update=server_update,
    )

  return play


def fedavg_round_fn(
  play: Callable,
  *,
  round_offset: int = 0,
  on_round: Callable | None = None,
  model_bytes: int | None = None,
  epochs: int = 1,
) -> Callable:
  """round_fn(state, r) -> (state, metrics) of the rounds loop, for round r of a phase.

  play(state, round_idx) -> RoundResult runs FedAvg round round_idx = round_offset + r
  (rounds are numbered so that phases never reuse sampling or client keys);
  on_round(state, r, res) -> state turns the old state and the round's result into the
  next state (default: res.server, for a state that is the ServerState): where a caller
  keeps what else happens each round (FedEraser's stored updates, QuickDrop's synthetic
  sets). metrics: the round's client metrics, then, with model_bytes given, its
  `round_cost` (each active client with rows downloads and uploads model_bytes; examples
  = rows * epochs).
  """
  on_round = on_round or (lambda state, r, res: res.server)

  def round_fn(state, r):
    res = play(state, round_offset + r)
    metrics = dict(res.metrics)
    if model_bytes is not None:
      metrics.update(round_cost(res.counts, res.weights, model_bytes=model_bytes, epochs=epochs))
    return on_round(state, r, res), metrics

  return round_fn


def fedavg_rounds(
  play: Callable,
  init_state,
  num_rounds: int,
  *,
  rounds: Callable = run_rounds,
  phase: str = "",
  params_fn: Callable | None = None,
  round_offset: int = 0,
  on_round: Callable | None = None,
  model_bytes: int | None = None,
  epochs: int = 1,
):
  """num_rounds FedAvg rounds from init_state; returns the final round state.

  rounds(phase, init_state, num_rounds, round_fn, params_fn) drives them: `run_rounds`
  (default), or an experiment's env.rounds, which checkpoints, logs and evaluates
  params_fn(state) (default: state.params). play, round_offset, on_round, model_bytes and
  epochs as in `fedavg_round_fn`.
  """
  round_fn = fedavg_round_fn(
    play, round_offset=round_offset, on_round=on_round, model_bytes=model_bytes, epochs=epochs
  )
  params_fn = params_fn or (lambda state: state.params)
  return rounds(phase, init_state, num_rounds, round_fn, params_fn)
