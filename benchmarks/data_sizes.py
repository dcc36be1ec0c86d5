"""Forget / retain accuracy vs retrain at several training-set sizes (issue: defaults that
work beyond the data they were tuned on).

  python benchmarks/data_sizes.py --sizes 4000,12000,60000 --workdir /tmp/fu_sizes \
      [--methods retrain,fedaf,...] [--rounds N] \
      [--variant name=--config.fedaf.max_steps=0 ...] [--table_only]

Per size: Fashion-MNIST (`experiments/configs/fashion_mnist.py`, 10 IID clients, class-wide
request for class 0) subsampled by `data.train_size` (seeded, class-stratified; 60000 keeps
every image, in file order, so it is the full data set), MIA off, `fl.rounds` as given (the
config's 20 when 0). The default methods are every method serving a class-wide request
here (federaser needs one class per client) and fedavg, the trained model itself, as the
reference row. Each method runs as its own
`python -m experiments.main --method=<m>` in <workdir>/n<size>/, so the methods trained on
FedAvg share one model. A `--variant name=<overrides>` runs the fedavg-trained methods
again in <workdir>/n<size>-<name>/ from a copy of that model (the same trained weights),
with the overrides (space-separated flags) added, for the methods whose config section they
touch (`--config.fedaf.*`: fedaf, fedaf_c): e.g. the defaults before a change.

Prints every command, then one table row per (size, variant, method): forget and retain
accuracy (test images of the forgotten class / of the others) and their gaps to retrain's.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/fashion_mnist.py"
TRAINER = {"retrain": None, "quickdrop": "quickdrop"}  # the rest share the fedavg model


def command(method, size, rounds, workdir, extra=()):
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    f"--method={method}",
    f"--config={CONFIG}",
    f"--config.data.train_size={size}",
    "--config.mia.enabled=False",
    f"--workdir={workdir}",
  ]
  if rounds:
    cmd.append(f"--config.fl.rounds={rounds}")
  return cmd + list(extra)


def run(cmd, table_only):
  print("$ python3 " + " ".join(cmd[1:]), flush=True)
  if not table_only:
    subprocess.run(["python3"] + cmd[1:], cwd=ROOT, check=True)


def touches(method, extra) -> bool:
  """Whether a variant's overrides set keys of the method's config section."""
  return any(e.startswith(f"--config.{method.split('_')[0]}.") for e in extra)


def load(workdir, method):
  path = os.path.join(workdir, method, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="4000")
  p.add_argument("--rounds", type=int, default=0)
  p.add_argument(
    "--methods", default="fedavg,retrain,finetune,sga,fedaf,quickdrop,channel_ce,channel_de,cdp,frr"
  )
  p.add_argument("--workdir", default="/tmp/fu_sizes")
  p.add_argument(
    "--variant", action="append", default=[], help="name=space-separated config overrides"
  )
  p.add_argument("--table_only", action="store_true")
  a = p.parse_args()
  methods = a.methods.split(",")
  variants = [("shipped", ())] + [
    (v.split("=", 1)[0], tuple(v.split("=", 1)[1].split())) for v in a.variant
  ]
  rows = []
  for size in [int(s) for s in a.sizes.split(",")]:
    base_wd = os.path.join(a.workdir, f"n{size}")
    for m in methods:
      run(command(m, size, a.rounds, base_wd), a.table_only)
    for name, extra in variants[1:]:
      wd = f"{base_wd}-{name}"
      if not a.table_only and not os.path.exists(os.path.join(wd, "pretrain")):
        os.makedirs(wd, exist_ok=True)
        shutil.copytree(os.path.join(base_wd, "pretrain"), os.path.join(wd, "pretrain"))
      for m in methods:
        if m in TRAINER or not touches(m, extra):  # unchanged by the overrides
          continue
        run(command(m, size, a.rounds, wd, extra), a.table_only)
    ref = load(base_wd, "retrain")
    for name, extra in variants:
      wd = base_wd if name == "shipped" else f"{base_wd}-{name}"
      for m in methods:
        if name != "shipped" and (m in TRAINER or not touches(m, extra)):
          continue
        r = load(wd, m)
        if r is None:
          rows.append((size, name, m, None, None, None, None))
          continue
        gap = lambda k: None if ref is None else 100 * (r[k] - ref[k])
        rows.append(
          (
            size,
            name,
            m,
            100 * r["forget_acc"],
            gap("forget_acc"),
            100 * r["retain_acc"],
            gap("retain_acc"),
          )
        )
  print("\n| train size | defaults | method | forget acc | vs retrain | retain acc | vs retrain |")
  print("|---|---|---|---|---|---|---|")
  f = lambda v, s="": "—" if v is None else f"{v:{s}.1f}"
  for size, name, m, fa, fg, ra, rg in rows:
    print(f"| {size} | {name} | {m} | {f(fa)} | {f(fg, '+')} | {f(ra)} | {f(rg, '+')} |")


if __name__ == "__main__":
  main()
