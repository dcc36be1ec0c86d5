"""Run logging: TensorBoard event files (tensorboardX, no TensorFlow) and progress lines.

The only TensorBoard import in fu_jax. Tags are `/`-separated, so TensorBoard groups the
per-round curves by their first part (`train/loss`, `eval/test_acc`, `eval/retain_acc`,
`eval/forget_acc`, `time/round_s`, ...). A run's final numbers (results.json: accuracies,
seconds, bytes) are one point each; they go under the single group `trial/` (TensorBoard
sorts groups by name, and `trial` comes after `train` and `time`, so the curves come first)
and are the HParams tab's metrics, which lines up methods and configs ("trials" there).

Resuming: the event file is opened at the first write of the process and starts with a
`SessionLog.START` at that step (tensorboardX's `purge_step`), so TensorBoard hides the
events a killed process had written from that step on (they are written again after the
checkpoint is restored): no step appears twice. Events are written synchronously (not
through tensorboardX's queue thread), so `flush()` before a checkpoint puts every step the
checkpoint covers on disk: a resume leaves no gap either.
"""

from __future__ import annotations

import math
import os
import sys
import time

from tensorboardX import event_file_writer
from tensorboardX import summary as summary_lib
from tensorboardX.proto import event_pb2

SUMMARY_GROUP = "trial"


def _flat(d: dict, prefix: str = "", sep: str = "/") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}{sep}", sep))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _number(v) -> bool:
  return (
    isinstance(v, (int, float))
    and not isinstance(v, bool)
    and not (isinstance(v, float) and math.isnan(v))
  )


class RunLogger:
  """Writes scalars to TensorBoard and prints progress with an ETA."""

  def __init__(self, logdir: str, *, stream=sys.stdout, write: bool = True):
    """write=False: a logger that writes and prints nothing (a run's processes other than
    the first, which alone logs)."""
    self._logdir = logdir
    self._enabled = write
    self._events = None  # opened at the first write (see the module doc)
    self._stream = stream
    self._t0 = {}

  def _write(self, step: int, summary):
    if not self._enabled:
      return
    if self._events is None:
      os.makedirs(self._logdir, exist_ok=True)
      # The pid keeps two processes started within one second apart (names hold seconds).
      self._events = event_file_writer.EventsWriter(
        os.path.join(self._logdir, "events"), f".{os.getpid()}"
      )
      self._events.write_event(
        event_pb2.Event(
          step=step,
          wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
      )
    self._events.write_event(event_pb2.Event(step=step, wall_time=time.time(), summary=summary))

  def _scalar(self, tag: str, value: float, step: int):
    self._write(step, summary_lib.scalar(tag, value))

  def scalars(self, step: int, values: dict):
    """values: nested dicts of numbers (or lists of numbers: one tag per index)."""
    for k, v in _flat(values).items():
      if v is None or isinstance(v, str):
        continue
      if isinstance(v, (list, tuple)):  # per-class values: one scalar each
        for i, x in enumerate(v):
          if x is not None and not (isinstance(x, float) and math.isnan(x)):
            self._scalar(f"{k}/{i}", float(x), step)
        continue
      if isinstance(v, float) and math.isnan(v):
        continue
      self._scalar(k, float(v), step)

  def progress(self, phase: str, done: int, total: int, metrics: dict, started: float):
    if not self._enabled:
      return
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (total - done)
    shown = " ".join(
      f"{k}={v:.4f}"
      for k, v in _flat(metrics, sep=".").items()
      if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    print(f"[{phase}] round {done}/{total} {shown} eta {eta:.1f}s", file=self._stream, flush=True)

  def summary(self, step: int, hparams: dict, metrics: dict):
    """The run's final numbers as `trial/<name>` at `step` and as HParams metrics.

    hparams: the (nested) config; metrics: flat {name: number}; other values are skipped.
    """
    hp = {
      k: (v if isinstance(v, (int, float, str, bool)) else str(v))
      for k, v in _flat(hparams, sep=".").items()
    }
    mt = {f"{SUMMARY_GROUP}/{k}": float(v) for k, v in metrics.items() if _number(v)}
    for s in summary_lib.hparams(hp, mt):
      self._write(step, s)
    for k, v in mt.items():
      self._scalar(k, v, step)

  def flush(self):
    if self._events is not None:
      self._events.flush()

  def close(self):
    if self._events is not None:
      self._events.close()
      self._events = None
