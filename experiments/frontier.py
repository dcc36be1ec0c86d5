"""The privacy-cost frontier of unlearning methods: U-LiRA AUC against parallel speed-up.

One point per method: x = its parallel speed-up over retraining (log scale), y = its U-LiRA
AUC (Hayes et al. 2024; 0.5 = indistinguishable from retraining) with the interval when one
is given, its test accuracy written beside it, and the AUC of retraining against an
independent retraining (the audit's null: what sampling noise alone gives at this K) as a
horizontal band. A method forgets "as retraining does" when its point lies in the band; the
frontier is how far right (cheap) a point can go while staying there.
"""

from __future__ import annotations


def write_frontier(rows: list[dict], path: str) -> None:
  """Writes the frontier plot to `path` (PNG).

  rows: one dict per method with keys method (str), ulira_auc (float), ulira_auc_ci
  ((lo, hi) or None), speedup (parallel speed-up vs retrain, > 0), test_acc (float in
  [0, 1], or None), null_ci ((lo, hi): the retrain-vs-retrain AUC interval; the band is the
  union over the rows that give one, None to omit it).

  Raises:
    ValueError: no rows, or a speed-up <= 0 (a log axis cannot show it).
  """
  if not rows:
    raise ValueError("write_frontier: no rows to plot")
  bad = [r["method"] for r in rows if not r["speedup"] or r["speedup"] <= 0]
  if bad:
    raise ValueError(f"write_frontier: speed-up must be > 0 on a log axis, got it for {bad}")
  import matplotlib  # the experiments extra's; imported where used, as in compare.py

  matplotlib.use("Agg")  # files only: no display needed
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  nulls = [r["null_ci"] for r in rows if r.get("null_ci") is not None]
  if nulls:
    lo, hi = min(n[0] for n in nulls), max(n[1] for n in nulls)
    ax.axhspan(lo, hi, color="0.85", zorder=0, label="retrain vs retrain (null)")
  ax.axhline(0.5, color="0.5", lw=0.8, ls=":", zorder=1)
  for r in rows:
    x, y, ci = float(r["speedup"]), float(r["ulira_auc"]), r.get("ulira_auc_ci")
    yerr = None if ci is None else [[y - float(ci[0])], [float(ci[1]) - y]]
    ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3, zorder=3)
    acc = r.get("test_acc")
    label = r["method"] + ("" if acc is None else f"\ntest {100 * float(acc):.1f}%")
    ax.annotate(label, (x, y), xytext=(6, 4), textcoords="offset points", fontsize=8)
  ax.set_xscale("log")
  ax.margins(x=0.25)  # room for the labels beside the outermost points
  ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1x 2x 5x 10x
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels collide on a log axis
  ax.set_xlabel("parallel speed-up vs retraining (log)")
  ax.set_ylabel("U-LiRA AUC (0.5 = as retrained)")
  lows = [float(c[0]) for c in [r.get("ulira_auc_ci") for r in rows] + nulls if c is not None]
  ax.set_ylim(min([0.4] + [lo - 0.02 for lo in lows]), 1.02)  # every interval whole
  ax.set_title("Per-example privacy vs cost")
  if nulls:
    ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
