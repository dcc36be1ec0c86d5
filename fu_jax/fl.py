"""Federated averaging: local programs, client runners, aggregation and sampling.

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

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import images, losses, multihost
from fu_jax import tree as tu

RUNNERS = ("auto", "vmap", "loop", "shard")

# Streams keep independent randomness apart: key(seed) -> fold_in(stream) -> fold_in(...).
STREAM_INIT, STREAM_SAMPLE, STREAM_CLIENT, STREAM_UNLEARN, STREAM_EVAL = range(5)
STREAM_FORGET = 5  # which samples a kind='samples' request forgets (per client)
STREAM_BANK = 6  # the training seeds of an audit's model bank (experiments/audit.py)


def stream_key(seed: int, stream: int, *ids: int):
  """PRNG key for (seed, stream, *ids), derived only by fold_in (nothing to checkpoint).

  Called with host integers it is one jitted program per number of ids (the same bits:
  outside jit `key(seed)` and `fold_in` convert a Python int to an int32 / uint32 array
  too), instead of a program per primitive run eagerly in every process.
  """
  ids = (stream, *ids)
  if _fits(seed, np.int32) and all(_fits(i, np.uint32) for i in ids):
    return _stream_key_jit(np.int32(seed), np.asarray(ids, np.uint32))
  return _stream_key(seed, *ids)


def _fits(v, dtype) -> bool:
  """Whether v is a host integer within dtype's range."""
  info = np.iinfo(dtype)
  return isinstance(v, (int, np.integer)) and info.min <= int(v) <= info.max


def _stream_key(seed, stream, *ids):
  key = jax.random.fold_in(jax.random.key(seed), stream)
  for i in ids:
    key = jax.random.fold_in(key, i)
  return key


@jax.jit
def _stream_key_jit(seed, ids):
  return _stream_key(seed, *(ids[i] for i in range(ids.shape[0])))


class Batch(NamedTuple):
  """One mini-batch of a client: x and y are pytrees with a leading batch axis."""

  x: Any
  y: Any
  mask: Any  # bool [B]


class LocalProgram(NamedTuple):
  """A client's local computation.

  init(server_params, extra, key) -> state      extra: per-client pytree (masks, anchors...)
  step(state, batch, key) -> (state, metrics)   metrics: dict of scalars (batch means)
  finish(state) -> params                       what the client sends back

  Optionally a second step taken on a static schedule (both or neither given): on local
  step i (= epoch * steps_per_epoch + s, a Python int) the runners call `scheduled_step`
  where schedule(i) is True; its state and metrics have the same structure as `step`'s.
  The choice is made on the host, not by lax.cond: XLA:CPU runs a conv network's gradient
  ~19x slower inside a conditional branch (measured, CNN batch 64), so a costly occasional
  step (e.g. QuickDrop's distillation) under lax.cond would make every step slow.
  """

  init: Callable
  step: Callable
  finish: Callable
  scheduled_step: Callable | None = None
  schedule: Callable[[int], bool] | None = None


def is_scheduled(program: LocalProgram, i: int) -> bool:
  """Whether `program` takes its scheduled step on local step i (see LocalProgram)."""
  return program.scheduled_step is not None and bool(program.schedule(i))


def step_at(program: LocalProgram, i: int) -> Callable:
  """The step function `program` takes on local step i."""
  return program.scheduled_step if is_scheduled(program, i) else program.step


class TrainState(NamedTuple):
  params: Any
  opt_state: Any


def sgd_program(
  apply_fn, optimizer: optax.GradientTransformation, *, loss_fn=None, opt_init=None
) -> LocalProgram:
  """Mini-batch training of `loss_fn(params, batch) -> scalar` (default masked CE).

  opt_init(params, extra) -> opt_state lets per-client transform state (channel masks,
  EWC anchors and Fisher values) come from the client's `extra`.
  """
  if loss_fn is None:

    def loss_fn(params, batch):
      return losses.masked_ce(apply_fn(params, batch.x), batch.y, batch.mask)

  if opt_init is None:
    opt_init = lambda params, extra: optimizer.init(params)

  def init(server_params, extra, key):
    del key
    return TrainState(server_params, opt_init(server_params, extra))

  def step(state, batch, key):
    del key
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), {"loss": loss}

  return LocalProgram(init, step, lambda state: state.params)


