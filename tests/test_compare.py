"""experiments.compare and --method=all on digits: one row per method, gaps to retrain."""

import csv
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from experiments import compare
from experiments.configs import digits
from tests import pretrain_cache
from tests.test_experiments import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(workdir, method, **values):
  os.makedirs(os.path.join(workdir, method), exist_ok=True)
  r = {"method": method, "unlearn_seconds": 1.0, "bytes_up": 10, "bytes_down": 20, **values}
  with open(os.path.join(workdir, method, "results.json"), "w") as f:
    json.dump(r, f)


def _md_rows(md: str) -> dict:
  """{method: {column title: cell}} from comparison.md's table."""
  lines = [l for l in md.splitlines() if l.startswith("|")]
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  return {
    cells[0]: dict(zip(head, cells))
    for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:])
  }


def test_table_gaps_and_speedup(tmp_path):
  wd = str(tmp_path)
  _write(
    wd,
    "retrain",
    test_acc=0.9,
    forget_acc=0.0,
    unlearn_seconds=100.0,
    unlearn_parallel_seconds=30.0,
  )
  _write(
    wd, "finetune", test_acc=0.8, forget_acc=0.3, unlearn_seconds=4.0, unlearn_parallel_seconds=2.0
  )
  _write(
    wd, "fedavg", test_acc=0.9, forget_acc=0.9, unlearn_seconds=1e-4, unlearn_parallel_seconds=1e-4
  )
  rows = {r["method"]: r for r in compare.compare(wd)}
  assert rows["fedavg"]["speedup"] is None  # no unlearning: no speed-up to report
  assert rows["fedavg"]["speedup_parallel"] is None
  assert rows["finetune"]["test_acc_gap"] == pytest.approx(-0.1)
  assert rows["finetune"]["forget_acc_gap"] == pytest.approx(0.3)
  assert rows["finetune"]["speedup"] == pytest.approx(25.0)
  assert rows["finetune"]["speedup_parallel"] == pytest.approx(15.0)
  md = open(os.path.join(wd, "comparison.md")).read()
  table = _md_rows(md)
  assert table["finetune"]["test acc"] == "80.0 (-10.0)"
  assert table["finetune"]["forget acc"] == "30.0 (+30.0)"
  assert table["finetune"]["speed-up"] == "25.0x"
  assert table["finetune"]["parallel speed-up"] == "15.0x"
  assert table["retrain"]["parallel s"] == "30" and table["finetune"]["unlearn s"] == "4"
  assert table["finetune"]["bytes"] == "30.0 B"
  assert "Forgetting: forget acc" in md and "utility: retain acc" in md
  with open(os.path.join(wd, "comparison.csv")) as f:
    assert [r["method"] for r in csv.DictReader(f)] == ["retrain", "fedavg", "finetune"]
  assert os.path.getsize(os.path.join(wd, "comparison.png")) > 10_000


def test_plot_when_every_method_forgets_completely(tmp_path):
  # All forget values 0: the figure spreads methods by utility gap and speed-up instead.
  wd = str(tmp_path)
  for m, ret, secs in (("retrain", 0.95, 50.0), ("a", 0.93, 5.0), ("b", 0.90, 1.0)):
    _write(
      wd,
      m,
      test_acc=ret,
      retain_acc=ret,
      forget_acc=0.0,
      unlearn_seconds=secs,
      unlearn_parallel_seconds=secs / 2,
    )
  rows = compare.compare(wd)
  assert [r["retain_acc_gap"] for r in rows] == pytest.approx([0.0, -0.02, -0.05])
  assert os.path.getsize(os.path.join(wd, "comparison.png")) > 10_000


def test_kind_names_pick_the_metrics(tmp_path):
  wd = str(tmp_path)
  kw = dict(forgetting_metric="forget_train_acc", utility_metric="retain_acc")
  _write(wd, "retrain", retain_acc=0.9, forget_train_acc=0.1, class_acc=0.9, **kw)
  _write(wd, "sga", retain_acc=0.85, forget_train_acc=0.2, class_acc=0.8, **kw)
  rows = compare.compare(wd)
  assert rows[1]["forgetting_metric"] == "forget_train_acc"
  md = open(os.path.join(wd, "comparison.md")).read()
  assert "Forgetting: forget train acc" in md
  assert _md_rows(md)["sga"]["class acc"] == "80.0 (-10.0)"
  _write(wd, "sga", retain_acc=0.85, forget_acc=0.2)  # another kind's names
  os.makedirs(os.path.join(wd, "seed_1", "sga"))
  os.rename(
    os.path.join(wd, "sga", "results.json"), os.path.join(wd, "seed_1", "sga", "results.json")
  )
  _write(wd, "sga", retain_acc=0.85, forget_train_acc=0.2, **kw)
  with pytest.raises(compare.CompareError, match="disagree"):
    compare.compare(wd)


