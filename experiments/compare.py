r"""Turns a workdir of runs into a comparison against retrain: a table and a figure.

  python -m experiments.compare --workdir=DIR

Reads DIR/<method>/results.json and, for multi-seed runs, DIR/seed_<s>/<method>/results.json;
writes DIR/comparison.md, DIR/comparison.csv and DIR/comparison.png. Every metric is shown
as mean (± std over seeds) with its gap to retrain; speed-up = retrain's unlearning seconds
divided by the method's.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import sys

import numpy as np

# (results key, column title, compare to retrain by difference)
METRICS = (
    ("test_acc", "test acc", True),
    ("retain_acc", "retain acc", True),
    ("forget_acc", "forget acc", True),
    ("forget_train_acc", "forget train acc", True),
    ("bd_acc", "backdoor acc", True),
    ("mia_auc", "MIA AUC", True),
    ("mia_attack_acc", "MIA attack acc", True),
    ("mia_shadow_recall", "MIA shadow recall", True),
)


class CompareError(ValueError):
  pass


def load_runs(workdir: str) -> dict:
  """{method: [results dict per seed]} from a workdir (single- or multi-seed layout)."""
  paths = sorted(glob.glob(os.path.join(workdir, "*", "results.json")) +
                 glob.glob(os.path.join(workdir, "seed_*", "*", "results.json")))
  runs = {}
  for p in paths:
    with open(p) as f:
      r = json.load(f)
    runs.setdefault(r["method"], []).append(r)
  if not runs:
    raise CompareError(f"no results.json under {workdir}/<method>/ or {workdir}/seed_*/<method>/;"
                       " run experiments.main into this workdir first")
  if "retrain" not in runs:
    raise CompareError(f"{workdir} has runs of {sorted(runs)} but no retrain run, the "
                       "reference every number is compared with; run --method=retrain "
                       "with the same config into this workdir")
  return runs


def _values(results: list, key: str) -> np.ndarray:
  v = [r.get(key) for r in results]
  return np.array([x for x in v if isinstance(x, (int, float)) and math.isfinite(x)], float)


def summarize(runs: dict) -> list[dict]:
  """One row per method (retrain first): mean/std per metric, gaps, speed-up, bytes."""
  ref = runs["retrain"]
  ref_seconds = float(np.mean(_values(ref, "unlearn_seconds")))
  rows = []
  for method in ["retrain"] + sorted(m for m in runs if m != "retrain"):
    rs = runs[method]
    row = {"method": method, "seeds": len(rs)}
    for key, _, _ in METRICS:
      v, rv = _values(rs, key), _values(ref, key)
      row[key] = float(v.mean()) if v.size else None
      row[key + "_std"] = float(v.std()) if v.size > 1 else None
      row[key + "_gap"] = float(v.mean() - rv.mean()) if v.size and rv.size else None
    secs = _values(rs, "unlearn_seconds")
    row["unlearn_seconds"] = float(secs.mean()) if secs.size else None
    row["speedup"] = (ref_seconds / row["unlearn_seconds"]
                      if row["unlearn_seconds"] and row["unlearn_seconds"] > 0 else None)
    row["bytes"] = float(np.mean(_values(rs, "bytes_up") + _values(rs, "bytes_down")))
    rows.append(row)
  return rows


def _fmt(v, pct=True):
  if v is None:
    return "—"
  return f"{100 * v:.1f}" if pct else f"{v:.3g}"


def _bytes(b):
  for unit in ("B", "KB", "MB", "GB"):
    if b < 1024 or unit == "GB":
      return f"{b:.1f} {unit}"
    b /= 1024


def to_markdown(rows: list[dict]) -> str:
  cols = [m for m in METRICS if any(r[m[0]] is not None for r in rows)]
  head = ["method", "seeds"] + [c[1] for c in cols] + ["unlearn s", "speed-up", "bytes"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["method"], str(r["seeds"])]
    for key, _, _ in cols:
      if r[key] is None:
        cells.append("—")
        continue
      s = _fmt(r[key])
      if r[key + "_std"] is not None:
        s += f" ± {_fmt(r[key + '_std'])}"
      if r["method"] != "retrain" and r[key + "_gap"] is not None:
        s += f" ({100 * r[key + '_gap']:+.1f})"
      cells.append(s)
    cells += [_fmt(r["unlearn_seconds"], False),
              "—" if r["speedup"] is None else f"{r['speedup']:.1f}x", _bytes(r["bytes"])]
    lines.append("| " + " | ".join(cells) + " |")
  return ("Accuracies in %, mean ± std over seeds, (gap to retrain in points). Speed-up = "
          "retrain's unlearning seconds / the method's (compiled; compilation reported "
          "apart).\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[dict], path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in rows:
    fx = r["forget_acc"] if r["forget_acc"] is not None else r["forget_train_acc"]
    if fx is None or r["retain_acc"] is None:
      continue
    ref = r["method"] == "retrain"
    a.scatter(100 * fx, 100 * r["retain_acc"], s=120 if ref else 60,
              marker="*" if ref else "o", zorder=3)
    a.annotate(r["method"], (100 * fx, 100 * r["retain_acc"]), textcoords="offset points",
               xytext=(5, 4), fontsize=9)
  a.set_xlabel("forget accuracy (%)  ← more forgetting")
  a.set_ylabel("retain accuracy (%)  ↑ more utility")
  a.set_title("Forgetting vs utility (retrain = ★)")
  a.grid(alpha=0.3)
  others = [r for r in rows if r["method"] != "retrain" and r["speedup"]]
  b.barh([r["method"] for r in others], [r["speedup"] for r in others], color="tab:blue")
  b.axvline(1.0, color="k", lw=1)
  b.set_xscale("log")
  b.set_xlabel("speed-up over retrain (×, log scale)")
  b.set_title("Unlearning speed")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load_audits(workdir: str) -> dict:
  """{method: audit.json} from <workdir>/audit/<method>/ (experiments.audit)."""
  out = {}
  for p in sorted(glob.glob(os.path.join(workdir, "audit", "*", "audit.json"))):
    with open(p) as f:
      a = json.load(f)
    out[a["method"]] = a
  return out


def audit_markdown(audits: dict) -> str:
  """The per-example audit table: F, final score, U-LiRA, K (retrain first)."""
  head = ["method", "K", "forget score F", "final score", "U-LiRA AUC", "TPR@1%FPR",
          "TPR@0.1%FPR", "F before unlearning", "AUC before unlearning"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in sorted(audits, key=lambda m: (m != "retrain", m)):
    a, o = audits[m], audits[m].get("original") or {}
    f = lambda v: "—" if v is None else f"{v:.3f}"
    lines.append("| " + " | ".join([
        m, str(a["num_models"]), f(a["forget_score"]), f(a["final_score"]), f(a["ulira_auc"]),
        f(a["ulira_tpr_at_1pct_fpr"]), f(a["ulira_tpr_at_01pct_fpr"]),
        f(o.get("forget_score")), f(o.get("ulira_auc"))]) + " |")
  return ("\nPer-example audit (experiments.audit): each method's K unlearned models against K "
          "independently retrained ones; F in [0, 1] (1 = every epsilon < 0.5), U-LiRA AUC 0.5 "
          "= indistinguishable from retraining.\n\n" + "\n".join(lines) + "\n")


def compare(workdir: str) -> list[dict]:
  audits = load_audits(workdir)
  if audits and not glob.glob(os.path.join(workdir, "*", "results.json")) + glob.glob(
      os.path.join(workdir, "seed_*", "*", "results.json")):
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(audit_markdown(audits))
    return []
  rows = summarize(load_runs(workdir))
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(to_markdown(rows) + (audit_markdown(audits) if audits else ""))
  with open(os.path.join(workdir, "comparison.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  plot(rows, os.path.join(workdir, "comparison.png"))
  return rows


def main(argv):
  del argv
  try:
    rows = compare(FLAGS.workdir)
  except CompareError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(open(os.path.join(FLAGS.workdir, "comparison.md")).read())
  print(f"wrote {FLAGS.workdir}/comparison.md" +
        (", comparison.csv, comparison.png" if rows else " (audits only)"))


if __name__ == "__main__":
  from absl import app
  from absl import flags
  FLAGS = flags.FLAGS
  flags.DEFINE_string("workdir", None, "Workdir holding <method>/results.json runs.",
                      required=True)
  app.run(main)