# ---------------------------------------------------------------------------------------
# Ordering and batching (pure, per client).


def epoch_order(key, valid):
  """Permutation of positions with valid examples first, in a random order.

  Each position's sort key comes from fold_in(key, position), so the order of the valid
  examples is the same however far the client is padded.
  """
  n = valid.shape[0]
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(n))
  return jnp.argsort(jnp.where(valid, u, 2.0 + jnp.arange(n) / n))


def take_batch(data, valid, order, step, batch_size):
  """Batch `step` of an epoch ordered by `order`; rows past the end are masked out.

  data may hold `images.ClientImages` (a client's index row into the one copy of the
  training images): the batch's index entries are selected first and only those images
  gathered (and normalised, by table lookup) here, inside the jitted step.
  """
  n = valid.shape[0]
  pos = step * batch_size + jnp.arange(batch_size)
  idx = order[jnp.minimum(pos, n - 1)]
  in_range = pos < n
  x, y = images.materialize(jax.tree.map(lambda a: jnp.take(a, idx, axis=0), (data[0], data[1])))
  return Batch(x, y, jnp.take(valid, idx) & in_range)


def _guarded_step(step_fn, batch_size, state, data, valid, order, step, key):
  batch = take_batch(data, valid, order, step, batch_size)
  new_state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
  nonempty = jnp.any(batch.mask)
  state = jax.tree.map(lambda n, o: jnp.where(nonempty, n, o), new_state, state)
  n = jnp.sum(batch.mask).astype(jnp.float32)
  return state, jax.tree.map(lambda m: m * n, metrics), n


def epoch_start(key, epoch, valid):
  """(the epoch's key fold_in(key, epoch), its example order epoch_order(that key, valid))."""
  ek = jax.random.fold_in(key, epoch)
  return ek, epoch_order(ek, valid)


def steps_per_epoch(max_n: int, batch_size: int) -> int:
  return max(1, math.ceil(max_n / batch_size))


# ---------------------------------------------------------------------------------------
# Runners.


class ClientResult(NamedTuple):
  params: Any  # stacked [clients, ...]
  state: Any  # stacked final local states (methods read e.g. synthetic sets here)
  metrics: dict  # per-client means over all their examples and epochs, [clients]


# Host-side helpers of the runners, each one jitted program (per shape) where the same
# work run eagerly was a program per primitive and leaf shape, traced and lowered again in
# every process.
@jax.jit
def _select_client(tree, c):
  """Client c's slice of every leaf (data, valid, extra, keys) of a block."""
  return jax.tree.map(lambda a: a[c], tree)


@jax.jit
def _stack_clients(params, states):
  """The per-client results stacked along a new leading client axis."""
  stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  return stack(params), stack(states)


def _host_sum(zeros, step_metrics):
  """zeros + each step's metric sums, in order, in float32 on the host (the same additions
  as on the device, without a program per metric shape)."""
  sums = zeros
  for m in jax.device_get(step_metrics):
    sums = jax.tree.map(np.add, sums, m)
  return sums


def _mean_metrics(sums, counts):
  return jax.tree.map(lambda s: s / np.maximum(counts, 1.0), sums)


