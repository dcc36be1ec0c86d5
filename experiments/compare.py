r"""Turns a workdir of runs into a comparison against retrain: a table and a figure.

  python -m experiments.compare --workdir=DIR

Reads DIR/<method>/results.json and, for multi-seed runs, DIR/seed_<s>/<method>/results.json;
writes DIR/comparison.md, DIR/comparison.csv and DIR/comparison.png. Every metric is shown
as mean (± sample std over seeds, ddof 1) with its gap to retrain. Which metric measures
forgetting and which utility depends on the request kind (results' forgetting_metric /
utility_metric, the README's metric table). Two speed-ups over retrain, both from the results' seconds:
total compute (unlearn_seconds: clients one after another) and parallel
(unlearn_parallel_seconds: the critical path had the sampled clients run in parallel).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import sys

import numpy as np

from experiments import frontier
from fu_jax.metrics import audit as audit_lib

# (results key, column title, compare to retrain by difference)
METRICS = (
  ("test_acc", "test acc", True),
  ("retain_acc", "retain acc", True),
  ("forget_acc", "forget acc", True),
  ("class_acc", "class acc", True),
  ("forget_train_acc", "forget train acc", True),
  ("bd_acc", "backdoor acc", True),
  ("mia_auc", "MIA AUC", True),
  ("mia_attack_acc", "MIA attack acc", True),
  ("mia_shadow_recall", "MIA shadow recall", True),
)


def no_unlearning() -> tuple:
  """Reference rows that do no unlearning (the trained model as it is; Method.unlearns is
  False): a speed-up against retrain would only measure how long a no-op takes."""
  from fu_jax import methods  # pylint: disable=import-outside-toplevel

  return methods.no_unlearning()


def __getattr__(name: str):
  # NO_UNLEARNING: no_unlearning() as a module attribute, read when asked so that a method
  # registered after this import counts.
  if name == "NO_UNLEARNING":
    return no_unlearning()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CompareError(ValueError):
  pass


def load_runs(workdir: str) -> dict:
  """{method: [results dict per seed]} from a workdir (single- or multi-seed layout)."""
  paths = sorted(
    glob.glob(os.path.join(workdir, "*", "results.json"))
    + glob.glob(os.path.join(workdir, "seed_*", "*", "results.json"))
  )
  runs = {}
  for p in paths:
    with open(p) as f:
      r = json.load(f)
    runs.setdefault(r["method"], []).append(r)
  if not runs:
    raise CompareError(
      f"no results.json under {workdir}/<method>/ or {workdir}/seed_*/<method>/;"
      " run experiments.main into this workdir first"
    )
  if "retrain" not in runs:
    raise CompareError(
      f"{workdir} has runs of {sorted(runs)} but no retrain run, the "
      "reference every number is compared with; run --method=retrain "
      "with the same config into this workdir"
    )
  return runs


def _values(results: list, key: str) -> np.ndarray:
  v = [r.get(key) for r in results]
  return np.array([x for x in v if isinstance(x, (int, float)) and math.isfinite(x)], float)


def summarize(runs: dict) -> list[dict]:
  """One row per method (retrain first): mean/std per metric, gaps, speed-up, bytes."""
  ref = runs["retrain"]
  rows = []
  for method in ["retrain"] + sorted(m for m in runs if m != "retrain"):
    rs = runs[method]
    row = {"method": row_name(method, rs), "seeds": len(rs)}
    for key, _, _ in METRICS:
      v, rv = _values(rs, key), _values(ref, key)
      row[key] = float(v.mean()) if v.size else None
      row[key + "_std"] = float(v.std(ddof=1)) if v.size > 1 else None
      row[key + "_gap"] = float(v.mean() - rv.mean()) if v.size and rv.size else None
    for key, speedup in (
      ("unlearn_seconds", "speedup"),
      ("unlearn_parallel_seconds", "speedup_parallel"),
    ):
      secs, ref_secs = _values(rs, key), _values(ref, key)
      row[key] = float(secs.mean()) if secs.size else None
      row[speedup] = (
        float(ref_secs.mean()) / row[key]
        if method not in no_unlearning() and ref_secs.size and row[key] and row[key] > 0
        else None
      )
    row["bytes"] = float(np.mean(_values(rs, "bytes_up") + _values(rs, "bytes_down")))
    steps = _values(rs, "relearn_steps_to_recover")  # eval.relearn_steps > 0 runs only
    row["relearn_steps"] = float(steps.mean()) if steps.size else None
    row["relearn_capped"] = any(bool(r.get("relearn_capped")) for r in rs)
    row["forgetting_metric"], row["utility_metric"] = metric_names(rs)
    rows.append(row)
  return rows


def row_name(method: str, results: list) -> str:
  """The table's name for a method's runs: the method, or for a variant of a published
  protocol the method with the setting that makes it one (FRR fine-tuning the trained
  model, frr.init=trained, where the paper retrains from a fresh initialisation)."""
  inits = {r.get("frr_init") for r in results}
  if method != "frr" or "trained" not in inits:
    return method
  if len(inits) > 1:
    raise CompareError(
      f"frr runs disagree on frr.init {sorted(map(str, inits))}: compare them apart"
    )
  return "frr (init=trained, variant)"


def metric_names(results: list) -> tuple:
  """(forgetting metric, utility metric) the runs name (results.json); for results written
  before they carried the names, forget_acc / retain_acc."""
  names = {
    (r.get("forgetting_metric", "forget_acc"), r.get("utility_metric", "retain_acc"))
    for r in results
  }
  if len(names) > 1:
    raise CompareError(
      f"runs of one method disagree on their metrics {sorted(names)}: "
      "they serve different request kinds; compare them apart"
    )
  return names.pop()


def _fmt(v, pct=True):
  if v is None:
    return "—"
  return f"{100 * v:.1f}" if pct else f"{v:.3g}"


def _bytes(b):
  for unit in ("B", "KiB", "MiB", "GiB"):
    if b < 1024 or unit == "GiB":
      return f"{b:.1f} {unit}"
    b /= 1024


def _title(key: str) -> str:
  return next((t for k, t, _ in METRICS if k == key), key)


def to_markdown(rows: list[dict]) -> str:
  forgetting, utility = rows[0]["forgetting_metric"], rows[0]["utility_metric"]
  cols = [m for m in METRICS if any(r[m[0]] is not None for r in rows)]
  relearn = any(r.get("relearn_steps") is not None for r in rows)
  head = (
    ["method", "seeds"]
    + [c[1] for c in cols]
    + ["unlearn s", "parallel s", "speed-up", "parallel speed-up", "bytes"]
  )
  head += ["relearn steps"] if relearn else []
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
    speed = lambda v: "—" if v is None else f"{v:.1f}x"
    cells += [
      _fmt(r["unlearn_seconds"], False),
      _fmt(r["unlearn_parallel_seconds"], False),
      speed(r["speedup"]),
      speed(r["speedup_parallel"]),
      _bytes(r["bytes"]),
    ]
    if relearn:  # ">= budget" when some seed never reached the target
      v = r.get("relearn_steps")
      cells.append("—" if v is None else (">=" if r["relearn_capped"] else "") + f"{v:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return (
    f"Forgetting: {_title(forgetting)} (with backdoor acc and MIA where present); "
    f"utility: {_title(utility)}. Accuracies in %, mean ± sample std over seeds, (gap to "
    "retrain in points). Speed-up = retrain's unlearning seconds / the method's "
    "(compiled; compilation reported apart); parallel = the same with the sampled "
    "clients of a round running at once (the slowest client counts). Relearn steps: "
    "SGD steps on the forgotten samples until their accuracy is half the original "
    "model's (>= the budget: never reached).\n\n" + "\n".join(lines) + "\n"
  )


def plot(rows: list[dict], path: str):
  """Left: utility gap to retrain vs parallel speed-up, each method's forgetting value as
  its marker's colour and label (readable when every method forgets completely: the
  points then spread by utility and speed, not pile up at forget = 0). Right: both
  speed-ups as labelled bars."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  forgetting, utility = rows[0]["forgetting_metric"], rows[0]["utility_metric"]
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
  # fedavg does no unlearning: its "speed-up" is the timer's resolution and would squash
  # every other method against the axis.
  rows = [r for r in rows if r["method"] != "fedavg"]
  pts = [
    r for r in rows if r[utility + "_gap"] is not None and (r["speedup_parallel"] or r["speedup"])
  ]
  if pts:
    xs = [r["speedup_parallel"] or r["speedup"] for r in pts]
    ys = [100 * r[utility + "_gap"] for r in pts]
    fs = [100 * r[forgetting] if r[forgetting] is not None else float("nan") for r in pts]
    sc = a.scatter(xs, ys, c=fs, cmap="viridis_r", vmin=0, vmax=100, s=80, edgecolors="k", zorder=3)
    fig.colorbar(sc, ax=a, label=f"{_title(forgetting)} (%)")
    for r, x, y, f in zip(pts, xs, ys, fs):
      a.annotate(
        f"{r['method']} ({f:.1f})", (x, y), textcoords="offset points", xytext=(6, 3), fontsize=8
      )
    a.set_xscale("log")
    a.margins(x=0.25, y=0.15)
  a.axhline(0.0, color="k", lw=1)
  a.set_xlabel("parallel speed-up over retrain (×, log scale)")
  a.set_ylabel(f"{_title(utility)} gap to retrain (points)")
  a.set_title(f"Utility vs speed (colour and brackets: {_title(forgetting)}, %)", fontsize=10)
  a.grid(alpha=0.3)
  others = [r for r in rows if r["method"] != "retrain" and (r["speedup"] or r["speedup_parallel"])]
  y = np.arange(len(others))
  h = 0.38
  for off, key, label, color in (
    (-h / 2, "speedup", "total compute", "tab:blue"),
    (h / 2, "speedup_parallel", "parallel", "tab:orange"),
  ):
    vals = [r[key] or 0.0 for r in others]
    bars = b.barh(y + off, vals, height=h, label=label, color=color)
    b.bar_label(bars, labels=[f"{v:.1f}x" if v else "—" for v in vals], fontsize=8, padding=2)
  b.set_yticks(y, [r["method"] for r in others])
  b.axvline(1.0, color="k", lw=1)
  b.set_xscale("log")
  b.set_xlabel("speed-up over retrain (×, log scale)")
  b.set_title("Unlearning speed")
  b.margins(x=0.2)
  b.legend(loc="best", fontsize=8)
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