@pytest.mark.parametrize(
  "init, name", [("scratch", "frr"), ("trained", "frr (init=trained, variant)"), (None, "frr")]
)
def test_frr_from_the_trained_model_is_named_a_variant(tmp_path, init, name):
  # The paper retrains from a fresh initialisation; fine-tuning the trained model is ours.
  wd = str(tmp_path)
  _write(wd, "retrain", test_acc=0.9)
  _write(wd, "frr", test_acc=0.9, **({} if init is None else {"frr_init": init}))
  rows = compare.compare(wd)
  assert [r["method"] for r in rows] == ["retrain", name]
  assert set(_md_rows(open(os.path.join(wd, "comparison.md")).read())) == {"retrain", name}
  with open(os.path.join(wd, "comparison.csv")) as f:
    assert [r["method"] for r in csv.DictReader(f)] == ["retrain", name]


def test_frr_seeds_of_both_starts_are_not_averaged(tmp_path):
  wd = str(tmp_path)
  for s, init in ((0, "scratch"), (1, "trained")):
    _write(os.path.join(wd, f"seed_{s}"), "retrain", test_acc=0.9)
    _write(os.path.join(wd, f"seed_{s}"), "frr", test_acc=0.9, frr_init=init)
  with pytest.raises(compare.CompareError, match=r"frr runs disagree on frr.init"):
    compare.compare(wd)


def test_seeds_give_mean_and_spread(tmp_path):
  wd = str(tmp_path)
  for s, acc in ((0, 0.8), (1, 0.9)):
    _write(os.path.join(wd, f"seed_{s}"), "retrain", test_acc=acc)
  rows = compare.compare(wd)
  assert rows[0]["seeds"] == 2
  assert rows[0]["test_acc"] == pytest.approx(0.85)
  assert rows[0]["test_acc_std"] == pytest.approx(0.05 * 2**0.5)  # the sample std (ddof 1)


def _write_audit(workdir, method, **values):
  d = os.path.join(workdir, "audit", method)
  os.makedirs(d, exist_ok=True)
  a = {"method": method, "num_models": 16, "num_examples": 20, "final_score": 0.1, **values}
  with open(os.path.join(d, "audit.json"), "w") as f:
    json.dump(a, f)


def test_audit_table_intervals_null_row_and_supported_tprs(tmp_path):
  wd = str(tmp_path)
  _write_audit(
    wd,
    "retrain",
    forget_score=0.163,
    f_ci=[0.12, 0.21],
    ulira_auc=0.543,
    ulira_auc_ci=[0.47, 0.61],
    ulira_tpr_at_5pct_fpr=0.08,
    ulira_tpr_at_1pct_fpr=None,
    ulira_tpr_at_01pct_fpr=None,
  )
  # An audit written before intervals and the TPR rule: 320 negatives, a "TPR at 0.1%".
  _write_audit(
    wd,
    "fedavg",
    forget_score=0.114,
    ulira_auc=0.723,
    ulira_tpr_at_1pct_fpr=0.075,
    ulira_tpr_at_01pct_fpr=0.05,
    original={"forget_score": 0.114, "ulira_auc": 0.72, "ulira_auc_ci": [0.68, 0.77]},
  )
  compare.compare(wd)
  md = open(os.path.join(wd, "comparison.md")).read()
  table = _md_rows(md[md.index("| method | K |") :])
  null = table["retrain (null: vs an independent retrain bank)"]
  assert null["U-LiRA AUC [95% CI]"] == "0.543 [0.47, 0.61]"
  assert null["forget score F [95% CI]"] == "0.163 [0.12, 0.21]"
  assert null["TPR@5%FPR"] == "0.080" and null["n"] == "20"
  assert md.index("| retrain (null") < md.index("| fedavg |")
  assert table["fedavg"]["U-LiRA AUC [95% CI]"] == "0.723"  # no interval recorded
  assert table["fedavg"]["AUC before unlearning"] == "0.720 [0.68, 0.77]"
  assert table["fedavg"]["TPR@5%FPR"] == "—"
  # 16 x 20 = 320 negatives support neither 1% nor 0.1%: the columns are dropped.
  assert "TPR@1%FPR" not in md and "TPR@0.1%FPR" not in md
  assert "retrain's row is the null" in md
  os.remove(os.path.join(wd, "audit", "retrain", "audit.json"))
  compare.compare(wd)
  assert "no retrain audit here" in open(os.path.join(wd, "comparison.md")).read()
  assert (
    compare.audit_tpr({"num_models": 20, "num_examples": 100, "ulira_tpr_at_1pct_fpr": 0.3}, 0.01)
    == 0.3
  )