class ClientClock:
  """Per-client wall time of the loop runner, for the critical path of a parallel deployment.

  The loop runner trains the sampled clients one after another; deployed, they train at
  the same time. For each `run` call it times every client (its steps and `finish`, waited
  for with block_until_ready) and records the call's sum and maximum:

    serial    sum over calls of the clients' seconds (what the loop actually spent)
    critical  sum over calls of the slowest client's seconds

  so that work - serial + critical is the wall time had the clients of each call run in
  parallel. Calls are treated as sequential phases (a barrier between them: e.g. FedAF's
  Fisher pass, then its unlearning pass over the same clients), which bounds the ideal
  critical path from above. vmap / shard runners record nothing: their call already runs
  the clients in parallel.

  now() -> seconds is the clock read around each client; a caller may pass one that
  excludes compilation time (experiments.clock.compiled_now does).
  """

  def __init__(self, now: Callable[[], float] = time.perf_counter):
    self.now = now
    self.serial = 0.0
    self.critical = 0.0

  def record(self, seconds: Sequence[float]):
    if len(seconds):
      self.serial += float(sum(seconds))
      self.critical += float(max(seconds))

  def totals(self) -> tuple[float, float]:
    return self.serial, self.critical


def parallel_seconds(
  seconds: float, before: tuple[float, float], after: tuple[float, float]
) -> float:
  """`seconds` of work with the loop-run clients recorded between two ClientClock.totals()
  replaced by their critical path: seconds - (serial - critical) over the interval."""
  serial, critical = after[0] - before[0], after[1] - before[1]
  return max(0.0, seconds - serial + critical)


@functools.lru_cache(maxsize=16)
def _compiled_program(program: LocalProgram, kind: str, batch_size: int):
  """The jitted (step, scheduled_step, init, epoch_start, finish) of a program, shared by every
  runner of an equal program (its functions compare by identity: a factory that returns the
  same LocalProgram for the same settings, e.g. one under functools.lru_cache, gets them
  compiled once per process; an audit builds K runners per method). Bounded: the entries
  keep their executables alive.
  """

  def compile_step(step_fn):
    def step(state, data, valid, order, s, key, tables):
      # The image tables arrive as arguments (see images.detach), shared by all clients.
      data = images.attach(data, tables)
      return _guarded_step(step_fn, batch_size, state, data, valid, order, s, key)

    if kind != "loop":
      step = jax.vmap(step, in_axes=(0, 0, 0, 0, None, 0, None))
    return jax.jit(step, donate_argnums=(0,))

  scheduled = compile_step(program.scheduled_step) if program.scheduled_step is not None else None
  if kind == "loop":
    return (
      compile_step(program.step),
      scheduled,
      jax.jit(program.init),
      jax.jit(epoch_start),
      jax.jit(program.finish),
    )
  return (
    compile_step(program.step),
    scheduled,
    jax.jit(jax.vmap(program.init, in_axes=(None, 0, 0))),
    jax.jit(jax.vmap(epoch_start, in_axes=(0, None, 0))),
    jax.jit(jax.vmap(program.finish)),
  )


