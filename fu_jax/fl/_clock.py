"""Per-client wall time of the loop runner and the parallel critical path it gives."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


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
