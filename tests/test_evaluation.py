"""The evaluation protocol: what each metric scores, how bytes and seconds are counted.

End to end on digits with a small MLP; one trained model per module fixture, shared by the
tests that only read its results.
"""

import json
import math
import os
import time

import numpy as np
import pytest

from experiments import clock as clock_lib
from experiments import env as env_lib
from experiments import evaluation as eval_lib
from experiments import run as run_lib
from experiments import task as task_lib
from experiments import validation
from fu_jax import fl
from fu_jax import tree as tu
from fu_jax.methods import fedaf
from tests import pretrain_cache
from tests.test_sga import small_config as _small_config


def small_config(method, **overrides):
  return _small_config(method, **{"data.num_clients": 4, **overrides})


# ---------------------------------------------------------------------------------------
# Membership inference and forget_train_acc under a backdoor.

BACKDOOR = {
  "unlearn.kind": "client_class",
  "backdoor.enabled": True,
  "data.num_clients": 2,
  "fl.rounds": 5,
  "mia.enabled": True,
  "mia.shadows": 0,
}


@pytest.fixture(scope="module")
def backdoor_runs(tmp_path_factory):
  """retrain then fedavg (the trained model) on a client_class request with a backdoor:
  client 0's ~70 class-0 samples carry the trigger and label 1."""
  wd = str(tmp_path_factory.mktemp("backdoor"))
  return wd, {m: pretrain_cache.run(small_config(m, **BACKDOOR), wd) for m in ("retrain", "fedavg")}


@pytest.mark.slow
def test_mia_under_a_backdoor_compares_like_with_like(backdoor_runs):
  wd, runs = backdoor_runs
  retrain, trained = runs["retrain"], runs["fedavg"]
  task = task_lib.build_task(small_config("retrain", **BACKDOOR))
  assert 50 <= int(np.asarray(task.forget).sum()) <= 90
  del wd
  # Retrain never saw the forgotten records: the attacker is at chance. (Members triggered
  # against clean non-members gave 0.22 here: it separated triggered from clean images.)
  assert 0.4 <= retrain["mia_auc"] <= 0.6
  assert trained["mia_auc"] >= retrain["mia_auc"]
  # The trained model still reproduces the forgotten records (trigger -> flipped label);
  # retrain classifies them by their true label.
  assert trained["forget_train_acc"] >= 0.8
  assert retrain["forget_train_acc"] <= 0.2
  assert trained["bd_acc"] >= 0.8 and retrain["bd_acc"] <= 0.2


@pytest.mark.slow
def test_metric_names_for_a_client_class_request(backdoor_runs):
  _, runs = backdoor_runs
  for res in runs.values():
    assert res["forgetting_metric"] == "forget_train_acc"
    assert res["utility_metric"] == "retain_acc"
    # Other clients keep class 0: it stays in the retained test set, and its test accuracy
    # is utility (class_acc), not forgetting.
    assert res["retain_acc"] == res["test_acc"]
    assert res["forget_acc"] is None
    per_class = res["per_class_acc"]
    assert res["class_acc"] == pytest.approx(per_class[0])
    assert res["class_acc"] >= 0.8


@pytest.mark.slow
def test_evaluate_names_metrics_per_kind():
  # The same model evaluated under each request kind: only the names' scopes change.
  from fu_jax.methods import base

  cfgs = {
    k: small_config("fedavg", **{"unlearn.kind": k}) for k in ("class", "client_class", "client")
  }
  tasks = {k: task_lib.build_task(c) for k, c in cfgs.items()}
  params = base.init_params(tasks["class"])
  ev = {k: eval_lib.evaluate(t, params) for k, t in tasks.items()}
  y = tasks["class"].dataset.y_test
  per_class = np.asarray(ev["class"]["per_class_acc"])
  n = np.bincount(y, minlength=10)
  others = np.sum(per_class[1:] * n[1:]) / n[1:].sum()
  assert ev["class"]["retain_acc"] == pytest.approx(others)
  assert ev["class"]["forget_acc"] == pytest.approx(per_class[0])
  for k in ("client_class", "client"):
    assert ev[k]["retain_acc"] == ev[k]["test_acc"]
    assert math.isnan(ev[k]["forget_acc"])
  # A class forgotten earlier in a sequence is not retained.
  seq = eval_lib.evaluate(tasks["class"], params, forgotten_classes=(0, 3))
  keep = [c for c in range(10) if c not in (0, 3)]
  assert seq["retain_acc"] == pytest.approx(np.sum(per_class[keep] * n[keep]) / n[keep].sum())
  assert seq["forget_acc"] == pytest.approx(
    (per_class[0] * n[0] + per_class[3] * n[3]) / (n[0] + n[3])
  )
  with pytest.raises(validation.ConfigError, match="unlearn.kind='nosuch'"):
    eval_lib.metric_names("nosuch")


