"""A run's times against reference runs in the same workdir: speed-ups against retrain's
unlearning and the training overhead against plain FedAvg's training."""

from __future__ import annotations

import json
import os

from experiments import caches, compare
from fu_jax.methods import base


def train_overhead(config, workdir: str, trainer: base.Trainer, train_seconds: float):
  """train_seconds / plain FedAvg's train_seconds for the same config, from the workdir's
  pretraining cache (1.0 for the fedavg trainer itself; None when FedAvg's is not there)."""
  if trainer.name == base.FEDAVG.name:
    return 1.0
  key = caches.training_config(config, base.FEDAVG)
  directory = os.path.join(workdir, "pretrain", f"fedavg-{caches.config_hash(key)}")
  path = os.path.join(directory, caches.TRAIN_TIMING)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    ref = json.load(f)["train_seconds"]
  return train_seconds / ref if ref > 0 else None


# Config sections that fix the data, the trained model and the request: a retrain run
# compared against must agree on them.
_SHARED_SECTIONS = ("seed", "data", "fl", "model", "unlearn", "backdoor")


def speedups(config, workdir: str, method: str, seconds: float, parallel: float) -> dict:
  """speedup_vs_retrain and speedup_parallel_vs_retrain from <workdir>/retrain's results
  (1.0 for retrain itself; None for compare.NO_UNLEARNING and when there is no finished retrain run
  of the same data, training and request)."""
  if method == "retrain":
    return {"speedup_vs_retrain": 1.0, "speedup_parallel_vs_retrain": 1.0}
  none = {"speedup_vs_retrain": None, "speedup_parallel_vs_retrain": None}
  if method in compare.NO_UNLEARNING:
    return none
  res_path = os.path.join(workdir, "retrain", "results.json")
  cfg_path = os.path.join(workdir, "retrain", "config.json")
  if not (os.path.exists(res_path) and os.path.exists(cfg_path)):
    return none
  with open(cfg_path) as f:
    ref_cfg = json.load(f)
  mine = caches.config_dict(config)
  if any(ref_cfg.get(k) != mine.get(k) for k in _SHARED_SECTIONS):
    return none
  with open(res_path) as f:
    ref = json.load(f)
  ratio = lambda a, b: a / b if a is not None and b and b > 0 else None
  return {
    "speedup_vs_retrain": ratio(ref.get("unlearn_seconds"), seconds),
    "speedup_parallel_vs_retrain": ratio(ref.get("unlearn_parallel_seconds"), parallel),
  }
