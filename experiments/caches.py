"""The workdir's caches: the trained model before unlearning (pretrain/<trainer>-<hash>/,
keyed by training_config) with its evaluation and membership scores per request; the config
as the JSON dict they are keyed on; and the one writer of the workdir's JSON files."""

from __future__ import annotations

import hashlib
import json
import math
import os

from experiments import env as env_lib
from experiments import evaluation as eval_lib
from experiments import task as task_lib
from fu_jax import checkpoint, multihost
from fu_jax import methods as methods_lib
from fu_jax.methods import base


def config_dict(config) -> dict:
  """The config as a JSON dict (what config.json holds and the caches are keyed on), with a
  samples request's unlearn.forget_indices path as {"path": ..., "sha256": digest of the
  positions} (forget_indices_digest): the file's content is part of the config."""
  d = json.loads(config.to_json_best_effort())
  u = d.get("unlearn", {})
  path = u.get("forget_indices") or ""
  if path and u.get("kind") == "samples":
    u["forget_indices"] = {"path": path, "sha256": task_lib.forget_indices_digest(path)}
  return d


def request_key(d: dict) -> dict:
  """d['unlearn'] (from config_dict) as a cache key: an index file by its content alone, so
  the same positions under another path share the cached results."""
  u = dict(d["unlearn"])
  if isinstance(u.get("forget_indices"), dict):
    u["forget_indices"] = {"sha256": u["forget_indices"]["sha256"]}
  return u


def config_hash(d: dict) -> str:
  """12 hex digits of sha256 over the sorted-key JSON of `d`: the name of a cache entry."""
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def training_config(config, trainer: base.Trainer | str) -> dict:
  """The part of the config that determines the trained model before unlearning: its
  cache key (pretrain/<trainer>-<hash of this>; tests/test_config.py pins it)."""
  t = methods_lib.trainer(trainer)
  d = config_dict(config)
  key = {
    "seed": d["seed"],
    "data": d["data"],
    "fl": {k: v for k, v in d["fl"].items() if k not in ("runner", "chunk_size")},
    "model": d["model"],
    "trainer": t.name,
    # backdoor.target at its default (-1, the shift) stays out, so models cached before
    # the key existed keep their names
    "backdoor": {k: v for k, v in d["backdoor"].items() if (k, v) != ("target", -1)},
  }
  if d["backdoor"]["enabled"]:  # the trigger sits in the data to be forgotten
    key["unlearn"] = {k: v for k, v in request_key(d).items() if k != "calibration_size"}
  cal = d["unlearn"].get("calibration_size", 0)
  if cal and not d["data"].get("train_size", 0):  # carved off the clients' training data
    key["calibration_size"] = cal
  if isinstance(d.get(t.name), dict):
    # The trainer's section but its unlearning-only keys (e.g. quickdrop.unlearn_lr), which
    # must not invalidate the cached model: a key nobody declared is in the key (safe).
    key[t.name] = {k: v for k, v in d[t.name].items() if k not in t.unlearn_only}
  return key


def write_json(path: str, obj):
  """checkpoint.write_json_atomic in process 0 only (the one process that writes files)."""
  if multihost.is_primary():
    checkpoint.write_json_atomic(path, obj)


def _json_roundtrip(obj):
  """obj as it reads back from its JSON file (NaN as null, tuples as lists)."""
  return checkpoint.json_value(nan_to_none(obj))


def nan_to_none(obj):
  """Strict JSON has no NaN: metrics without rows (e.g. forget_acc of a client request)
  are written as null."""
  if isinstance(obj, dict):
    return {k: nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [nan_to_none(v) for v in obj]
  if isinstance(obj, float) and math.isnan(obj):
    return None
  return obj


def original_evaluation(task: base.Task, params, pretrain_dir: str) -> dict:
  """evaluation.evaluate() (and sample_metrics for a samples request) of the trained model, cached next
  to it like its membership scores: every method run on the same request evaluates the same
  model on the same data."""
  d = config_dict(task.config)
  # The rest is in the pretrain key; the evaluation is versioned (EVAL_VERSION) so numbers
  # written by an earlier evaluation are not reused.
  key = {"seed": d["seed"], "unlearn": request_key(d), "evaluation": EVAL_VERSION}
  path = os.path.join(pretrain_dir, f"eval-{config_hash(key)}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  ev = eval_lib.evaluate(task, params)
  if task.request.kind == "samples":
    ev.update(eval_lib.sample_metrics(task, params))
  ev = _json_roundtrip(ev)  # as read back: the same values for every method
  write_json(path, ev)
  return ev


def original_membership_scores(task: base.Task, params, pretrain_dir: str) -> dict:
  """membership_scores of the trained model, cached next to it: every method run on the
  same request scores the same model against the same samples (shadow models included)."""
  d = config_dict(task.config)
  # The directory is keyed by the training config (backdoor included); the members'
  # definition is versioned so caches written under an earlier definition are not reused.
  key = {"seed": d["seed"], "unlearn": request_key(d), "mia": d["mia"], "members": MIA_MEMBERS}
  path = os.path.join(pretrain_dir, f"mia-{config_hash(key)}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  scores = eval_lib.membership_scores(task, params)
  write_json(path, nan_to_none(scores))
  return scores


MIA_MEMBERS = "as_trained"  # see evaluation.forgotten_records
# The trained model's cached evaluation (eval-*.json): raise it whenever evaluate() or
# sample_metrics() change what they compute, so workdirs do not keep the old numbers.
EVAL_VERSION = 1


def pretrained(task: base.Task, workdir: str, trainer: base.Trainer | str):
  """The model trained before unlearning, from the workdir's cache or trained now."""
  trainer = methods_lib.trainer(trainer)
  key = training_config(task.config, trainer)
  directory = os.path.join(workdir, "pretrain", f"{trainer.name}-{config_hash(key)}")
  os.makedirs(directory, exist_ok=True)
  env = env_lib.RunEnv(task, directory, key)
  trained = trainer.train(task, env)
  env.logger.close()
  write_json(
    os.path.join(directory, TRAIN_TIMING),
    {
      "train_seconds": env.seconds["wall"] - env.seconds["compile"],
      "compile_seconds": env.seconds["compile"],
    },
  )
  return trained, env


TRAIN_TIMING = "timing.json"  # a pretraining directory's train_seconds