# ---------------------------------------------------------------------------------------
# build_task's masks, exactly.


@pytest.mark.parametrize("kind", ["class", "client_class", "client"])
def test_build_task_masks(kind):
  cfg = small_config(
    "fedavg", **{"unlearn.kind": kind, "unlearn.forget_class": 3, "unlearn.forget_client": 2}
  )
  task = task_lib.build_task(cfg)
  c = task.clients
  valid = np.asarray(c.valid)
  y = np.asarray(task.y_true)
  owner = np.broadcast_to(np.arange(valid.shape[0])[:, None], valid.shape)
  want = {
    "class": valid & (y == 3),
    "client_class": valid & (y == 3) & (owner == 2),
    "client": valid & (owner == 2),
  }[kind]
  np.testing.assert_array_equal(np.asarray(task.forget), want)
  np.testing.assert_array_equal(np.asarray(task.retain_valid), valid & ~want)
  # Labels are the dataset's at each row's index.
  idx = np.asarray(c.index)
  np.testing.assert_array_equal(y[valid], task.dataset.y_train[idx[valid]])
  assert sorted(idx[valid].tolist()) == list(range(len(task.dataset.y_train)))
  weights = np.ones(4)
  if kind == "client":
    weights[2] = 0
  np.testing.assert_array_equal(task.client_weights, weights)
  assert task.request.classes == (() if kind == "client" else (3,))
  assert task.request.client == (-1 if kind == "class" else 2)


# ---------------------------------------------------------------------------------------
# Bytes: one rule for every method.


def test_round_cost_counts_only_clients_that_train():
  got = fl.round_cost(
    np.array([5, 0, 3, 7]), np.array([5.0, 0.0, 0.0, 7.0]), model_bytes=100, epochs=2
  )
  assert got == {"bytes_up": 200, "bytes_down": 200, "examples": 24}
  got = fl.round_cost([4, 4], [1, 1], model_bytes=100, epochs=1, upload_bytes=30)
  assert got == {"bytes_up": 60, "bytes_down": 200, "examples": 8}


@pytest.fixture(scope="module")
def shards_runs(tmp_path_factory):
  """One class per client (10 clients), class 0 forgotten: its holder has nothing left."""
  wd = str(tmp_path_factory.mktemp("shards"))
  kw = {
    "data.num_clients": 10,
    "data.partition": "shards",
    "data.classes_per_client": 1,
    "fl.rounds": 2,
    "finetune.rounds": 1,
    "sga.recovery_rounds": 1,
  }
  out = {}
  for m in ("retrain", "finetune", "sga"):
    cfg = small_config(m, **kw)
    out[m] = pretrain_cache.run(cfg, wd)
  task = task_lib.build_task(cfg)
  return task, out


@pytest.mark.slow
def test_bytes_skip_a_client_with_nothing_to_train(shards_runs):
  task, runs = shards_runs
  holder = [k for k in range(10) if np.asarray(task.forget)[k].any()]
  assert len(holder) == 1 and not np.asarray(task.retain_valid)[holder[0]].any()
  from fu_jax.methods import base

  model = tu.tree_num_bytes(base.init_params(task))
  # Retrain: 2 rounds of the 9 clients that hold retained data.
  assert runs["retrain"]["bytes_up"] == runs["retrain"]["bytes_down"] == 2 * 9 * model
  assert runs["finetune"]["bytes_up"] == runs["finetune"]["bytes_down"] == 1 * 9 * model
  # SGA: the holder downloads theta* and uploads its ascended model, then 1 recovery round;
  # no final broadcast (no method counts one).
  assert runs["sga"]["bytes_up"] == runs["sga"]["bytes_down"] == (1 + 9) * model
  rows = int(np.asarray(task.retain_valid).sum())
  assert runs["retrain"]["examples"] == 2 * rows


# ---------------------------------------------------------------------------------------
# Seconds: what each timer holds.


