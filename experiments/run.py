"""One run: data -> FedAvg training (cached) -> unlearning request -> method ->
evaluation -> results.json, with TensorBoard logging and resumable orbax checkpoints.

The steps live in their own modules: validation (config checks), task (build_task), env
(RunEnv, the rounds and their clocks; clock: compile time), evaluation, caches (the trained
model and its metrics) and speedups; this one sequences them (run, train_and_evaluate).

Layout of a workdir:
  pretrain/<trainer>-<hash>/   the trained model before unlearning, keyed by the training
                               config, shared by every method run into this workdir, with
                               its evaluation and membership scores per request
                               (eval-<hash>.json, mia-<hash>.json) and timing.json (its train_seconds)
  <method>/                    config.json, results.json, TensorBoard events, ckpt/<phase>/
  .finished/<key>.json         one per command line that finished here: lets its rerun
                               answer before importing JAX (experiments/finished.py)

Every random choice derives from config.seed through fl.stream_key, so a killed run
resumed from its checkpoints ends bit-identical to an uninterrupted one (timings aside).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax

from experiments import caches, validation
from experiments import clock as clock_lib
from experiments import env as env_lib
from experiments import evaluation as eval_lib
from experiments import speedups as speedup_lib
from experiments import task as task_lib
from fu_jax import checkpoint, fl, multihost
from fu_jax import methods as methods_lib
from fu_jax.methods import base

# results.json fields that measure time: they differ between otherwise identical runs.
TIMING_FIELDS = (
  "train_seconds",
  "unlearn_seconds",
  "unlearn_parallel_seconds",
  "compile_seconds",
  "eval_seconds",
  "speedup_vs_retrain",
  "speedup_parallel_vs_retrain",
  "train_overhead_vs_fedavg",
  "selection_seconds",  # channel methods' channel selection
)

# Set by experiments.main's SIGINT handler (the run environment checks it every round).
INTERRUPTED = env_lib.INTERRUPTED


# Method keys that defaulted to 0 meaning "fl.<key>" before they became linked defaults
# (base.linked): a config.json written then holds 0 where one written now holds the fl value.
FORMER_PLACEHOLDERS = {
  "channel.local_epochs": "local_epochs",
  "channel.lr": "client_lr",
  "channel.batch_size": "batch_size",
  "fedaf.batch_size": "batch_size",
  "sga.batch_size": "batch_size",
  "frr.local_epochs": "local_epochs",
  "quickdrop.unlearn_batch_size": "batch_size",
  "quickdrop.recovery_epochs": "local_epochs",
  "quickdrop.recovery_lr": "client_lr",
}


def config_changes(old: dict, new: dict) -> list[str]:
  """checkpoint.config_diff(old, new) without the former placeholders that mean the same
  run (0 in `old`, the fl value it stood for in `new`), so a workdir written before the
  linked defaults is still resumed and recognised as finished."""

  def same(path):
    if path not in FORMER_PLACEHOLDERS:
      return False
    section, key = path.split(".")
    fl_value = new.get("fl", {}).get(FORMER_PLACEHOLDERS[path])
    return old.get(section, {}).get(key) == 0 and new[section].get(key) == fl_value

  return [k for k in checkpoint.config_diff(old, new) if not same(k)]


def run(config, workdir: str, *, rerun: bool = True) -> dict:
  """Train (or load the cached model), unlearn with config.method, evaluate, write results.

  With rerun=False a finished run (results.json next to the same config.json) is not
  recomputed: its results are read back and returned (experiments.main's default).
  """
  method = methods_lib.get(config.method)
  validation.validate(config, config.method)
  out_dir = os.path.join(workdir, method.name)
  cfg_dict = caches.config_dict(config)
  results_path = os.path.join(out_dir, "results.json")
  finished = _finished_results(method.name, out_dir, cfg_dict, rerun)
  if finished is not None:
    return finished
  task = task_lib.build_task(config)
  if method.check is not None:
    method.check(task)  # base.Unservable before anything is trained or written
  # Every process has decided (from the same files) to compute this run before process 0
  # changes them.
  multihost.barrier(f"run {out_dir}")
  os.makedirs(out_dir, exist_ok=True)
  caches.write_json(os.path.join(out_dir, "config.json"), cfg_dict)
  if os.path.exists(results_path) and multihost.is_primary():
    os.remove(results_path)  # a rerun rewrites it; never leave a stale one next to new logs
  results = train_and_evaluate(task, workdir, out_dir, cfg_dict)
  caches.write_json(results_path, results)
  # No process starts the next run (or reads these results) before they are written.
  multihost.barrier(f"results {out_dir}")
  if multihost.is_primary():
    _print_results(method.name, task.request.kind, results, results_path)
  return results


def finished_line(name: str, results_path: str) -> str:
  """What rerunning a finished run prints."""
  return (
    f"[{name}] finished already, not recomputed (--rerun to recompute); results: {results_path}"
  )


def _finished_results(name: str, out_dir: str, cfg_dict: dict, rerun: bool) -> dict | None:
  """The results of a finished run of this config in out_dir when rerun is False, else
  None; ConfigMismatchError when out_dir holds a run of another config."""
  cfg_path = os.path.join(out_dir, "config.json")
  results_path = os.path.join(out_dir, "results.json")
  if not os.path.exists(cfg_path):
    return None
  with open(cfg_path) as f:
    diff = config_changes(json.load(f), cfg_dict)
  if diff:
    raise checkpoint.ConfigMismatchError(
      f"{out_dir} was run with a different config (keys differ: {', '.join(diff)}); "
      "use another --workdir or the original config."
    )
  if rerun or not os.path.exists(results_path):
    return None
  print(finished_line(name, results_path), flush=True)
  with open(results_path) as f:
    return json.load(f)


def train_and_evaluate(task: base.Task, workdir: str, out_dir: str, cfg_dict: dict) -> dict:
  """The trained model (from workdir's cache or trained now) unlearned by task.config.method
  in out_dir, evaluated: the results.json dict (NaN as None), also logged to TensorBoard."""
  config = task.config
  method = methods_lib.get(config.method)
  trained, train_env = caches.pretrained(task, workdir, method.trainer)
  original = caches.original_evaluation(task, trained.params, train_env.dir)

  env = env_lib.RunEnv(task, out_dir, cfg_dict)
  with clock_lib.compile_clock().measure() as t:
    outcome = method.unlearn(task, env, trained)
    jax.block_until_ready(outcome.params)
  fl.check_finite(outcome.params, f"method {method.name}")
  unlearn_seconds, unlearn_parallel, outside_compile = _unlearn_seconds(env, t)
  train_seconds = train_env.seconds["wall"] - train_env.seconds["compile"]
  forgotten = tuple(outcome.results.get("forgotten_classes", task.request.classes))
  if forgotten != tuple(task.request.classes):  # e.g. a QuickDrop sequence
    original = eval_lib.evaluate(task, trained.params, forgotten)
  forgetting_metric, utility_metric = eval_lib.metric_names(task.request.kind)
  # eval_seconds: this run's own evaluations (per round and final, membership inference
  # included); the trained model's are shared by every method and cached beside it.
  t0 = time.perf_counter()
  final = eval_lib.evaluate(task, outcome.params, forgotten)
  if task.request.kind == "samples":
    final.update(eval_lib.sample_metrics(task, outcome.params))
  if config.mia.enabled:
    final.update(eval_lib.membership_scores(task, outcome.params))
  eval_seconds = time.perf_counter() - t0
  if config.mia.enabled:
    original.update(caches.original_membership_scores(task, trained.params, train_env.dir))
  relearn = eval_lib.relearn_fields(task, original["forget_train_acc"], outcome.params)
  results = {
    "method": method.name,
    "seed": config.seed,
    "request": {
      "kind": task.request.kind,
      "classes": list(task.request.classes),
      "client": task.request.client,
    },
    "forgetting_metric": forgetting_metric,
    "utility_metric": utility_metric,
    "forgotten_classes": list(forgotten) if task.request.kind == "class" else [],
    **final,
    **({"bd_acc_before": original["bd_acc"]} if "bd_acc" in original else {}),
    "original": original,
    "train_seconds": train_seconds,
    "train_overhead_vs_fedavg": speedup_lib.train_overhead(
      config, workdir, method.trainer, train_seconds
    ),
    "unlearn_seconds": unlearn_seconds,
    "unlearn_parallel_seconds": unlearn_parallel,
    **speedup_lib.speedups(config, workdir, method.name, unlearn_seconds, unlearn_parallel),
    "compile_seconds": env.seconds["compile"] + outside_compile,
    "eval_seconds": eval_seconds + env.seconds["eval"],
    "rounds": env.cost["rounds"],
    "bytes_up": env.cost["bytes_up"],
    "bytes_down": env.cost["bytes_down"],
    "examples": env.cost["examples"],
    "runner": env.runner_kind,
    **relearn,
    **outcome.results,
  }
  _check_results_finite(results)
  results = caches.nan_to_none(results)
  env.logger.summary(env.step + 1, caches.config_dict(config), results)
  env.logger.close()
  return results


def _unlearn_seconds(env: env_lib.RunEnv, t: dict) -> tuple[float, float, float]:
  """(unlearn_seconds, unlearn_parallel_seconds, compile seconds outside rounds) of a
  method whose whole unlearning took t (a compile clock measure) in env.

  Rounds' times (restored across resumes) plus what the method spent outside rounds in
  this process; evaluation and compilation are reported apart. Outside rounds, work is the
  server's or one client's at a time (channel effects, CDP statistics): it counts on the
  critical path as it happened, except loop-run clients (fl.ClientClock).
  """
  p = env.process
  outside_wall = max(0.0, t["wall"] - p["wall"] - p["eval"])
  outside_compile = max(0.0, t["compile"] - p["compile"])
  outside = max(0.0, outside_wall - outside_compile)
  unlearn_seconds = (env.seconds["wall"] - env.seconds["compile"]) + outside
  serial, critical = env.clock.totals()
  unlearn_parallel = env.seconds["parallel"] + fl.parallel_seconds(
    outside, (p["serial"], p["critical"]), (serial, critical)
  )
  return unlearn_seconds, unlearn_parallel, outside_compile


def _print_results(name: str, kind: str, results: dict, results_path: str):
  """One line of the run's main figures, then where its results are."""
  forgetting_metric, utility_metric = eval_lib.metric_names(kind)
  keys = (
    "test_acc",
    utility_metric,
    forgetting_metric,
    "unlearn_seconds",
    "unlearn_parallel_seconds",
  )
  figures = " ".join(f"{k}={results[k]:.4f}" for k in keys if isinstance(results.get(k), float))
  print(f"[{name}] {figures}", flush=True)
  print(f"results: {results_path}", flush=True)


def _check_results_finite(results: dict):
  for k in ("test_acc", "retain_acc"):
    v = results.get(k)
    if v is None or not math.isfinite(v):
      raise fl.DivergenceError(
        f"{k}={v}: the run produced a non-finite result; nothing was written"
      )
