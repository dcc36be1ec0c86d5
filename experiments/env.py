"""RunEnv: the environment methods and trainers run in (base.Env) for one directory:
client runners, checkpointed and logged rounds, their cost and their clocks."""

from __future__ import annotations

import math
import os
import threading
import time

import jax

from experiments import clock as clock_lib
from experiments import evaluation as eval_lib
from fu_jax import checkpoint, fl, multihost
from fu_jax import run_log as log_lib
from fu_jax.methods import base

# Set by experiments.main's SIGINT handler. Python prints and drops an exception raised
# inside a garbage-collection callback (JAX runs some), so a KeyboardInterrupt that lands
# there would be lost; every round checks this before it starts.
INTERRUPTED = threading.Event()


def runner_kind(config) -> str:
  """The client runner a config runs with: fl.runner, or for 'auto' fl.choose_runner's
  pick for the backend and model; with several processes 'auto' is 'shard', the one
  runner whose client axis spans processes."""
  kind = config.fl.runner
  if kind != "auto":
    return kind
  return "shard" if multihost.process_count() > 1 else fl.choose_runner(config.model.name)


class RunEnv(base.Env):
  """Implements base.Env for one method directory (or the shared pretraining directory).

  Time is kept two ways: seconds['wall'] - seconds['compile'] is the compute the rounds took
  here (clients one after another, as the loop runner runs them); seconds['parallel'] is
  the critical path had the sampled clients of each round run in parallel: the round's
  compiled time with its loop-run clients' sum replaced by the slowest client
  (fl.ClientClock; vmap / shard rounds are already parallel and count as they are).
  """

  def __init__(self, task: base.Task, directory: str, config_dict: dict):
    self.task, self.dir, self.config_dict = task, directory, config_dict
    cfg = task.config
    # Process 0 alone writes TensorBoard events and progress lines (fu_jax/multihost.py).
    self.logger = log_lib.RunLogger(directory, write=multihost.is_primary())
    self.cost = {"bytes_up": 0, "bytes_down": 0, "examples": 0, "rounds": 0}
    self.seconds = {"wall": 0.0, "compile": 0.0, "eval": 0.0, "parallel": 0.0}
    # This process only; 'serial' / 'critical': fl.ClientClock totals inside rounds.
    self.process = {"wall": 0.0, "compile": 0.0, "eval": 0.0, "serial": 0.0, "critical": 0.0}
    self.step = 0  # TensorBoard step across this directory's phases
    # Per phase, the metrics each of its rounds reported (cost keys removed), as they read
    # back from JSON: saved with the phase's checkpoints, so restored rounds have them too.
    self.metrics = {}
    self.clock = fl.ClientClock(clock_lib.compiled_now)
    self._eval_fn = lambda p: eval_lib.evaluate(task, p)
    self.runner_kind = runner_kind(cfg)

  def runner(self, program, epochs, batch_size):
    return fl.ClientRunner(
      program,
      kind=self.runner_kind,
      epochs=epochs,
      batch_size=batch_size,
      chunk_size=self.task.config.fl.chunk_size,
      clock=self.clock,
    )

  def evaluate(self, params):
    return self._eval_fn(params)

  def artifact_dir(self, name: str) -> str | None:
    """<this directory>/<name>, created: where a trainer or method writes its files (None
    in every process but process 0, which alone writes files)."""
    if not multihost.is_primary():
      return None
    path = os.path.join(self.dir, name)
    os.makedirs(path, exist_ok=True)
    return path

  def add_cost(self, **amounts):
    for k, v in amounts.items():
      self.cost[k] = self.cost.get(k, 0) + v

  def rounds(self, phase, init_state, num_rounds, round_fn, params_fn):
    cfg = self.task.config
    ckpt = checkpoint.Checkpointer(
      os.path.join(self.dir, "ckpt", phase), self.config_dict, every=cfg.checkpoint_every
    )
    state, start, meta = ckpt.restore_or(init_state, meta_template=self._meta(phase))
    self.metrics[phase] = []
    if meta is not None:
      self.cost, self.step = meta["cost"], meta["step"]
      self.seconds = {"parallel": 0.0, **meta["seconds"]}
      # Absent from checkpoints written before round metrics were kept.
      self.metrics[phase] = list(meta.get("metrics", []))
    if start:
      print(f"[{phase}] resumed after round {start}/{num_rounds}", flush=True)
    started = time.perf_counter()
    for r in range(start, num_rounds):
      if INTERRUPTED.is_set():
        raise KeyboardInterrupt
      before = self.clock.totals()
      with clock_lib.compile_clock().measure() as t:
        state, metrics = round_fn(state, r)
        jax.block_until_ready(state)
      after = self.clock.totals()
      self.seconds["parallel"] += fl.parallel_seconds(t["wall"] - t["compile"], before, after)
      self.process["serial"] += after[0] - before[0]
      self.process["critical"] += after[1] - before[1]
      params = params_fn(state)
      fl.check_finite(params, f"{phase} round {r + 1}")
      if "loss" in metrics and not math.isfinite(metrics["loss"]):
        raise fl.DivergenceError(
          f"{phase} round {r + 1}: train loss is {metrics['loss']}; "
          "lower the learning rate. No results were written."
        )
      for k in list(self.cost):
        self.cost[k] += metrics.pop(k, 0)
      self.cost["rounds"] += 1
      self.metrics[phase].append(checkpoint.json_value(metrics))
      for k in ("wall", "compile"):
        self.seconds[k] += t[k]
        self.process[k] += t[k]
      self.step += 1
      scalars = {"train": metrics, "time": {"round_s": t["wall"] - t["compile"]}}
      if (r + 1) % cfg.eval_every == 0 or r + 1 == num_rounds:
        t0 = time.perf_counter()
        ev = self.evaluate(params)
        self.seconds["eval"] += time.perf_counter() - t0
        self.process["eval"] += time.perf_counter() - t0
        scalars["eval"] = ev
        forgetting = eval_lib.metric_names(self.task.request.kind)[0]
        self.logger.progress(
          phase,
          r + 1,
          num_rounds,
          {
            "loss": metrics.get("loss", float("nan")),
            "test_acc": ev["test_acc"],
            forgetting: ev[forgetting],
          },
          started,
        )
      self.logger.scalars(self.step, scalars)
      self.logger.flush()  # on disk before the checkpoint that covers it (resume: no gap)
      ckpt.maybe_save(r + 1, state, meta=self._meta(phase), force=r + 1 == num_rounds)
    ckpt.close()
    return state

  def round_metrics(self, phase):
    """The metrics each round of `phase` reported (base.Env.round_metrics)."""
    return list(self.metrics.get(phase, []))

  def _meta(self, phase):
    return {
      "cost": self.cost,
      "seconds": self.seconds,
      "step": self.step,
      "metrics": self.metrics.get(phase, []),
    }