@pytest.mark.slow
def test_client_clock_times_each_loop_client():
  import jax
  import jax.numpy as jnp
  import optax
  from flax import linen as nn

  from fu_jax import models

  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  program = fl.sgd_program(models.logits_fn(model), optax.sgd(0.1))
  ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 20.5])
  clock = fl.ClientClock(now=lambda: next(ticks))
  x = jnp.ones((3, 8, 4))
  y = jnp.zeros((3, 8), jnp.int32)
  valid = jnp.ones((3, 8), bool)
  keys = jax.random.split(jax.random.key(1), 3)
  fl.ClientRunner(program, kind="loop", epochs=1, batch_size=4, clock=clock).run(
    params, (x, y), valid, None, keys
  )
  assert clock.totals() == (1.0 + 3.0 + 0.5, 3.0)
  fl.ClientRunner(program, kind="vmap", epochs=1, batch_size=4, clock=clock).run(
    params, (x, y), valid, None, keys
  )
  assert clock.totals() == (4.5, 3.0)  # a vmapped call is already parallel
  assert fl.parallel_seconds(10.0, (0.0, 0.0), clock.totals()) == pytest.approx(8.5)


class _VirtualTime:
  """The runner's `time` module with a clock that tests can advance without sleeping."""

  def __init__(self):
    self.offset = 0.0

  def perf_counter(self):
    return time.perf_counter() + self.offset

  def advance(self, seconds):
    self.offset += seconds


def _virtual_time(monkeypatch) -> _VirtualTime:
  """A _VirtualTime installed as the `time` of every module that reads a run's clocks."""
  clock = _VirtualTime()
  for module in (clock_lib, env_lib, run_lib):
    monkeypatch.setattr(module, "time", clock)
  return clock


def _delayed(fn, clock, seconds):
  def wrapped(*args, **kwargs):
    clock.advance(seconds)
    return fn(*args, **kwargs)

  return wrapped


@pytest.mark.slow
def test_timers_hold_unlearning_and_not_evaluation(backdoor_runs, monkeypatch):
  wd, _ = backdoor_runs
  clock = _virtual_time(monkeypatch)
  # Evaluation (also inside rounds) and MIA: never in unlearn_*.
  monkeypatch.setattr(eval_lib, "evaluate", _delayed(eval_lib.evaluate, clock, 1000.0))
  monkeypatch.setattr(
    eval_lib, "membership_scores", _delayed(eval_lib.membership_scores, clock, 1000.0)
  )
  # FedAF's teacher labels and Fisher (one target client): on both unlearning clocks.
  monkeypatch.setattr(fedaf, "new_labels", _delayed(fedaf.new_labels, clock, 100.0))
  monkeypatch.setattr(fedaf, "client_fisher", _delayed(fedaf.client_fisher, clock, 100.0))
  res = pretrain_cache.run(small_config("fedaf", **BACKDOOR), wd)
  assert 200.0 <= res["unlearn_parallel_seconds"] <= res["unlearn_seconds"] < 1000.0
  assert res["eval_seconds"] >= 2000.0
  # Against retrain's results in the same workdir (real seconds, no virtual ones).
  retrain = json.load(open(os.path.join(wd, "retrain", "results.json")))
  assert res["speedup_vs_retrain"] == pytest.approx(
    retrain["unlearn_seconds"] / res["unlearn_seconds"]
  )
  assert res["speedup_parallel_vs_retrain"] == pytest.approx(
    retrain["unlearn_parallel_seconds"] / res["unlearn_parallel_seconds"]
  )
  assert retrain["speedup_vs_retrain"] == retrain["speedup_parallel_vs_retrain"] == 1.0
  assert res["train_overhead_vs_fedavg"] == 1.0


@pytest.mark.slow
def test_server_work_and_recovery_are_unlearning_time(tmp_path, monkeypatch):
  # Channel CE's effects (server work outside rounds) and QuickDrop's SGA and recovery
  # phases (rounds) count on both clocks; evaluation never does.
  from fu_jax.methods import channel, quickdrop_sets

  clock = _virtual_time(monkeypatch)
  monkeypatch.setattr(eval_lib, "evaluate", _delayed(eval_lib.evaluate, clock, 1000.0))
  monkeypatch.setattr(
    channel, "effects_and_selection", _delayed(channel.effects_and_selection, clock, 100.0)
  )
  monkeypatch.setattr(
    quickdrop_sets.SetPhases, "run", _delayed(quickdrop_sets.SetPhases.run, clock, 100.0)
  )
  kw = {
    "data.num_clients": 2,
    "fl.rounds": 2,
    "quickdrop.recovery_rounds": 1,
    "model.hidden": (32,),
    "quickdrop.artifacts": False,
  }
  for method, at_least in (("channel_ce", 100.0), ("quickdrop", 200.0)):
    res = pretrain_cache.run(small_config(method, **kw), str(tmp_path))
    assert at_least <= res["unlearn_parallel_seconds"] <= res["unlearn_seconds"] < 1000.0
    assert res["eval_seconds"] >= 2000.0