def test_frontier_of_an_audited_workdir(tmp_path):
  wd = str(tmp_path)
  _write(wd, "retrain", unlearn_parallel_seconds=10.0)
  _write(wd, "sga", unlearn_parallel_seconds=2.0)
  _write(wd, "finetune", unlearn_parallel_seconds=5.0)  # run, not audited: no point
  _write(wd, "fedavg", unlearn_parallel_seconds=0.0)  # audited, no speed-up: no point
  _write_audit(
    wd,
    "retrain",
    forget_score=0.16,
    ulira_auc=0.54,
    ulira_auc_ci=[0.4, 0.6],
    unlearned_test_acc=0.95,
  )
  _write_audit(
    wd, "sga", forget_score=0.12, ulira_auc=0.72, ulira_auc_ci=[0.6, 0.8], unlearned_test_acc=0.96
  )
  _write_audit(wd, "fedavg", forget_score=0.11, ulira_auc=0.75)
  rows = compare.compare(wd)
  points = compare.frontier_rows(compare.load_audits(wd), rows)
  assert [(p["method"], p["speedup"]) for p in points] == [("retrain", 1.0), ("sga", 5.0)]
  assert points[1]["null_ci"] == [0.4, 0.6] and points[1]["test_acc"] == 0.96
  with open(os.path.join(wd, "audit", "frontier.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "audit/frontier.png" in open(os.path.join(wd, "comparison.md")).read()


@pytest.mark.slow
def test_no_retrain_is_a_clear_error(tmp_path):
  _write(str(tmp_path), "finetune", test_acc=0.8)
  out = subprocess.run(
    [sys.executable, "-m", "experiments.compare", f"--workdir={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert out.returncode != 0
  assert "no retrain run" in out.stderr


# test_experiments' small digits setup (its trained model is the session's: see
# tests/pretrain_cache.py), one fine-tuning round, checkpoints and evaluations at the end.
METHOD_ALL = {"finetune.rounds": 1, "checkpoint_every": 100, "eval_every": 100}


def _changed(cfg, base, prefix=""):
  """(dotted key, value) of every leaf where cfg differs from base."""
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _changed(v, base[k], f"{prefix}{k}.")
    elif v != base[k]:
      yield f"{prefix}{k}", v


@pytest.mark.slow
def test_method_all_runs_every_method_and_compares(tmp_path):
  wd = str(tmp_path)
  cfg = small_config(**METHOD_ALL)
  # The CLI's overrides below give this config, so the run trains only the distilling
  # trainer's model and takes FedAvg's from the session's cache (checked after the run).
  seeded = pretrain_cache.pretrain(cfg, wd, "fedavg")
  flags = [f"--config.{k}={v}" for k, v in _changed(cfg, digits.get_config()) if k != "method"]
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    "--method=all",
    "--config=experiments/configs/digits.py",
    f"--workdir={tmp_path}",
    *flags,
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(wd, "pretrain"))) == [
    os.path.basename(seeded),
    pretrain_cache.name(cfg, "quickdrop"),
  ]
  from fu_jax import methods

  with open(os.path.join(wd, "comparison.csv")) as f:
    csv_rows = {r["method"]: r for r in csv.DictReader(f)}
  # federaser serves a class only when one client holds it; these IID clients all do.
  assert "federaser skipped: federaser removes whole clients" in out.stdout
  # sga_calibrated needs a calibration split, which this config does not hold.
  assert "sga_calibrated skipped: sga_calibrated needs a calibration split" in out.stdout
  assert set(csv_rows) == {n for n, m in methods.REGISTRY.items() if "class" in m.kinds} - {
    "federaser",
    "sga_calibrated",
  }
  table = _md_rows(open(os.path.join(wd, "comparison.md")).read())
  assert set(table) == set(csv_rows)
  results = {m: json.load(open(os.path.join(wd, m, "results.json"))) for m in csv_rows}
  r = results["retrain"]
  for k in ("mia_auc", "mia_attack_acc", "mia_shadow_recall"):
    assert 0.0 <= r[k] <= 1.0
  pct = lambda v: f"{100 * v:.1f}"
  for m, res in results.items():
    row = csv_rows[m]
    # The table shows exactly the runs' values: metrics, gaps, seconds, speed-ups, bytes.
    for key, title, _ in compare.METRICS:
      if res.get(key) is None:
        assert row[key] == "", (m, key)
        continue
      assert float(row[key]) == pytest.approx(res[key]), (m, key)
      cell = table[m][title]
      assert cell.startswith(pct(res[key])), (m, key, cell)
      if m != "retrain":
        assert cell.endswith(f"({100 * (res[key] - r[key]):+.1f})"), (m, key, cell)
    for key, col, title in (
      ("speedup_vs_retrain", "speedup", "speed-up"),
      ("speedup_parallel_vs_retrain", "speedup_parallel", "parallel speed-up"),
    ):
      if res[key] is None:  # a method with no measurable time (fedavg: nothing to do)
        assert m == "fedavg" and row[col] == "" and table[m][title] == "—"
        continue
      assert float(row[col]) == pytest.approx(res[key]), (m, key)
      assert table[m][title] == f"{res[key]:.1f}x", (m, key)
    assert float(row["unlearn_seconds"]) == pytest.approx(res["unlearn_seconds"])
    assert float(row["unlearn_parallel_seconds"]) == pytest.approx(res["unlearn_parallel_seconds"])
    assert 0 <= res["unlearn_parallel_seconds"] <= res["unlearn_seconds"] * (1 + 1e-9)
    assert float(row["bytes"]) == res["bytes_up"] + res["bytes_down"]
    assert row["forgetting_metric"] == res["forgetting_metric"] == "forget_acc"
  assert results["quickdrop"]["train_overhead_vs_fedavg"] > 0
