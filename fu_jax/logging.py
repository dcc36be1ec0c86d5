"""Run logging: TensorBoard event files (tensorboardX, no TensorFlow) and progress lines.

The only TensorBoard import in fu_jax. Scalars go to `<logdir>` per step; hyperparameters
are written with the final metrics so TensorBoard's HParams tab lines methods up.
"""
from __future__ import annotations

import math
import sys
import time

from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summary


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class RunLogger:
  """Writes scalars to TensorBoard and prints progress with an ETA."""

  def __init__(self, logdir: str, *, stream=sys.stdout):
    self._writer = SummaryWriter(logdir=logdir, flush_secs=10)
    self._stream = stream
    self._t0 = {}

  def scalars(self, step: int, values: dict):
    for k, v in _flat(values).items():
      if v is None or isinstance(v, str):
        continue
      if isinstance(v, (list, tuple)):  # per-class values: one scalar each
        for i, x in enumerate(v):
          if x is not None and not (isinstance(x, float) and math.isnan(x)):
            self._writer.add_scalar(f"{k}/{i}", float(x), step)
        continue
      if isinstance(v, float) and math.isnan(v):
        continue
      self._writer.add_scalar(k, float(v), step)

  def progress(self, phase: str, done: int, total: int, metrics: dict, started: float):
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (total - done)
    shown = " ".join(f"{k}={v:.4f}" for k, v in _flat(metrics).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))
    print(f"[{phase}] round {done}/{total} {shown} eta {eta:.1f}s", file=self._stream,
          flush=True)

  def hparams(self, hparams: dict, metrics: dict):
    hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
          for k, v in _flat(hparams).items()}
    mt = {k: float(v) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)}
    exp, ssi, sei = hparams_summary(hp, mt)
    fw = self._writer._get_file_writer()
    for s in (exp, ssi, sei):
      fw.add_summary(s)
    for k, v in mt.items():
      self._writer.add_scalar(k, v, 0)

  def close(self):
    self._writer.flush()
    self._writer.close()
