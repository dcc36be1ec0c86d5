"""A bank of K independent FedAvg simulations as one vmapped program (a model axis).

`fedavg_bank` runs the same FedAvg rounds as `fl.fedavg_round` with a `ClientRunner(kind=
'vmap')` and `fl.server_optimizer(server_lr)` on the server, through the same round loop
(`fl.fedavg_rounds`), for K training seeds at once: model k samples its clients and draws
its batch orders from seeds[k] exactly as a run with config.seed = seeds[k] does, so bank
model k equals that run's model (to float tolerance: the batched matmuls round
differently; tests/test_bank.py checks it). Each local step is one
jitted call vmapped over models and clients, so K models cost one compilation and, on
XLA:CPU for dense models, about the time of a few (benchmarks/audit_bank.py).

The data are shared by the models (the data seed is fixed across an audit's bank); what
differs per model is its initial parameters, client sampling and batch orders. When fewer
than all clients are sampled, each model gathers its own clients' blocks ([K, S, n, ...]).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax import fl, images


def _vmap2(f, in_axes):
  """vmap over clients, then over models, with the same in_axes at both levels."""
  return jax.vmap(jax.vmap(f, in_axes=in_axes), in_axes=in_axes)


class BankRunner:
  """Compiled pieces for one LocalProgram (built once, reused across rounds and phases)."""

  def __init__(self, program: fl.LocalProgram, batch_size: int):
    if program.scheduled_step is not None:
      raise ValueError("fedavg_bank runs plain local programs (no scheduled step)")
    self.program, self.batch_size = program, batch_size
    # The runners' own guarded step: an empty batch leaves the state bit-identical.
    guarded = fl.guarded_step
    step = functools.partial(guarded, program.step, batch_size)
    self.step = jax.jit(_vmap2(step, (0, 0, 0, 0, None, 0)), donate_argnums=(0,))
    self.init = jax.jit(
      jax.vmap(jax.vmap(lambda p, k: program.init(p, None, k), in_axes=(None, 0)), in_axes=(0, 0))
    )
    self.order = jax.jit(_vmap2(fl.epoch_order, (0, 0)))
    self.finish = jax.jit(_vmap2(program.finish, (0,)))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _sample(seeds, round_idx, weights, num_sampled, stream):
  idx, active = jax.vmap(lambda s: fl.sample_clients(s, round_idx, weights, num_sampled))(seeds)
  keys = jax.vmap(jax.vmap(lambda s, c: fl.stream_key(s, stream, round_idx, c), in_axes=(None, 0)))(
    seeds, idx
  )
  return idx, active, keys


@functools.partial(jax.jit, static_argnums=(3,))
def _server_update(server, client_params, w, server_opt):
  return jax.vmap(lambda s, c, ww: fl.server_apply(s, fl.aggregate(s.params, c, ww), server_opt))(
    server, client_params, w
  )


def fedavg_bank(
  runner: BankRunner,
  params,
  data,
  valid,
  *,
  seeds,
  num_rounds: int,
  epochs: int,
  client_weights,
  num_sampled: int,
  server_lr: float,
  round_offset: int = 0,
  stream: int = fl.STREAM_CLIENT,
):
  """num_rounds FedAvg rounds for K models at once; returns the params with a leading [K].

  params: pytree with leading [K] axes (each model's starting point); seeds: int [K], the
  models' training seeds; data (x, y) and valid [N, max_n] are every client's, shared by
  the models; client_weights [N] as in fl.fedavg_round. Rounds are numbered round_offset + r.
  """
  seeds = jnp.asarray(np.asarray(seeds, np.int64).astype(np.int32))
  weights = jnp.asarray(client_weights, jnp.float32)
  x, y = data
  if isinstance(x, images.ClientImages):
    # The bank's steps take client blocks, not the table-as-argument path of fl's runners:
    # one padded block for the run (audits use small data sets).
    x = jnp.asarray(np.asarray(x))
  valid = jnp.asarray(valid)
  server_opt = fl.server_optimizer(float(server_lr))
  bs = runner.batch_size

  def play(server, round_idx) -> fl.RoundResult:
    """FedAvg round round_idx of every model: fl.fedavg_round with a model axis."""
    idx, active, keys = _sample(seeds, round_idx, weights, num_sampled, stream)
    d = (jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0))
    v = jnp.take(valid, idx, axis=0)
    counts = np.asarray(jnp.sum(v, axis=-1))
    n_steps = min(fl.steps_per_epoch(v.shape[-1], bs), math.ceil(int(counts.max(initial=0)) / bs))
    state = runner.init(server.params, keys)
    for epoch in range(epochs):
      eks = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(0, None)), in_axes=(0, None))(
        keys, epoch
      )
      order = runner.order(eks, v)
      for s in range(n_steps):
        state, _, _ = runner.step(state, d, v, order, s, eks)
    w = jnp.asarray(counts, jnp.float32) * jnp.take(weights, idx) * active
    server = _server_update(server, runner.finish(state), w, server_opt)
    return fl.RoundResult(server, idx, {}, None)

  server = jax.vmap(lambda p: fl.server_init(p, server_opt))(params)
  server = fl.fedavg_rounds(play, server, num_rounds, round_offset=round_offset)
  return server.params
