"""Several processes, one run: start-up, placement of global arrays, gathering, barriers.

Every process runs the same program on the same data (each loads the dataset and draws
the same partition from the seed). Only the `shard` runner's client steps span processes:
their inputs become global arrays over a mesh of every device of every process, each
process placing only the rows of the clients its own devices hold (`put_sharded`), and
their outputs are gathered back (`gather`) so that everything after a runner call
(aggregation, methods' bookkeeping, evaluation) is an ordinary single-device computation,
the same in every process and the same as in a one-process run with as many devices.
Process 0 (`is_primary`) alone writes files; `barrier` orders the processes around them.

With one process every function here is the single-process operation it generalises
(`put_sharded` is `jax.device_put`, `gather` a copy to the default device, `barrier` a
no-op), so a one-process run never depends on this module's multi-process paths.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
  "initialize",
  "check_args",
  "process_count",
  "is_primary",
  "barrier",
  "put_sharded",
  "put_replicated",
  "gather",
]

_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


def check_args(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> bool:
  """Whether the three arguments ask for several processes; ValueError naming a bad one.

  All absent (None, or num_processes 1 without an address) means one process. Otherwise
  the address must be host:port, num_processes >= 1 and 0 <= process_id < num_processes.
  """
  if coordinator_address in (None, "") and process_id in (None, 0) and num_processes in (None, 1):
    return False
  if coordinator_address in (None, ""):
    raise ValueError(
      "--coordinator_address is required with --num_processes / --process_id "
      "(host:port of process 0, the same for every process)"
    )
  if not _ADDRESS.match(coordinator_address):
    raise ValueError(
      f"--coordinator_address={coordinator_address!r}: expected host:port, e.g. localhost:12355"
    )
  if num_processes is None or num_processes < 1:
    raise ValueError(
      f"--num_processes={num_processes!r}: must be an int >= 1 (the number of "
      "processes started with this command)"
    )
  if process_id is None or not 0 <= process_id < num_processes:
    raise ValueError(
      f"--process_id={process_id!r}: allowed 0..{num_processes - 1} (distinct for every process)"
    )
  return True


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout_seconds: int = 300,
) -> bool:
  """Joins the run of `num_processes` processes (jax.distributed.initialize); returns
  whether there are several. Call before any JAX computation.

  On CPU, cross-process collectives go through gloo (`jax_cpu_collectives_implementation`,
  set explicitly: the default has changed between JAX versions). On GPU / TPU JAX's own
  collectives are used; on TPU pods and SLURM / MPI clusters jax.distributed can also find
  the arguments itself, which this function does not try: give them explicitly.
  """
  if not check_args(coordinator_address, num_processes, process_id):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id, initialization_timeout=timeout_seconds
  )
  return True


def process_count() -> int:
  return jax.process_count()


def is_primary() -> bool:
  """Process 0: the one that writes results, logs and comparison files."""
  return jax.process_index() == 0


def barrier(name: str):
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _is_key(a) -> bool:
  return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


def _from_host(host: np.ndarray, sharding) -> jax.Array:
  # Each process slices and transfers only the shards of its own (addressable) devices.
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_sharded(a, sharding):
  """`a` (the same value in every process) as a global array laid out by `sharding`.

  One process: jax.device_put. Several: each process places only the slices its devices
  hold (for the client axis: its own clients' rows). PRNG key arrays go through their raw
  key data.
  """
  if jax.process_count() == 1 or sharding.is_fully_addressable:
    return jax.device_put(a, sharding)
  if _is_key(a):
    data = _from_host(np.asarray(jax.random.key_data(a)), sharding)
    impl = jax.random.key_impl(a)
    return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
  return _from_host(np.asarray(a), sharding)


def put_replicated(tree, mesh):
  """Every array leaf of `tree` (the same in every process) replicated on every device of
  `mesh`."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda a: put_sharded(a, rep) if _is_array(a) else a, tree)


def _is_array(a) -> bool:
  return isinstance(a, (jax.Array, np.ndarray))


def _gather_one(a):
  if not isinstance(a, jax.Array):
    return a
  if a.is_fully_addressable:
    # One device: already local. Several local devices: one copy on the default device, so
    # what follows runs as it would after a multi-process gather.
    if len(a.sharding.device_set) == 1:
      return a
    return jax.device_put(a, jax.local_devices()[0])
  if a.is_fully_replicated:
    return jax.device_put(a.addressable_data(0), jax.local_devices()[0])
  local = jax.local_devices()[0]
  if _is_key(a):
    data = multihost_utils.process_allgather(jax.random.key_data(a), tiled=True)
    return jax.random.wrap_key_data(jax.device_put(data, local), impl=jax.random.key_impl(a))
  return jax.device_put(multihost_utils.process_allgather(a, tiled=True), local)


def gather(tree) -> Any:
  """Every array leaf of `tree` whole on this process's default device (committed there).

  A leaf spread over devices of several processes is all-gathered (every process calls
  this together); one spread over several local devices is copied to the default device;
  a single-device leaf is returned as it is.
  """
  return jax.tree.map(_gather_one, tree)
