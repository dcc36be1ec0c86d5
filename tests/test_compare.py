"""experiments.compare and --method=all on digits: one row per method, gaps to retrain."""
import csv
import json
import os
import subprocess
import sys

import pytest

from experiments import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(workdir, method, **values):
  os.makedirs(os.path.join(workdir, method), exist_ok=True)
  r = {"method": method, "unlearn_seconds": 1.0, "bytes_up": 10, "bytes_down": 20, **values}
  with open(os.path.join(workdir, method, "results.json"), "w") as f:
    json.dump(r, f)


def test_table_gaps_and_speedup(tmp_path):
  wd = str(tmp_path)
  _write(wd, "retrain", test_acc=0.9, forget_acc=0.0, unlearn_seconds=100.0)
  _write(wd, "finetune", test_acc=0.8, forget_acc=0.3, unlearn_seconds=4.0)
  rows = {r["method"]: r for r in compare.compare(wd)}
  assert rows["finetune"]["test_acc_gap"] == pytest.approx(-0.1)
  assert rows["finetune"]["forget_acc_gap"] == pytest.approx(0.3)
  assert rows["finetune"]["speedup"] == pytest.approx(25.0)
  md = open(os.path.join(wd, "comparison.md")).read()
  assert "| finetune |" in md and "(-10.0)" in md and "25.0x" in md
  with open(os.path.join(wd, "comparison.csv")) as f:
    assert [r["method"] for r in csv.DictReader(f)] == ["retrain", "finetune"]
  assert os.path.getsize(os.path.join(wd, "comparison.png")) > 10_000


def test_seeds_give_mean_and_spread(tmp_path):
  wd = str(tmp_path)
  for s, acc in ((0, 0.8), (1, 0.9)):
    _write(os.path.join(wd, f"seed_{s}"), "retrain", test_acc=acc)
  rows = compare.compare(wd)
  assert rows[0]["seeds"] == 2
  assert rows[0]["test_acc"] == pytest.approx(0.85)
  assert rows[0]["test_acc_std"] == pytest.approx(0.05)


def test_no_retrain_is_a_clear_error(tmp_path):
  _write(str(tmp_path), "finetune", test_acc=0.8)
  out = subprocess.run([sys.executable, "-m", "experiments.compare", f"--workdir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0
  assert "no retrain run" in out.stderr


def test_method_all_runs_every_method_and_compares(tmp_path):
  cmd = [sys.executable, "-m", "experiments.main", "--method=all",
         "--config=experiments/configs/digits.py", f"--workdir={tmp_path}",
         "--config.fl.rounds=3", "--config.data.num_clients=5", "--config.model.name=mlp",
         "--config.finetune.rounds=1", "--config.mia.shadows=2", "--config.mia.shadow_epochs=3"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  from fu_jax import methods
  with open(os.path.join(str(tmp_path), "comparison.csv")) as f:
    got = {r["method"] for r in csv.DictReader(f)}
  # federaser serves a class only when one client holds it; these IID clients all do.
  assert "federaser skipped: federaser removes whole clients" in out.stdout
  assert got == {n for n, m in methods.REGISTRY.items() if "class" in m.kinds} - {"federaser"}
  r = json.load(open(os.path.join(str(tmp_path), "retrain", "results.json")))
  for k in ("mia_auc", "mia_attack_acc", "mia_shadow_recall"):
    assert 0.0 <= r[k] <= 1.0
