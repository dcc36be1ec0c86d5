"""experiments.audit end to end on digits: sequential and vmapped banks agree; outputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import audit as audit_exp
from experiments import compare, validation
from experiments import env as env_lib
from experiments import task as task_lib
from experiments.configs import audit_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
  c = audit_digits.get_config()
  c.fl.rounds, c.fl.local_epochs, c.finetune.rounds = 2, 1, 1
  c.data.train_size = 300
  c.unlearn.forget_fraction = 0.1
  c.update_from_flattened_dict(overrides)
  return c


def test_bank_seeds_are_independent_and_stable():
  a = [audit_exp.bank_seed(0, s, k) for s in (0, 1) for k in range(4)]
  assert len(set(a)) == 8
  assert a == [audit_exp.bank_seed(0, s, k) for s in (0, 1) for k in range(4)]


@pytest.mark.slow
def test_sequential_and_vmapped_banks_agree(tmp_path):
  seq = audit_exp.audit(tiny(), str(tmp_path / "seq"), "finetune", 3, "sequential")
  vm = audit_exp.audit(tiny(), str(tmp_path / "vm"), "finetune", 3, "vmap")
  assert seq["seeds_unlearned"] == vm["seeds_unlearned"]
  assert seq["cost"]["bank"] == "sequential" and vm["cost"]["bank"] == "vmap"
  for side, method in (("u", "finetune"), ("r", "retrain")):
    for k in range(3):
      load = lambda d: json.load(
        open(
          os.path.join(tmp_path, d, "audit", "models", f"{side}_{k}", method, "audit_stats.json")
        )
      )
      a, b = load("seq"), load("vm")
      np.testing.assert_allclose(a["phi"], b["phi"], atol=1e-3, rtol=1e-4)
      if side == "u":
        np.testing.assert_allclose(a["original"]["phi"], b["original"]["phi"], atol=1e-3, rtol=1e-4)
  # The forgotten samples are the same for every model: 10% of client 0's 100 samples.
  assert vm["num_examples"] == 10 and len(vm["epsilons"]) == 10
  for key in (
    "forget_score",
    "final_score",
    "ulira_auc",
    "ulira_tpr_at_1pct_fpr",
    "ulira_tpr_at_01pct_fpr",
    "original",
  ):
    assert key in vm
  assert 0.0 <= vm["forget_score"] <= 1.0
  # 3 x 10 = 30 negatives support no TPR; each statistic has its interval, the trained
  # models' too, from the config seed's draws.
  assert vm["ulira_num_negatives"] == 30 and vm["ulira_tpr_at_5pct_fpr"] is None
  for a in (vm, vm["original"]):
    assert a["ulira_auc_ci"][0] <= a["ulira_auc"] <= a["ulira_auc_ci"][1]
    assert a["f_ci"][0] <= a["forget_score"] <= a["f_ci"][1]
  assert vm["bootstrap"]["seed"] == audit_exp.bootstrap_seed(0)
  assert seq["ulira_auc_ci"] == pytest.approx(vm["ulira_auc_ci"], abs=0.02)
  assert os.path.exists(tmp_path / "vm" / "audit" / "finetune" / "epsilons.png")
  # A rerun reads every model from its audit_stats.json: same numbers.
  again = audit_exp.audit(tiny(), str(tmp_path / "vm"), "finetune", 3, "vmap")
  assert again["epsilons"] == vm["epsilons"]
  audit_exp.audit(tiny(), str(tmp_path / "vm"), "retrain", 3, "vmap")  # the null
  compare.compare(str(tmp_path / "vm"))
  table = open(tmp_path / "vm" / "comparison.md").read()
  ci = vm["ulira_auc_ci"]
  assert "| finetune | 3 | 10 |" in table
  assert f"{vm['ulira_auc']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" in table
  rows = [l for l in table.splitlines() if l.startswith("| ")]
  assert rows[1].startswith("| retrain (null: vs an independent retrain bank) | 3 | 10 |")
  assert "TPR@" not in table  # 30 negatives support none


@pytest.mark.slow
def test_relearn_is_refused_for_samples_requests(tmp_path):
  # Retrained models still classify the forgotten samples: no target tells methods apart.
  c = tiny(**{"eval.relearn_steps": 50})
  with pytest.raises(
    validation.ConfigError, match="eval.relearn_steps=50 with unlearn.kind=samples"
  ):
    validation.validate(c, "retrain")
  validation.validate(tiny(**{"eval.relearn_steps": 50, "unlearn.kind": "class"}), "retrain")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.main",
      "--method=retrain",
      "--config=experiments/configs/audit_digits.py",
      f"--workdir={tmp_path}",
      "--config.eval.relearn_steps=50",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2
  err = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("error: eval.relearn_steps=50 with unlearn.kind=")
  assert os.listdir(tmp_path) == []  # refused before any training


@pytest.mark.parametrize(
  "overrides,models,expect",
  [
    ({}, 2, "needs >= 3 models"),
    ({"unlearn.kind": "client"}, 3, "unlearn.kind='client'"),
  ],
)
def test_bad_requests(tmp_path, overrides, models, expect):
  with pytest.raises(validation.ConfigError, match=expect):
    audit_exp.audit(tiny(**overrides), str(tmp_path), "finetune", models)


@pytest.mark.slow
def test_bank_refuses_a_method_with_its_own_trainer(tmp_path):
  c = tiny(**{"unlearn.kind": "class"})
  with pytest.raises(validation.ConfigError, match="use --bank=sequential"):
    audit_exp.audit(c, str(tmp_path), "quickdrop", 3, "vmap")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sga", "fedaf"])
def test_per_model_unlearning_compiles_once(tmp_path, method):
  # The audit runs these methods' unlearning once per bank model, each from its own trained
  # model (its own SGA ball radius, Fisher, anchor). Nothing per model may be compiled in:
  # the second model lowers no new program (each lowering is a cache miss:
  # a per-model constant or a new function object per call; they cost 20 s per model).
  import jax

  from fu_jax import methods as methods_lib
  from fu_jax.methods import base

  lowered = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
      lowered.append(event) if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None
    )
  )
  c = tiny(**{"fedaf.teachers": 2, "sga.radius_frac": 0.05})
  counts = []
  for k in range(2):
    cfg = audit_exp.model_config(c, method, audit_exp.bank_seed(c.seed, 0, k))
    task = task_lib.build_task(cfg)
    env = env_lib.RunEnv(task, str(tmp_path / str(k)), {"k": k})
    before = len(lowered)
    out = methods_lib.get(method).unlearn(task, env, base.Trained(base.init_params(task)))
    jax.block_until_ready(out.params)
    env.logger.close()
    counts.append(len(lowered) - before)
    if method == "sga":  # the radii differ per model (each from its own theta*)
      counts[-1] = (counts[-1], out.results["sga_radius"])
  if method == "sga":
    assert counts[0][1] != counts[1][1]
    counts = [n for n, _ in counts]
  assert counts[1] == 0, counts
  before = len(lowered)
  jax.jit(lambda x: x * 3.0 + k)(1.0)  # a new function: the listener does see lowerings
  assert len(lowered) == before + 1
