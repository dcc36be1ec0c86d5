"""QuickDrop's 5-round table: full Fashion-MNIST, 10 IID clients, 5 rounds, forget class 9.

    PYTHONPATH=. python benchmarks/quickdrop_5round.py [--workdir=/tmp/qd5] [--rounds=5]
        [--forget_class=9] [--train_size=0] [--seed=0]

Runs, through experiments.run.run with `experiments/configs/fashion_mnist.py:quickdrop5`:
retrain (FedAvg from scratch on the retained data, the same rounds), quickdrop (SGA on the
distilled forget data, then the recovery rounds) and quickdrop with recovery_rounds=0 (the
model right after the SGA round; the same trained model and the same SGA keys, so it is the
first phase of the full run). Prints test accuracy after training, the forgotten class's
accuracy after SGA and after recovery, retained accuracy against retrain's, seconds per
training round (FedAvg and QuickDrop's distilling trainer) and for the unlearning, and both
speed-ups (total compute and the parallel critical path).

What the timers hold (experiments/run.py, experiments/env.py): `unlearn_seconds` = the method's compiled round
time plus its work outside rounds, without compilation and without evaluation; retrain's is
its R FedAvg rounds on the retained data; QuickDrop's is the SGA round and the recovery
rounds on the synthetic sets. `train_seconds` likewise for the training phase. MIA is off.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fu_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.use_defaults()  # before any JAX computation

from experiments import run as run_lib  # pylint: disable=wrong-import-position
from experiments.configs import fashion_mnist  # pylint: disable=wrong-import-position


def make_config(args, method: str, recovery_rounds: int | None = None):
  c = fashion_mnist.get_config("quickdrop5")
  c.fl.rounds = args.rounds
  c.unlearn.forget_class = args.forget_class
  c.data.train_size = args.train_size
  c.seed = args.seed
  c.method = method
  if recovery_rounds is not None:
    c.quickdrop.recovery_rounds = recovery_rounds
  return c


def run_cached(config, workdir: str) -> dict:
  path = os.path.join(workdir, config.method, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  t = time.perf_counter()
  out = run_lib.run(config, workdir)
  print(
    f"  {config.method} in {workdir}: {time.perf_counter() - t:.0f}s wall, load {os.getloadavg()}",
    flush=True,
  )
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/qd5")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--forget_class", type=int, default=9)
  p.add_argument("--train_size", type=int, default=0, help="0 = all 60,000 images")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  print(f"load at the start: {os.getloadavg()}", flush=True)
  full = os.path.join(args.workdir, "full")
  sga = os.path.join(args.workdir, "sga_only")
  os.makedirs(sga, exist_ok=True)
  r = run_cached(make_config(args, "retrain"), full)
  q = run_cached(make_config(args, "quickdrop"), full)
  if not os.path.exists(os.path.join(sga, "pretrain")):
    os.symlink(os.path.join(full, "pretrain"), os.path.join(sga, "pretrain"))
  q0 = run_cached(make_config(args, "quickdrop", recovery_rounds=0), sga)

  cfg = make_config(args, "quickdrop")
  rounds = cfg.fl.rounds
  pct = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"
  print(f"\ncommand: python3 benchmarks/quickdrop_5round.py {' '.join(sys.argv[1:])}")
  print(f"load (uptime) at the end: {os.getloadavg()}")
  print(
    f"Fashion-MNIST ({args.train_size or 'all 60,000'} training images), "
    f"{cfg.data.num_clients} IID clients, {rounds} rounds, forget class "
    f"{args.forget_class}, seed {args.seed}; recovery_rounds="
    f"{cfg.quickdrop.recovery_rounds}; {q['synthetic_images']} synthetic images "
    f"({q['forget_synthetic_images']} of the class)"
  )
  print(
    f"{'model':<30}{'test':>7}{'forget':>8}{'retain':>8}{'s/round':>9}"
    f"{'unlearn_s':>10}{'parallel_s':>11}{'speedup':>9}{'par. speedup':>13}"
  )
  for label, d, tr in (
    ("FedAvg (trained)", r["original"], r["train_seconds"]),
    ("QuickDrop (trained)", q["original"], q["train_seconds"]),
  ):
    print(
      f"{label:<30}{pct(d['test_acc']):>7}{pct(d['forget_acc']):>8}"
      f"{pct(d['retain_acc']):>8}{tr / rounds:>9.2f}"
    )
  print(
    f"{'retrain':<30}{pct(r['test_acc']):>7}{pct(r['forget_acc']):>8}"
    f"{pct(r['retain_acc']):>8}{r['unlearn_seconds'] / r['rounds']:>9.2f}"
    f"{r['unlearn_seconds']:>10.2f}{r['unlearn_parallel_seconds']:>11.2f}"
    f"{1.0:>8.1f}x{1.0:>12.1f}x"
  )
  for label, d in (("quickdrop after SGA", q0), ("quickdrop after recovery", q)):
    sp = r["unlearn_seconds"] / d["unlearn_seconds"]
    spp = r["unlearn_parallel_seconds"] / d["unlearn_parallel_seconds"]
    print(
      f"{label:<30}{pct(d['test_acc']):>7}{pct(d['forget_acc']):>8}"
      f"{pct(d['retain_acc']):>8}{'':>9}{d['unlearn_seconds']:>10.2f}"
      f"{d['unlearn_parallel_seconds']:>11.2f}{sp:>8.1f}x{spp:>12.1f}x"
    )
  gap = 100 * (q["retain_acc"] - r["retain_acc"])
  sp = r["unlearn_seconds"] / q["unlearn_seconds"]
  spp = r["unlearn_parallel_seconds"] / q["unlearn_parallel_seconds"]
  checks = [
    (
      "test accuracy after training >= 85%",
      100 * q["original"]["test_acc"],
      q["original"]["test_acc"] >= 0.85,
    ),
    ("class forget <= 2% after recovery", 100 * q["forget_acc"], q["forget_acc"] <= 0.02),
    ("retain within 2 pts of retrain", gap, abs(gap) <= 2),
    ("speed-up >= 100x (total)", sp, sp >= 100),
    ("speed-up >= 100x (parallel)", spp, spp >= 100),
  ]
  for name, v, ok in checks:
    print(f"  {name}: {v:.2f} -> {'met' if ok else 'NOT met'}")
  print(
    f"unlearning rounds: retrain {r['rounds']}, quickdrop {q['rounds']} "
    f"(SGA only: {q0['rounds']}); compile s: retrain {r['compile_seconds']:.1f}, "
    f"quickdrop {q['compile_seconds']:.1f}; MB up: retrain {r['bytes_up'] / 1e6:.1f}, "
    f"quickdrop {q['bytes_up'] / 1e6:.1f}"
  )


if __name__ == "__main__":
  main()
