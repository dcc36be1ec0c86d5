"""Atomic, resumable checkpoints of a phase's state pytree (the only orbax import).

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed at any moment leaves either the previous complete step or the new one,
never a half-written checkpoint; incomplete temporaries are cleaned up on the next start.
Next to the steps sits `config.json`, the configuration the checkpoints were made with;
resuming with a different one is refused, naming the keys that differ.

Several processes (fu_jax/multihost.py): every process holds the same state, so each array
is saved as one global array replicated over every device of every process, through
orbax's multi-process path (every process calls save and restore together; orbax writes
each array once, from the replica on process 0, and synchronises the processes around each
step); a restored state is gathered back to process-local arrays. The directory must be
one every process sees (a shared filesystem), as orbax requires.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fu_jax import multihost


class ConfigMismatchError(ValueError):
  """Resuming a workdir whose checkpoints were written with another configuration."""


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old: dict, new: dict) -> list[str]:
  """Dotted keys whose values differ (or exist on one side only), sorted."""
  a, b = _flatten(old), _flatten(new)
  return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def write_json_atomic(path: str, obj: Any):
  """Write JSON through a temporary file and os.replace: readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def json_value(obj: Any):
  """`obj` as it reads back from the file write_json_atomic writes (tuples as lists,
  numpy scalars and arrays as Python values)."""
  return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class Checkpointer:
  """Saves a state pytree every `every` steps under `directory`; restores the latest.

  Checkpointer(directory, config).restore_or(init_state) -> (state, step, meta).
  """

  def __init__(self, directory: str, config: dict, *, every: int = 1, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    cfg_path = os.path.join(self.directory, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        old = json.load(f)
      # Round-trip through JSON so tuples/lists and ints/floats compare as stored.
      new = json.loads(json.dumps(config, default=_json_default))
      diff = config_diff(old, new)
      if diff:
        details = ", ".join(
          f"{k}: {_flatten(old).get(k, '<missing>')!r} -> {_flatten(new).get(k, '<missing>')!r}"
          for k in diff
        )
        raise ConfigMismatchError(
          f"{self.directory} holds checkpoints made with a different config ({details}); "
          "use another --workdir or the original config."
        )
    elif multihost.is_primary():
      write_json_atomic(cfg_path, config)
    self.every = max(1, int(every))
    self._manager = ocp.CheckpointManager(
      os.path.join(self.directory, "steps"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_or(self, init_state, meta_template=None):
    """(state, step, meta) of the latest save, or (init_state, 0, None) when none exists.

    meta is a JSON-able dict saved atomically with the state (run costs, timings).
    """
    step = self.latest_step()
    if step is None:
      return init_state, 0, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _global(init_state))
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    state = restored.state
    if multihost.process_count() > 1:
      state = multihost.gather(state)
    return state, step, restored.meta

  def maybe_save(self, step: int, state, *, meta=None, force: bool = False):
    """Saves after step `step` (steps count completed rounds) when due or forced."""
    if force or step % self.every == 0:
      if self._manager.latest_step() != step:
        with sigint_deferred():
          self._save(step, state, meta)

  def _save(self, step: int, state, meta):
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_global(state)), meta=ocp.args.JsonSave(meta or {})
      ),
      force=True,
    )
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


@contextlib.contextmanager
def sigint_deferred():
  """Holds a Ctrl-C (SIGINT) that arrives inside the block until the block ends, then
  delivers it to the handler that was installed.

  A KeyboardInterrupt raised in the middle of orbax's save leaves its helper threads
  writing metadata while the interpreter shuts down (they print a traceback), so a save runs
  to its end and the interrupt follows it. Only the main thread can install handlers;
  elsewhere the block runs as is.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  held = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if held and callable(previous):  # e.g. Python's default, which raises KeyboardInterrupt
    previous(*held[0])
  elif held and previous == signal.SIG_DFL:
    signal.raise_signal(signal.SIGINT)


def _global(state):
  """With several processes, every array of `state` (the same in every process) as a
  global array replicated over all devices; with one process, `state` itself."""
  if multihost.process_count() == 1:
    return state
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
  return multihost.put_replicated(state, mesh)
