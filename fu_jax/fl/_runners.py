"""Client runners (vmap, loop, shard) that execute a LocalProgram for a block of clients."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax import images, multihost
from fu_jax.fl._batching import epoch_start, guarded_step, steps_per_epoch
from fu_jax.fl._clock import ClientClock
from fu_jax.fl._programs import LocalProgram, is_scheduled

RUNNERS = ("auto", "vmap", "loop", "shard")


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
      return guarded_step(step_fn, batch_size, state, data, valid, order, s, key)

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