def _with_ci(value, ci) -> str:
  """'0.723 [0.68, 0.77]': the value and its 95% interval (audits written before intervals
  show the value alone)."""
  if value is None:
    return "—"
  return f"{value:.3f}" + ("" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def audit_tpr(a: dict, fpr: float):
  """The audit's TPR at `fpr` where its K x n negatives support it (audit_lib.fpr_supported),
  else None: audits written before the rule carried a TPR at 0.1% FPR over 320 negatives,
  which is the TPR at FPR 0."""
  key = audit_lib.TPR_FPRS[fpr]
  n_neg = a.get("ulira_num_negatives", a["num_models"] * a["num_examples"])
  return a.get(key) if audit_lib.fpr_supported(n_neg, fpr) else None


def audit_markdown(audits: dict) -> str:
  """The per-example audit table (retrain's row first: the null), each F and U-LiRA AUC with
  its 95% bootstrap interval, the TPRs at the FPRs the negatives support."""
  tprs = [
    fpr for fpr in audit_lib.TPR_FPRS if any(audit_tpr(a, fpr) is not None for a in audits.values())
  ]
  head = (
    ["method", "K", "n", "forget score F [95% CI]", "final score", "U-LiRA AUC [95% CI]"]
    + [f"TPR@{100 * fpr:g}%FPR" for fpr in tprs]
    + ["F before unlearning", "AUC before unlearning"]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in sorted(audits, key=lambda m: (m != "retrain", m)):
    a, o = audits[m], audits[m].get("original") or {}
    f = lambda v: "—" if v is None else f"{v:.3f}"
    cells = [
      "retrain (null: vs an independent retrain bank)" if m == "retrain" else m,
      str(a["num_models"]),
      str(a["num_examples"]),
      _with_ci(a["forget_score"], a.get("f_ci")),
      f(a["final_score"]),
      _with_ci(a["ulira_auc"], a.get("ulira_auc_ci")),
      *(f(audit_tpr(a, fpr)) for fpr in tprs),
      _with_ci(o.get("forget_score"), o.get("f_ci")),
      _with_ci(o.get("ulira_auc"), o.get("ulira_auc_ci")),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  null = (
    "retrain's row is the null (a retrain bank against an independent one): read every "
    "other row against it, intervals included"
    if "retrain" in audits
    else "no retrain audit here: run experiments.audit --method=retrain into this workdir for "
    "the null every row is read against"
  )
  return (
    "\nPer-example audit (experiments.audit): each method's K unlearned models against K "
    "independently retrained ones, n forgotten samples; F in [0, 1] (1 = every epsilon < 0.5), "
    "U-LiRA AUC 0.5 = indistinguishable from retraining; [95% CI]: percentile bootstrap, "
    "two-way (models and samples) for the AUC, over samples for F. A TPR at FPR f is shown "
    "only where the K x n retrained negatives put >= 10 past its threshold (K n f >= 10). "
    f"{null}.\n\n" + "\n".join(lines) + "\n"
  )


def frontier_rows(audits: dict, rows: list[dict]) -> list[dict]:
  """experiments.frontier's rows: each audited method that has a parallel speed-up over
  retrain from runs of experiments.main in the same workdir (retrain itself at 1x; no
  unlearning, e.g. fedavg, has none). The audit's own seconds are not used: its retrain
  side runs as one vmapped bank, the methods model by model, so their ratio is no speed-up."""
  speedups = {r["method"]: r["speedup_parallel"] for r in rows}
  null = (audits.get("retrain") or {}).get("ulira_auc_ci")
  out = []
  for m in sorted(audits, key=lambda m: (m != "retrain", m)):
    a = audits[m]
    if speedups.get(m) and a.get("ulira_auc") is not None:
      out.append(
        {
          "method": m,
          "ulira_auc": a["ulira_auc"],
          "ulira_auc_ci": a.get("ulira_auc_ci"),
          "speedup": speedups[m],
          "test_acc": a.get("unlearned_test_acc"),
          "null_ci": null,
        }
      )
  return out


def compare(workdir: str) -> list[dict]:
  audits = load_audits(workdir)
  if audits and not glob.glob(os.path.join(workdir, "*", "results.json")) + glob.glob(
    os.path.join(workdir, "seed_*", "*", "results.json")
  ):
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(audit_markdown(audits))
    return []
  rows = summarize(load_runs(workdir))
  points = frontier_rows(audits, rows)
  if points:
    frontier.write_frontier(points, os.path.join(workdir, "audit", "frontier.png"))
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(to_markdown(rows) + (audit_markdown(audits) if audits else ""))
    if points:
      f.write(
        "\naudit/frontier.png: U-LiRA AUC [95% CI] against the parallel speed-up over "
        f"retrain of this workdir's runs, for {[p['method'] for p in points]}"
        "; the band is retrain's null interval.\n"
      )
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
  print(
    f"wrote {FLAGS.workdir}/comparison.md"
    + (", comparison.csv, comparison.png" if rows else " (audits only)")
  )


if __name__ == "__main__":
  from absl import app, flags

  FLAGS = flags.FLAGS
  flags.DEFINE_string("workdir", None, "Workdir holding <method>/results.json runs.", required=True)
  app.run(main)
