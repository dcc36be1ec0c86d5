"""JAX's persistent compilation cache for fu_jax's entry points (experiments.main, tests).

XLA compilation dominates a short run (digits: most of a run's seconds); the persistent
cache stores each compiled executable on disk, keyed by the program, the backend, the
compile options and XLA_FLAGS, so a second process running the same config loads the
executables instead of compiling them. Tracing and lowering to MLIR still happen in every
process (they produce the cache key).

Where the cache lives, first match wins:
  1. off, when the caller says so (experiments.main's --nocompilation_cache, or
     --compilation_cache_dir='');
  2. $JAX_COMPILATION_CACHE_DIR, when set and non-empty (JAX's own variable);
  3. the directory the caller passes (--compilation_cache_dir);
  4. $XDG_CACHE_HOME/fu_jax/jax_cache, or ~/.cache/fu_jax/jax_cache.

Every executable is cached, however fast it compiled (min compile time 0): a run compiles
many small programs (per-round steps, evaluation, aggregation) whose sum is what a rerun
would pay again. When the `filelock` package is installed the directory is bounded
(`MAX_BYTES`, least recently used entries evicted by JAX, which needs filelock for it);
without it the directory grows until removed (`rm -r` is always safe: it only costs
recompilation). JAX stores each entry as `<key>-cache` plus, when the
directory is bounded, `<key>-atime`; an entry without its atime (written by an unbounded
process, e.g. one without filelock or plain JAX, or by one killed between the two writes)
makes JAX's eviction fail every later write to the directory (each compile warns "Error
writing persistent compilation cache entry" and nothing more is cached). `enable` gives such
entries their file's modification time as atime first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
MAX_BYTES = 2 * 1024**3
# JAX's file names for an entry's executable and its last-access time (jax._src.lru_cache).
ENTRY_SUFFIX, ATIME_SUFFIX = "-cache", "-atime"


def default_dir(environ: Mapping[str, str] | None = None) -> str:
  """$XDG_CACHE_HOME/fu_jax/jax_cache, or ~/.cache/fu_jax/jax_cache."""
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fu_jax", "jax_cache")


def resolve_dir(
  flag_dir: str | None = None, enabled: bool = True, environ: Mapping[str, str] | None = None
) -> str | None:
  """The cache directory to use, or None for no persistent cache (see the module doc).

  Args:
    flag_dir: the directory asked for; None = not given (use the default), '' = off.
    enabled: False turns the cache off whatever else is set.
    environ: the environment to read (os.environ by default).
  """
  environ = os.environ if environ is None else environ
  if not enabled or flag_dir == "":
    return None
  if environ.get(ENV_VAR):
    return environ[ENV_VAR]
  if flag_dir is not None:
    return os.path.expanduser(flag_dir)
  return default_dir(environ)


def enable(directory: str | None, *, min_compile_secs: float = 0.0) -> str | None:
  """Points JAX's persistent cache at `directory` (None: turns it off). Returns it.

  Call before the first compilation of the process: JAX decides once, at its first
  compile, whether the cache is in use.
  """
  import jax  # pylint: disable=import-outside-toplevel

  if directory is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:  # e.g. a read-only home: run without the cache rather than fail
    print(f"warning: no compilation cache ({e}); compiling everything", file=sys.stderr)
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    import filelock  # pylint: disable=import-outside-toplevel
  except ImportError:  # JAX fails every cache read when a bound is set without filelock
    return directory
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  # JAX's own lock file: no bounded process evicts or writes while the entries are adopted.
  try:
    with filelock.FileLock(os.path.join(directory, ".lockfile"), timeout=10):
      adopt_entries_without_atime(directory)
  except filelock.Timeout:  # another process holds the directory: adopt them next time
    pass
  return directory


def adopt_entries_without_atime(directory: str) -> list[str]:
  """Writes `<key>-atime` (the entry's modification time, in JAX's format: nanoseconds,
  8 bytes little-endian) for every `<key>-cache` in `directory` that has none, so JAX's
  eviction can order it (see the module doc). Returns the keys adopted."""
  names = set(os.listdir(directory))
  adopted = []
  for name in sorted(names):
    key = name.removesuffix(ENTRY_SUFFIX)
    if name.endswith(ENTRY_SUFFIX) and key + ATIME_SUFFIX not in names:
      try:
        mtime = os.stat(os.path.join(directory, name)).st_mtime_ns
      except FileNotFoundError:  # evicted meanwhile: nothing to adopt
        continue
      with open(os.path.join(directory, key + ATIME_SUFFIX), "wb") as f:
        f.write(mtime.to_bytes(8, "little"))
      adopted.append(key)
  return adopted


class Stats:
  """Counts persistent-cache hits and misses, and programs lowered, reported through
  jax.monitoring.

  `lowered` counts every program JAX lowers to MLIR in the process, cache or no cache:
  each pays tracing, lowering and a cache lookup in every process (the persistent cache
  is keyed by the lowered module), so it is the number that sets a run's fixed cost. A
  jax.numpy operation run outside jit is a program of its own (one per shape).

  One per process (`stats()`): jax.monitoring has no way to unregister a listener.
  """

  HIT, MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
  LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"

  def __init__(self):
    import jax  # pylint: disable=import-outside-toplevel

    self.hits = self.misses = self.lowered = 0
    jax.monitoring.register_event_listener(self._listen)
    jax.monitoring.register_event_duration_secs_listener(self._listen_duration)

  def _listen_duration(self, event, duration, **kwargs):
    del duration, kwargs
    if event == self.LOWER:
      self.lowered += 1

  def _listen(self, event, **kwargs):
    del kwargs
    if event == self.HIT:
      self.hits += 1
    elif event == self.MISS:
      self.misses += 1


_STATS = None


def stats() -> Stats:
  global _STATS  # pylint: disable=global-statement
  if _STATS is None:
    _STATS = Stats()
  return _STATS