class ClientRunner:
  """Runs a LocalProgram for a block of clients; jitted functions are built once.

  run(server_params, data, valid, extra, keys) with leading client axes on data (x, y),
  valid, extra and keys returns a ClientResult. All runners agree to float tolerance.
  clock: an optional ClientClock the loop runner reports its per-client times to.
  devices: loop runner only; None or one device = one client at a time (the default). With
    D devices, clients c0..c0+D-1 train at once, client c0+i on devices[i]: their jitted
    steps are dispatched alternately and run concurrently (JAX dispatch is asynchronous).
    Meant for D host CPU devices with one intra-op thread each
    (`xla_flags.per_core_devices`), so
    each core trains its own client instead of two cores sharing one small batch. Each
    client's computation is the same program as with one device (results agree to float
    tolerance; bit-identical when the one-device run is single-threaded too). The clock
    then records each group's wall time as one entry (clients of a group overlap).
  """

  def __init__(
    self,
    program: LocalProgram,
    *,
    kind: str,
    epochs: int,
    batch_size: int,
    chunk_size: int = 0,
    mesh=None,
    clock: ClientClock | None = None,
    devices: Sequence | None = None,
  ):
    if kind not in RUNNERS[1:]:
      raise ValueError(f"runner {kind!r} is not one of {RUNNERS}")
    if epochs < 1 or batch_size < 1:
      raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if (program.scheduled_step is None) != (program.schedule is None):
      raise ValueError(
        "LocalProgram.scheduled_step and .schedule go together: got only "
        f"{'schedule' if program.scheduled_step is None else 'scheduled_step'}"
      )
    if devices is not None and kind != "loop" and len(devices) > 1:
      raise ValueError(f"devices= is for the loop runner (kind={kind!r}: use mesh= for shard)")
    if devices is not None and len(devices) == 0:
      raise ValueError("devices= must name at least one device, got an empty sequence")
    self.devices = list(devices) if devices is not None and len(devices) > 1 else None
    self.program, self.kind, self.epochs, self.batch_size = program, kind, epochs, batch_size
    self.chunk_size = chunk_size
    self.clock = clock
    (self._step, self._scheduled, self._init, self._epoch, self._finish) = _compiled_program(
      program, kind, batch_size
    )
    self.mesh = mesh
    self._tables = None
    if kind == "shard":
      if mesh is None:  # every device of every process
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("clients",))
      self.mesh = mesh
      self._client_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("clients")
      )

  def _step_fn(self, i: int):
    """The compiled step for local step i: the program's scheduled step where due."""
    return self._scheduled if is_scheduled(self.program, i) else self._step

  def _metric_zeros(self, server_params, data, valid, extra, keys, tables):
    """Zero metric sums shaped like one step's metrics (for clients with no batch).

    Shapes come from the jitted step itself, whose trace is cached for the real calls.
    """
    if self.kind != "loop":
      state = jax.eval_shape(self._init, server_params, extra, keys)
      order = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
      _, m, _ = jax.eval_shape(self._step, state, data, valid, order, 0, keys, tables)
      return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), m)
    one = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), (data, valid, extra, keys)
    )
    state = jax.eval_shape(self._init, server_params, one[2], one[3])
    order = jax.ShapeDtypeStruct(valid.shape[1:], jnp.int32)
    _, m, _ = jax.eval_shape(self._step, state, one[0], one[1], order, 0, one[3], tables)
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), m)

  # -- loop over devices: a group of clients at once, one per device.
  def _run_loop_devices(self, server_params, data, valid, extra, keys, tables):
    counts = np.asarray(valid).sum(axis=1)
    max_n = valid.shape[1]
    zeros = self._metric_zeros(server_params, data, valid, extra, keys, tables)
    devs = self.devices
    home = devs[0]
    # The server model and the image tables, once per device per call.
    per_dev = [jax.device_put((server_params, tables), d) for d in devs]
    num = valid.shape[0]
    params_out, states_out, sums_out, seconds = [None] * num, [None] * num, [None] * num, []
    for c0 in range(0, num, len(devs)):
      t0 = self.clock.now() if self.clock is not None else 0.0
      group = list(range(c0, min(c0 + len(devs), num)))
      run = []  # per client: [device index, state, step metrics, (d, v, k) on device, n_steps]
      for i, c in enumerate(group):
        local = jax.device_put(_select_client((data, valid, extra, keys), c), devs[i])
        d_c, v_c, e_c, k_c = local
        n_steps = min(
          steps_per_epoch(max_n, self.batch_size), math.ceil(int(counts[c]) / self.batch_size)
        )
        run.append([i, self._init(per_dev[i][0], e_c, k_c), [], local, n_steps])
      for epoch in range(self.epochs):
        eks, orders = zip(*(self._epoch(r[3][3], epoch, r[3][1]) for r in run))
        for s in range(max(r[4] for r in run)):
          for r, order, ek in zip(run, orders, eks):  # alternate: each device gets a step
            if s < r[4]:
              i, (d_c, v_c, _, _) = r[0], r[3]
              r[1], m, _ = self._step_fn(epoch * r[4] + s)(
                r[1], d_c, v_c, order, s, ek, per_dev[i][1]
              )
              r[2].append(m)
      for c, r in zip(group, run):
        params_out[c] = jax.device_put(self._finish(r[1]), home)
        states_out[c] = jax.device_put(r[1], home)
        sums_out[c] = _host_sum(zeros, r[2])
      if self.clock is not None:
        jax.block_until_ready((params_out[c0 : c0 + len(group)], states_out[c0 : c0 + len(group)]))
        seconds.append(self.clock.now() - t0)
    if self.clock is not None:
      self.clock.record(seconds)
    metrics = _mean_metrics(jax.tree.map(lambda *a: np.stack(a), *sums_out), counts * self.epochs)
    return ClientResult(*_stack_clients(params_out, states_out), metrics)

  # -- loop: one client at a time, only its non-empty batches.
  def _run_loop(self, server_params, data, valid, extra, keys, tables):
    counts = np.asarray(valid).sum(axis=1)
    max_n = valid.shape[1]
    zeros = self._metric_zeros(server_params, data, valid, extra, keys, tables)
    params_out, states_out, sums_out, seconds = [], [], [], []
    for c in range(valid.shape[0]):
      t0 = self.clock.now() if self.clock is not None else 0.0
      d_c, v_c, e_c, k_c = _select_client((data, valid, extra, keys), c)
      state = self._init(server_params, e_c, k_c)
      step_metrics = []
      n_steps = min(
        steps_per_epoch(max_n, self.batch_size), math.ceil(int(counts[c]) / self.batch_size)
      )
      for epoch in range(self.epochs):
        ek, order = self._epoch(k_c, epoch, v_c)
        for s in range(n_steps):
          state, m, _ = self._step_fn(epoch * n_steps + s)(state, d_c, v_c, order, s, ek, tables)
          step_metrics.append(m)
      params_out.append(self._finish(state))
      states_out.append(state)
      sums_out.append(_host_sum(zeros, step_metrics))
      if self.clock is not None:
        jax.block_until_ready((params_out[-1], state))
        seconds.append(self.clock.now() - t0)
    if self.clock is not None:
      self.clock.record(seconds)
    metrics = _mean_metrics(jax.tree.map(lambda *a: np.stack(a), *sums_out), counts * self.epochs)
    return ClientResult(*_stack_clients(params_out, states_out), metrics)

  # -- vmap / shard: a block of clients per call.
  def _run_block(self, server_params, data, valid, extra, keys, tables):
    counts = np.asarray(valid).sum(axis=1)
    if self.kind == "shard":
      # Each process places only its own devices' clients; what every client reads (the
      # server model, the image tables) is replicated over the mesh.
      put = lambda a: multihost.put_sharded(a, self._client_sharding)
      data, valid, extra, keys = jax.tree.map(put, (data, valid, extra, keys))
      server_params = multihost.put_replicated(server_params, self.mesh)
      tables = self._replicated_tables(tables)
    state = self._init(server_params, extra, keys)
    n_steps = min(
      steps_per_epoch(valid.shape[1], self.batch_size),
      math.ceil(int(counts.max(initial=0)) / self.batch_size),
    )
    sums = self._metric_zeros(server_params, data, valid, extra, keys, tables)
    for epoch in range(self.epochs):
      eks, order = self._epoch(keys, epoch, valid)
      for s in range(n_steps):
        state, m, _ = self._step_fn(epoch * n_steps + s)(state, data, valid, order, s, eks, tables)
        sums = jax.tree.map(jnp.add, sums, m)
    if self.kind == "shard":
      # The clients' results whole in every process (an all-gather across processes), so
      # aggregation and everything after it run on one device, as with one process.
      state, sums = multihost.gather((state, sums))
    metrics = _mean_metrics(jax.tree.map(np.asarray, sums), counts * self.epochs)
    return ClientResult(self._finish(state), state, metrics)

  def _replicated_tables(self, tables):
    # The tables hold the same arrays in every round: replicate them over the mesh once.
    leaves = jax.tree.leaves(tables)
    if (
      self._tables is None
      or len(leaves) != len(self._tables[0])
      or any(a is not b for a, b in zip(leaves, self._tables[0]))
    ):
      self._tables = (leaves, multihost.put_replicated(tables, self.mesh))
    return self._tables[1]

  def run(self, server_params, data, valid, extra, keys) -> ClientResult:
    data, tables = images.detach(data)
    if self.kind == "loop":
      loop = self._run_loop_devices if self.devices else self._run_loop
      return loop(server_params, data, valid, extra, keys, tables)
    num = valid.shape[0]
    chunk = self.chunk_size or num
    if self.kind == "shard":
      ndev = self.mesh.devices.size
      chunk = math.ceil(chunk / ndev) * ndev
    results = []
    for start in range(0, num, chunk):
      sl = lambda a: a[start : start + chunk]
      block, block_keys = jax.tree.map(sl, (data, valid, extra)), keys[start : start + chunk]
      pad = chunk - block[1].shape[0]
      if pad:  # a short last block is padded with empty clients so shapes never change
        block = jax.tree.map(
          lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]), block
        )
        block_keys = jnp.concatenate([block_keys, keys[jnp.zeros(pad, jnp.int32)]])
      res = self._run_block(server_params, *block, block_keys, tables)
      if pad:
        res = jax.tree.map(lambda a: a[: chunk - pad], res)
      results.append(res)
    if len(results) == 1:
      return results[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *results)


