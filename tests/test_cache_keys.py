"""What the runner's caches are keyed on: an index file by its content, the trained model's
evaluation by a version, a trainer's section by every key but its unlearning-only ones."""

import os

import numpy as np
import pytest

from experiments import caches
from experiments import evaluation as eval_lib
from experiments import run as run_lib
from experiments import task as task_lib
from fu_jax import checkpoint
from tests import pretrain_cache
from tests.test_experiments import small_config


def _samples_config(path, method="fedavg", **overrides):
  return small_config(
    method=method,
    **{
      "unlearn.kind": "samples",
      "unlearn.forget_fraction": 0.0,
      "unlearn.forget_indices": path,
      "mia.enabled": False,
      **overrides,
    },
  )


@pytest.mark.slow
def test_an_index_file_rewritten_in_place_is_not_served_stale_results(tmp_path):
  path = str(tmp_path / "forget.npy")
  np.save(path, np.arange(0, 40))
  wd = str(tmp_path / "wd")
  cfg = _samples_config(path)
  before = pretrain_cache.run(cfg, wd)
  np.save(path, np.arange(600, 640))  # other positions, same path
  # The finished run is not taken for this one ...
  with pytest.raises(checkpoint.ConfigMismatchError, match="unlearn.forget_indices"):
    run_lib.run(cfg, wd, rerun=False)
  # ... and another method in the same workdir evaluates the trained model on the new
  # samples, as a fresh workdir does, not the old ones from the cache beside it.
  got = run_lib.run(_samples_config(path, "finetune", **{"finetune.rounds": 1}), wd)
  fresh = pretrain_cache.run(cfg, str(tmp_path / "fresh"))
  assert got["original"] == fresh["original"] != before["original"]
  # The same positions (in another order, with duplicates) under another path share them.
  other = str(tmp_path / "same.npy")
  np.save(other, np.concatenate([np.arange(639, 599, -1), [600]]))
  assert caches.training_config(cfg, "fedavg") == caches.training_config(
    _samples_config(other), "fedavg"
  )
  a, b = (caches.config_dict(_samples_config(p)) for p in (path, other))
  assert caches.request_key(a) == caches.request_key(b)


@pytest.mark.slow
def test_the_trained_models_evaluation_is_versioned(tmp_path, monkeypatch):
  cfg = small_config(method="fedavg", **{"mia.enabled": False})
  wd = str(tmp_path)
  directory = pretrain_cache.pretrain(cfg, wd)
  task = task_lib.build_task(cfg)
  trained, _ = caches.pretrained(task, wd, "fedavg")
  calls = []
  evaluate = eval_lib.evaluate
  monkeypatch.setattr(eval_lib, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
  first = caches.original_evaluation(task, trained.params, directory)
  assert caches.original_evaluation(task, trained.params, directory) == first
  assert len(calls) == 1  # the same version: read back
  monkeypatch.setattr(caches, "EVAL_VERSION", caches.EVAL_VERSION + 1)
  caches.original_evaluation(task, trained.params, directory)
  assert len(calls) == 2  # another version: evaluated again, in a file of its own
  assert len([f for f in os.listdir(directory) if f.startswith("eval-")]) == 2


def _changed(v):
  """Another value of v's type."""
  if isinstance(v, bool):
    return not v
  if isinstance(v, (int, float)):
    return v * 2 + 1
  if isinstance(v, str):
    return v + "_other"
  return tuple(v) + (1,)


@pytest.mark.parametrize("trainer", ["quickdrop", "federaser"])
def test_a_new_key_of_a_trainers_section_enters_its_cache_key(trainer):
  from experiments.configs import digits  # pylint: disable=import-outside-toplevel
  from fu_jax import methods  # pylint: disable=import-outside-toplevel

  base = caches.training_config(digits.get_config(), trainer)
  c = digits.get_config()
  c[trainer].a_key_added_later = 1  # declared nowhere: it may change training
  assert caches.training_config(c, trainer) != base
  # The declared unlearning-only keys are keys of the section, and leave the key alone.
  unlearn_only = methods.trainer(trainer).unlearn_only
  assert unlearn_only and set(unlearn_only) < set(digits.get_config()[trainer])
  for k in unlearn_only:
    c = digits.get_config()
    c[trainer][k] = _changed(c[trainer][k])
    assert caches.training_config(c, trainer) == base, k