@pytest.mark.slow
@pytest.mark.parametrize("per_round, strictly_less", [(0.5, False), (1.0, True)])
def test_parallel_clock_is_the_slowest_client(tmp_path, per_round, strictly_less):
  res = pretrain_cache.run(
    small_config(
      "retrain",
      **{
        "fl.runner": "loop",
        "data.num_clients": 2,
        "fl.rounds": 2,
        "fl.clients_per_round": per_round,
      },
    ),
    str(tmp_path),
  )
  total, par = res["unlearn_seconds"], res["unlearn_parallel_seconds"]
  if strictly_less:  # two clients a round: the faster one's time leaves the critical path
    assert 0 < par < total
  else:  # one client a round: nothing runs in parallel
    assert par == pytest.approx(total, rel=1e-9, abs=1e-9)
  assert res["speedup_vs_retrain"] == 1.0


# ---------------------------------------------------------------------------------------
# Whole-client requests: every method that serves them, end to end.


@pytest.fixture(scope="module")
def client_runs(tmp_path_factory):
  """A client request with a backdoor in all of client 0's data (labels shifted by one):
  forgetting shows as the forgotten records' accuracy (trigger -> shifted label) and
  backdoor accuracy falling to retrain's."""
  from fu_jax import methods

  wd = str(tmp_path_factory.mktemp("client"))
  # fedaf at its shipped defaults: the 17 steps of its floor would leave ~half of the
  # client's backdoor on this MLP; the forgetting rule (fedaf.max_steps) continues to ~8
  # epochs (BUILD.md, unlearning budget).
  kw = {"unlearn.kind": "client", "backdoor.enabled": True, "fl.rounds": 5}
  names = validation.methods_for("all", "client")
  assert set(names) == {n for n, m in methods.REGISTRY.items() if "client" in m.kinds}
  # sga_calibrated needs a calibration split, which this config lacks (test_calibration).
  return {m: pretrain_cache.run(small_config(m, **kw), wd) for m in names if m != "sga_calibrated"}


# How far above retrain's forget_train_acc each method may stay (measured on this setup,
# seed 0: retrain 0.7%, the trained model 60%; fedaf 1.1%, fedaf_c 1.1%, finetune 26%,
# sga 35%: SGA's bounded ascent plus one recovery round removes about half of a whole
# client's backdoor here; federaser 0.0%, frr 2.7%).
CLIENT_FORGET_MARGIN = {
  "fedaf": 0.05,
  "fedaf_c": 0.05,
  "finetune": 0.35,
  "sga": 0.45,
  "federaser": 0.05,
  "frr": 0.05,
}


@pytest.mark.slow
def test_every_client_method_forgets_a_whole_client(client_runs):
  retrain, trained = client_runs["retrain"], client_runs["fedavg"]
  assert trained["forget_train_acc"] >= 0.5
  assert retrain["forget_train_acc"] <= 0.05
  assert set(CLIENT_FORGET_MARGIN) == set(client_runs) - {"retrain", "fedavg"}
  for name, res in client_runs.items():
    assert res["forgetting_metric"] == "forget_train_acc", name
    assert res["request"] == {"kind": "client", "classes": [], "client": 0}
    assert res["retain_acc"] == res["test_acc"] and res["forget_acc"] is None
    assert res["bd_acc_before"] == trained["bd_acc"]
    if name in ("retrain", "fedavg"):
      continue
    assert res["forget_train_acc"] <= retrain["forget_train_acc"] + CLIENT_FORGET_MARGIN[name]
    assert res["forget_train_acc"] < trained["forget_train_acc"] - 0.15, name
    assert res["bd_acc"] < trained["bd_acc"], name
    assert res["retain_acc"] >= retrain["retain_acc"] - 0.1, name
  # The forgotten client never communicates after the request: 3 of 4 clients a round.
  from fu_jax.methods import base

  task = task_lib.build_task(small_config("retrain", **{"unlearn.kind": "client"}))
  model = tu.tree_num_bytes(base.init_params(task))
  for name in ("retrain", "finetune"):
    res = client_runs[name]
    assert res["bytes_up"] == res["bytes_down"] == res["rounds"] * 3 * model, name