# `auto`, per backend and model family: the runner benchmarks/fl_round.py measured fastest.
# On XLA:CPU a vmapped conv step becomes a grouped convolution that runs 2-3x slower than
# per-client steps (BUILD.md), while dense-only models gain from vmap. On accelerators the
# sampled clients go into one vmapped kernel launch per step, split over every device
# (`shard`: on one device the same program as vmap). A backend not listed is treated as an
# accelerator. With several processes experiments.env picks `shard` on every backend: it
# is the one runner whose client axis spans processes.
AUTO_RUNNER = {
  "cpu": {"conv": "loop", "dense": "vmap"},
  "gpu": {"conv": "shard", "dense": "shard"},
  "tpu": {"conv": "shard", "dense": "shard"},
}
DENSE_MODELS = ("mlp",)


def choose_runner(model_name: str, backend: str | None = None) -> str:
  """The runner `auto` stands for on `backend` (default: JAX's) for `model_name`."""
  backend = backend or jax.default_backend()
  family = "dense" if model_name in DENSE_MODELS else "conv"
  return AUTO_RUNNER.get(backend, AUTO_RUNNER["gpu"])[family]


# ---------------------------------------------------------------------------------------
# Sampling, aggregation, server update.


def sample_clients(seed: int, round_idx: int, weights, num_sampled: int):
  """Clients for a round, deterministic in (seed, round).

  Gumbel top-k over clients with weight > 0 (sampling without replacement); the result has
  a fixed length `num_sampled` so removing a client never changes a shape. Returns
  (indices [num_sampled] sorted, active [num_sampled] bool): when fewer clients have
  weight > 0 than are asked for, the extra slots are inactive.
  """
  if (
    _fits(seed, np.int32)
    and _fits(round_idx, np.uint32)
    and not isinstance(weights, jax.core.Tracer)
  ):
    # One jitted program per (number of clients, num_sampled), not one per primitive.
    return _sample_clients_jit(
      np.int32(seed), np.uint32(round_idx), np.asarray(weights, np.float32), num_sampled
    )
  return _sample_clients(seed, round_idx, weights, num_sampled)


