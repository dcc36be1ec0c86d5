"""The compile clock: XLA compilation time, measured apart from the compiled run time."""

from __future__ import annotations

import contextlib
import time

import jax


class CompileClock:
  """Sums XLA compilation time reported through jax.monitoring while active."""

  EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  )

  def __init__(self):
    self.seconds = 0.0
    # Per event: tracing, lowering to MLIR, and XLA's compilation, which with the
    # persistent cache (fu_jax/compilation_cache.py) becomes loading the executable.
    self.by_event = dict.fromkeys(self.EVENTS, 0.0)
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event in self.EVENTS:
      self.seconds += duration
      self.by_event[event] += duration

  @contextlib.contextmanager
  def measure(self):
    """Yields a dict filled with wall and compile seconds of the block (nestable)."""
    out = {}
    before = self.seconds
    t0 = time.perf_counter()
    try:
      yield out
    finally:
      out["wall"] = time.perf_counter() - t0
      out["compile"] = self.seconds - before


_CLOCK = None


def compile_clock() -> CompileClock:
  """The process's compile clock (its `seconds` sum every compilation since created)."""
  global _CLOCK  # one listener per process: jax.monitoring has no way to scope it
  if _CLOCK is None:
    _CLOCK = CompileClock()
  return _CLOCK


def compiled_now() -> float:
  """Wall seconds minus the compilation seconds so far: differences of it are compiled run
  time (the clock the loop runner's per-client times are read from)."""
  return time.perf_counter() - compile_clock().seconds
