"""Federated averaging: local programs, client runners, aggregation and sampling.

The public surface of a private tree, one concept per module (as optax): _keys (PRNG key
streams), _programs (LocalProgram, sgd_program), _batching (epoch order, mini-batches),
_runners (ClientRunner, choose_runner), _clock (ClientClock), _sampling (client sampling),
_server (aggregation, server state and optimizer, divergence), _cost (round_cost) and
_rounds (fedavg_round and the round loop). Import this package, not its modules.

A client's local work is a `LocalProgram` (init/step/finish over a state pytree), run for
`epochs` passes of mini-batches over the client's valid examples. A runner executes it for
the sampled clients:

  vmap   the sampled clients in one vmapped step call per mini-batch, chunked over clients
         to bound memory;
  loop   one client at a time, each step one jitted call, stopping at the client's own
         number of non-empty batches;
  shard  like vmap, with the client axis split over a mesh of every device of every
         process (jax.sharding; fu_jax/multihost.py); the clients' results are gathered
         back whole into every process;
  auto   picks per backend and model (see `choose_runner`).

Every runner drives the steps from the host: on XLA:CPU a conv train step inside
`lax.scan` or `fori_loop` runs 5-30x slower than the same step called from Python
(docs/design.md §7), while host dispatch costs microseconds on every backend.

Client data (x, y) with a leading client axis is either padded image blocks or
`images.ClientImages`, index blocks into one copy of the training set: every runner and
`fedavg_round` select clients by mapping over the data pytree, which selects index rows,
and `take_batch` gathers a batch's images inside the jitted step. A round therefore
touches only its cohort's index rows, whatever the number of clients.

Padding never changes a result: each epoch orders the valid examples first, in an order
drawn per example from `fold_in(key, example_position)` (so it does not depend on how far
a client is padded); a batch with no valid example leaves the state bit-identical.

FedAvg (McMahan et al. 2017): the server averages client deltas weighted by example count
times an aggregation weight (0 for a forgotten client: a weight change, not a new shape,
so nothing recompiles) and applies them through a server optax optimizer (sgd(1) = plain
FedAvg; `server_optimizer`, one object per learning rate).

The round loop (`fedavg_rounds`) is the one every FedAvg phase, trainer and the audit's
bank run, as fedjax keeps its algorithms apart from the loop that drives them: a `play`
runs one round (`fedavg_play`: fedavg_round with the phase's data and settings bound),
`on_round` carries what a caller keeps besides the server (stored updates, synthetic
sets), and `rounds` drives the rounds (the experiment's checkpointed env.rounds, or
`run_rounds`).
"""

from fu_jax.fl._batching import epoch_order, epoch_start, guarded_step, steps_per_epoch, take_batch
from fu_jax.fl._clock import ClientClock, parallel_seconds
from fu_jax.fl._cost import round_cost
from fu_jax.fl._keys import (
  STREAM_BANK,
  STREAM_CLIENT,
  STREAM_EVAL,
  STREAM_FORGET,
  STREAM_INIT,
  STREAM_SAMPLE,
  STREAM_UNLEARN,
  stream_key,
)
from fu_jax.fl._programs import Batch, LocalProgram, TrainState, is_scheduled, sgd_program, step_at
from fu_jax.fl._rounds import (
  RoundResult,
  fedavg_play,
  fedavg_round,
  fedavg_round_fn,
  fedavg_rounds,
  run_rounds,
)
from fu_jax.fl._runners import (
  AUTO_RUNNER,
  DENSE_MODELS,
  RUNNERS,
  ClientResult,
  ClientRunner,
  choose_runner,
)
from fu_jax.fl._sampling import num_sampled_clients, sample_clients
from fu_jax.fl._server import (
  DivergenceError,
  ServerState,
  aggregate,
  aggregate_apply,
  check_finite,
  server_apply,
  server_init,
  server_optimizer,
)

__all__ = [
  "RUNNERS",
  "STREAM_INIT",
  "STREAM_SAMPLE",
  "STREAM_CLIENT",
  "STREAM_UNLEARN",
  "STREAM_EVAL",
  "STREAM_FORGET",
  "STREAM_BANK",
  "stream_key",
  "Batch",
  "LocalProgram",
  "is_scheduled",
  "step_at",
  "TrainState",
  "sgd_program",
  "epoch_order",
  "take_batch",
  "guarded_step",
  "epoch_start",
  "steps_per_epoch",
  "ClientResult",
  "ClientClock",
  "parallel_seconds",
  "ClientRunner",
  "AUTO_RUNNER",
  "DENSE_MODELS",
  "choose_runner",
  "sample_clients",
  "num_sampled_clients",
  "aggregate",
  "aggregate_apply",
  "ServerState",
  "server_init",
  "server_apply",
  "DivergenceError",
  "check_finite",
  "RoundResult",
  "round_cost",
  "server_optimizer",
  "fedavg_round",
  "run_rounds",
  "fedavg_play",
  "fedavg_round_fn",
  "fedavg_rounds",
]