def _sample_clients(seed, round_idx, weights, num_sampled):
  weights = jnp.asarray(weights, jnp.float32)
  key = stream_key(seed, STREAM_SAMPLE, round_idx)
  g = jax.random.gumbel(key, weights.shape)
  score = jnp.where(weights > 0, g, -jnp.inf)
  _, idx = jax.lax.top_k(score, num_sampled)
  active = jnp.take(weights, idx) > 0
  order = jnp.argsort(idx)
  return idx[order], active[order]


_sample_clients_jit = jax.jit(_sample_clients, static_argnums=3)


def num_sampled_clients(clients_per_round, num_clients: int) -> int:
  """A fraction in (0, 1] of num_clients, or a whole count in [1, num_clients]."""
  v = clients_per_round
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    if 0 < v <= 1 and isinstance(v, float):
      return max(1, round(v * num_clients))
    if float(v).is_integer() and 1 <= v <= num_clients:
      return int(v)
  raise ValueError(
    f"clients_per_round={v!r}: allowed a fraction in (0, 1] or a whole count in [1, {num_clients}]"
  )


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


class RoundResult(NamedTuple):
  server: ServerState
  sampled: np.ndarray
  metrics: dict  # weighted means over participating clients
  client: ClientResult
  counts: np.ndarray = None  # [num_sampled] valid rows of each sampled client
  weights: np.ndarray = None  # [num_sampled] its aggregation weight (0: not aggregated)


