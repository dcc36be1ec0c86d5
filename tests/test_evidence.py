"""benchmarks/evidence.py without training: aggregation over seeds, item 1's bar, the
tables written from results in place, and the skip of finished runs."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
  "evidence", os.path.join(ROOT, "benchmarks", "evidence.py")
)
evidence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evidence)


def test_cell_is_mean_and_sample_std():
  # 10, 20, 30 %: mean 20, sample std (ddof 1) 10 (the population std would be 8.2).
  assert evidence.cell([0.1, 0.2, 0.3]) == "20.0 +- 10.0"
  assert evidence.cell([0.2]) == "20.0"  # one seed: no spread
  assert evidence.cell([None, 0.2, None]) == "20.0"  # seeds not run are left out
  assert evidence.cell([None]) == "—"
  assert evidence.cell([-0.01, -0.03], sign=True) == "-2.0 +- 1.4"
  assert evidence.per_seed([0.1, None]) == "10.0 / —"


def test_bar_edges():
  # forget <= retrain + 2 points, |retain - retrain| <= 3 points.
  assert evidence.meets_bar(0.02, 0.83, 0.0, 0.86)
  assert not evidence.meets_bar(0.021, 0.86, 0.0, 0.86)
  assert not evidence.meets_bar(0.0, 0.829, 0.0, 0.86)
  assert not evidence.meets_bar(0.0, 0.891, 0.0, 0.86)
  assert evidence.meets_bar(None, 0.86, 0.0, 0.86) is None


def _args(workdir, **kw):
  a = dict(workdir=str(workdir), seeds="0,1", train_size=1000, rounds=2, forget_class=1)
  a.update(kw)
  ns = type("A", (), a)()
  ns.seed_list = [int(s) for s in ns.seeds.split(",")]
  return ns


def _fake(run, **results):
  """A finished run in place: config.json holding its overrides, results.json."""
  d = os.path.join(run.workdir, run.method)
  os.makedirs(d, exist_ok=True)
  cfg = {}
  for key, v in run.overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(d, "results.json"), "w") as f:
    json.dump({"method": run.method, "unlearn_seconds": 1.0, **results}, f)


def _runs(args, item, seed):
  return {r.label: r for r in evidence.item_runs(item, seed, args)}


def test_item1_table_marks_a_miss_and_skips_finished_runs(tmp_path, monkeypatch):
  args = _args(tmp_path)
  for seed, sga_forget in ((0, 0.80), (1, 0.90)):
    runs = _runs(args, 1, seed)
    _fake(runs["retrain"], forget_acc=0.0, retain_acc=0.86, unlearn_seconds=10.0)
    _fake(runs["fedaf"], forget_acc=0.001, retain_acc=0.84, unlearn_seconds=2.0)
    _fake(runs["sga"], forget_acc=sga_forget, retain_acc=0.86)
  rows = {
    line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
    for line in evidence.table(1, args).splitlines()[2:]
  }
  assert rows["retrain"][7] == "reference"
  assert rows["fedaf"][7] == "meets"
  assert rows["fedaf"][8] == "5.0 +- 0.0x"  # retrain's 10 s / 2 s, both seeds
  assert rows["sga"][7] == "**misses**"
  assert rows["sga"][2] == "85.0 +- 7.1"  # 80 and 90: sample std 7.07
  assert rows["sga"][9] == "80.0 / 90.0"
  assert rows["cdp"][2] == "not run"

  def no_training(run, workdir):
    raise AssertionError(f"finished run started again: {run.command()}")

  monkeypatch.setattr(evidence, "execute", no_training)
  evidence.main(
    [
      "--workdir",
      str(tmp_path),
      "--items",
      "1",
      "--seeds",
      "0,1",
      "--train_size",
      "1000",
      "--rounds",
      "2",
      "--methods",
      "retrain,fedaf,sga",
    ]
  )
  text = open(tmp_path / "item1.md").read()
  assert "| sga | 2 | 85.0 +- 7.1 |" in text
  assert "--method=sga --config=experiments/configs/fashion_mnist.py --workdir=$W/class/" in text


def test_a_finished_run_of_another_setting_is_refused(tmp_path):
  small = _args(tmp_path, seeds="0")
  _fake(_runs(small, 1, 0)["sga"], forget_acc=0.0, retain_acc=0.86)
  other = _runs(_args(tmp_path, seeds="0", train_size=12000), 1, 0)["sga"]
  with pytest.raises(SystemExit, match="data.train_size"):
    evidence.check_config(other)