def round_cost(
  counts,
  weights,
  *,
  model_bytes: int,
  epochs: int,
  upload_bytes: int | None = None,
  download_bytes: int | None = None,
) -> dict:
  """Communication and work of one round, the same rule for every method.

  A sampled client takes part when it has rows to train on (counts > 0) and its update is
  aggregated (weights > 0): it downloads the current model and uploads its result. A
  client with nothing to train on does neither. The model broadcast after a method's last
  round is not counted (FedAvg's training and retrain do not count theirs either), so a
  method's first round downloads the model it starts from.

  counts, weights: [k] per sampled (or target) client; upload_bytes / download_bytes
  default to model_bytes (e.g. a masked update uploads only its packed entries);
  examples = rows trained on * epochs. Returns {'bytes_up', 'bytes_down', 'examples'}.
  """
  counts = np.asarray(counts)
  part = (counts > 0) & (np.asarray(weights) > 0)
  n = int(part.sum())
  up = model_bytes if upload_bytes is None else upload_bytes
  down = model_bytes if download_bytes is None else download_bytes
  return {
    "bytes_up": n * int(up),
    "bytes_down": n * int(down),
    "examples": int(counts[part].sum()) * int(epochs),
  }


@functools.lru_cache(maxsize=32)
def server_optimizer(lr: float) -> optax.GradientTransformation:
  """optax.sgd(lr), one object per lr (sgd(1) = plain FedAvg).

  The server optimizer is a static argument of the jitted server updates, and jit compares
  static arguments by equality, which for an optax transform (a tuple of closures) is
  identity: a fresh optax.sgd per phase would compile each update again.
  """
  return optax.sgd(lr)


@functools.partial(jax.jit, static_argnums=(3,))
def _aggregate_apply(server, client_params, weights, server_opt):
  return server_apply(server, aggregate(server.params, client_params, weights), server_opt)


def _round_inputs(seed, round_idx, client_weights, data, valid, extra, num_sampled, stream):
  """A round's sampled clients: (idx, their data, valid, extra, client keys, example counts,
  aggregation weights = counts * client weight * active)."""
  idx, active = _sample_clients(seed, round_idx, client_weights, num_sampled)
  take = lambda a: jnp.take(a, idx, axis=0)
  d, v, e = jax.tree.map(take, (data, valid, extra))
  keys = jax.vmap(lambda c: _stream_key(seed, stream, round_idx, c))(idx)
  counts = jnp.sum(v, axis=1).astype(jnp.float32)
  w = counts * jnp.take(jnp.asarray(client_weights, jnp.float32), idx) * active
  return idx, d, v, e, keys, counts, w


# One program per phase's shapes: sampling, selection and keys were ~25 eager programs.
_round_inputs_jit = jax.jit(_round_inputs, static_argnums=(6, 7))


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
  args = (seed, round_idx, client_weights, data, valid, extra, num_sampled, stream)
  if _fits(seed, np.int32) and _fits(round_idx, np.uint32):
    weights = np.asarray(client_weights, np.float32)
    args = (np.int32(seed), np.uint32(round_idx), weights, *args[3:])
    idx, d, v, e, keys, counts, w = _round_inputs_jit(*args)
  else:
    idx, d, v, e, keys, counts, w = _round_inputs(*args)
  res = runner.run(server.params, d, v, e, keys)
  if server_update is None:
    server = _aggregate_apply(server, res.params, w, server_opt)
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
