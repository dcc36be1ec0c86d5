"""QuickDrop against Retrain: distillation overhead, unlearning quality and speed, sequences.

    PYTHONPATH=. python benchmarks/quickdrop_table.py [--datasets=digits,fmnist_iid,fmnist_dir]
        [--workdir=/tmp/quickdrop_table] [--fmnist_rounds=20] [--fmnist_distill_every=0]
        [--overhead_rounds=3] [--no_sequence] [--forget_class=0]

1. Overhead: per training round, QuickDrop's distilling FedAvg round vs a plain FedAvg round
   on the same task, in the same process, rounds interleaved (plain, quickdrop, plain, ...)
   so both see the same machine load; the first round of each (compilation) is dropped and
   medians are reported. Digits: for each --digits_overhead_every value of distill_every. Fashion-MNIST rounds are measured with --overhead_clients clients
   per round (the ratio is per client-step; a full round is ~10x longer).
2. Per dataset: Retrain and QuickDrop through experiments.run.run, the same config and seed,
   the same number of training rounds (fl.rounds); forget / retain / test accuracy (the
   trained model's alongside), unlearning seconds (compiled, compilation excluded),
   speed-up = retrain's unlearning seconds / QuickDrop's, and the training-time ratio of the
   two trainers' actual runs (a second, noisier overhead estimate).
3. Sequential unlearning on digits: every class forgotten one after another
   (quickdrop.sequence = 0..K-1, each SGA + recovery), retain accuracy (test samples of the
   classes not yet forgotten) and forget accuracy (those already forgotten) after each step.

4. --ablation (instead of 1-3): the distillation ablation. For each dataset and seed,
   quickdrop and quickdrop_nodistill (the same SGA + recovery on the sets left at their
   real-image initialisation, from the same trained model) after SGA (recovery_rounds=0)
   and after the recovery (--ablation_recovery lists the values); mean +- sample std over
   --seeds and the paired difference; --ablation_retrain adds retrain, --ablation_overhead
   the per-round overhead (part 1). --train_size=n trains on data.train_size = n (a seeded,
   class-stratified subsample of the Fashion-MNIST training images; the whole test set);
   --source=npz:<file> reads a fixed subsample file instead, so runs of different variants
   see the same images; --image_lr / --fmnist_distill_every change the distillation.

    PYTHONPATH=. python benchmarks/quickdrop_table.py --ablation \
        --datasets=fmnist_iid,fmnist_dir --seeds=0,1,2 --fmnist_rounds=5 --train_size=12000

Datasets: digits (experiments/configs/digits.py), fmnist_iid / fmnist_dir
(experiments/configs/fashion_mnist.py and :dirichlet, alpha 0.1). MIA is disabled (not
measured here). Finished runs are reused (results.json), so an interrupted benchmark resumes.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fu_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.use_defaults()  # before any JAX computation

from experiments import run as run_lib  # pylint: disable=wrong-import-position
from experiments import task as task_lib  # pylint: disable=wrong-import-position
from experiments.configs import digits as digits_cfg  # pylint: disable=wrong-import-position
from experiments.configs import fashion_mnist as fmnist_cfg  # pylint: disable=wrong-import-position
from fu_jax import fl  # pylint: disable=wrong-import-position
from fu_jax.methods import base  # pylint: disable=wrong-import-position
from fu_jax.methods import quickdrop as qd  # pylint: disable=wrong-import-position

DATASETS = ("digits", "fmnist_iid", "fmnist_dir")


def make_config(name: str, args, method: str):
  if name == "digits":
    c = digits_cfg.get_config()
    c.quickdrop.distill_every = args.digits_distill_every
  else:
    c = fmnist_cfg.get_config("iid" if name == "fmnist_iid" else "dirichlet")
    c.fl.rounds = args.fmnist_rounds
    c.eval_every = c.checkpoint_every = max(1, args.fmnist_rounds // 2)
    c.quickdrop.distill_every = args.fmnist_distill_every
    c.data.train_size = getattr(args, "train_size", 0)
    if getattr(args, "source", ""):
      c.data.source = args.source
  if getattr(args, "image_lr", 0):
    c.quickdrop.image_lr = args.image_lr
  c.mia.enabled = False
  c.unlearn.forget_class = args.forget_class
  c.method = method
  return c


def run_cached(config, workdir: str) -> dict:
  path = os.path.join(workdir, config.method, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return run_lib.run(config, workdir)


# ---------------------------------------------------------------------------------------
# 1. Overhead per round.


class _TimingEnv:
  """The part of base.Env that training_rounds needs: runners of the configured kind."""

  def __init__(self, task):
    self.kind = fl.choose_runner(task.config.model.name)
    self.task = task

  def runner(self, program, epochs, batch_size):
    return fl.ClientRunner(
      program,
      kind=self.kind,
      epochs=epochs,
      batch_size=batch_size,
      chunk_size=self.task.config.fl.chunk_size,
    )


def overhead(name: str, args, every: int) -> dict:
  cfg = make_config(name, args, "quickdrop")
  cfg.quickdrop.distill_every = every
  if name != "digits":
    cfg.fl.clients_per_round = args.overhead_clients
  task = task_lib.build_task(cfg)
  env = _TimingEnv(task)
  c = task.clients
  s = qd.settings(cfg)
  qd_state, qd_round = qd.training_rounds(task, env, s)
  plain = env.runner(
    fl.sgd_program(task.apply_fn, base.client_optimizer(cfg)),
    cfg.fl.local_epochs,
    cfg.fl.batch_size,
  )
  server_opt = optax.sgd(cfg.fl.server_lr)
  server = fl.server_init(base.init_params(task), server_opt)
  weights = np.ones(c.count.shape[0], np.float32)
  k = base.num_sampled(cfg)
  times = {"plain": [], "quickdrop": []}
  for r in range(args.overhead_rounds + 1):
    t0 = time.perf_counter()
    res = fl.fedavg_round(
      server,
      plain,
      (c.x, c.y),
      c.valid,
      None,
      seed=cfg.seed,
      round_idx=r,
      client_weights=weights,
      num_sampled=k,
      server_opt=server_opt,
    )
    server = jax.block_until_ready(res.server)
    t1 = time.perf_counter()
    qd_state, _ = qd_round(qd_state, r)
    jax.block_until_ready(qd_state)
    t2 = time.perf_counter()
    if r:  # round 0 compiles
      times["plain"].append(t1 - t0)
      times["quickdrop"].append(t2 - t1)
    print(
      f"  [{name} overhead, distill_every={every}] round {r}: plain {t1 - t0:.2f}s quickdrop {t2 - t1:.2f}s",
      flush=True,
    )
  p, q = statistics.median(times["plain"]), statistics.median(times["quickdrop"])
  return {
    "plain_s": p,
    "quickdrop_s": q,
    "ratio": q / p,
    "clients": k,
    "distill_every": s["distill_every"],
    "runner": env.kind,
  }


# ---------------------------------------------------------------------------------------
# 2. Retrain vs QuickDrop.


def compare(name: str, args) -> dict:
  wd = os.path.join(args.workdir, name)
  out = {}
  for method in ("retrain", "quickdrop"):
    t = time.perf_counter()
    out[method] = run_cached(make_config(name, args, method), wd)
    print(f"  [{name}] {method} done ({time.perf_counter() - t:.0f}s)", flush=True)
  return out


def sequence(args) -> dict:
  """All classes forgotten one after another, from the digits QuickDrop model of part 2."""
  wd = os.path.join(args.workdir, "digits_sequence")
  os.makedirs(wd, exist_ok=True)
  shared = os.path.join(args.workdir, "digits", "pretrain")
  link = os.path.join(wd, "pretrain")
  if os.path.isdir(shared) and not os.path.exists(link):
    os.symlink(shared, link)  # the trained model and sets are keyed by the training config
  c = make_config("digits", args, "quickdrop")
  order = [args.forget_class] + [k for k in range(10) if k != args.forget_class]
  c.quickdrop.sequence = tuple(order)
  return run_cached(c, wd)


# ---------------------------------------------------------------------------------------
# 4. Ablation: the distilled sets against the same-size real subset they started from.


def _size_tag(name: str, args) -> str:
  if name == "digits":
    return ""
  tag = f"_n{args.train_size}" if args.train_size else ""
  if args.source:
    tag += "_" + os.path.splitext(os.path.basename(args.source.split(":", 1)[-1]))[0]
  return tag


def _train_tag(name: str, args) -> str:
  every = args.digits_distill_every if name == "digits" else args.fmnist_distill_every
  return f"every{every}_imagelr{args.image_lr or 'default'}"


def _phases(name: str, args) -> list:
  """recovery_rounds values evaluated: 0 (= the model right after SGA) and the default."""
  if args.ablation_recovery:
    return [int(v) for v in args.ablation_recovery.split(",")]
  return [0, make_config(name, args, "quickdrop").quickdrop.recovery_rounds]


def ablation_runs(name: str, seed: int, args) -> dict:
  """{(method, recovery_rounds): results} for quickdrop and quickdrop_nodistill, one seed.

  Both methods start from the same trained model (the quickdrop trainer's, cached under the
  first phase's workdir and linked into the others: unlearning keys are not part of the
  training key). recovery_rounds=0 is the model after the SGA round: the SGA round's keys
  do not depend on the recovery, so it is the first phase of the full run.
  """
  root = os.path.join(
    args.workdir, "ablation", name + _size_tag(name, args), _train_tag(name, args)
  )
  first = None
  out = {}
  for rec in sorted(_phases(name, args), reverse=True):
    wd = os.path.join(root, f"seed{seed}_recovery{rec}")
    os.makedirs(wd, exist_ok=True)
    if first is None:
      first = wd
    elif not os.path.exists(os.path.join(wd, "pretrain")):
      os.symlink(os.path.join(first, "pretrain"), os.path.join(wd, "pretrain"))
    for method in ("quickdrop", "quickdrop_nodistill"):
      c = make_config(name, args, method)
      c.seed = seed
      c.quickdrop.recovery_rounds = rec
      t = time.perf_counter()
      out[method, rec] = run_cached(c, wd)
      print(
        f"  [ablation {name} seed {seed}] {method} recovery_rounds={rec} "
        f"({time.perf_counter() - t:.0f}s)",
        flush=True,
      )
  return out


def ablation_retrain(name: str, seed: int, args) -> dict:
  wd = os.path.join(
    args.workdir, "ablation", name + _size_tag(name, args), "retrain", f"seed{seed}"
  )
  c = make_config(name, args, "retrain")
  c.seed = seed
  return run_cached(c, wd)


def _ms(values, scale=100.0):
  v = np.asarray(values, np.float64) * scale
  sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  return f"{v.mean():5.1f} +- {sd:3.1f}"


def print_ablation(name: str, args, seeds, runs: dict, retrain: dict):
  """runs[seed][(method, rec)], retrain[seed] (may be empty)."""
  cfg = make_config(name, args, "quickdrop")
  phases = sorted(_phases(name, args))
  last = phases[-1]
  one = runs[seeds[0]]["quickdrop", last]
  print(
    f"\n== Distillation ablation, {name}: {cfg.data.source}, {cfg.data.num_clients} "
    f"clients, {cfg.fl.rounds} training rounds, forget class {args.forget_class}; "
    f"distill_every={cfg.quickdrop.distill_every}, image_lr={cfg.quickdrop.image_lr}; "
    f"{one['synthetic_images']} synthetic images in all ({one['forget_synthetic_images']} "
    f"of the class); seeds {seeds}; mean +- sample std over seeds, in %"
  )
  head = "".join(f"{f'forget@{r}':>15}{f'retain@{r}':>15}" for r in phases)
  print(f"{'sets':<26}{head}     (@r = after SGA and r recovery rounds)")
  for label, m in (
    ("distilled (quickdrop)", "quickdrop"),
    ("real init (nodistill)", "quickdrop_nodistill"),
  ):
    cells = "".join(
      f"{_ms([runs[s][m, r]['forget_acc'] for s in seeds]):>15}"
      f"{_ms([runs[s][m, r]['retain_acc'] for s in seeds]):>15}"
      for r in phases
    )
    print(f"{label:<26}{cells}")
  diff = lambda r, k: [
    runs[s]["quickdrop", r][k] - runs[s]["quickdrop_nodistill", r][k] for s in seeds
  ]
  cells = "".join(
    f"{_ms(diff(r, 'forget_acc')):>15}{_ms(diff(r, 'retain_acc')):>15}" for r in phases
  )
  print(f"{'distilled - real (paired)':<26}{cells}")
  orig = [runs[s]["quickdrop", last]["original"] for s in seeds]
  print(
    f"{'trained model':<26}{_ms([o['forget_acc'] for o in orig]):>15}"
    f"{_ms([o['retain_acc'] for o in orig]):>15}"
  )
  if retrain:
    rf = [retrain[s]["forget_acc"] for s in seeds]
    print(f"{'retrain':<26}{_ms(rf):>15}{_ms([retrain[s]['retain_acc'] for s in seeds]):>15}")
    ref = float(np.mean(rf))
  else:
    ref = 0.0
    print("retrain not run here (--ablation_retrain): forget compared with 0.0")
  gap = 100 * np.mean(
    [
      runs[s]["quickdrop", last]["retain_acc"] - runs[s]["quickdrop_nodistill", last]["retain_acc"]
      for s in seeds
    ]
  )
  fq = 100 * np.mean([runs[s]["quickdrop", last]["forget_acc"] for s in seeds])
  ok = gap >= 2 and fq <= 100 * ref + 2
  print(
    f"target (distilled retain - real retain after {last} recovery rounds >= 2 pts, "
    f"distilled forget <= retrain + 2): {gap:+.2f} pts, forget {fq:.2f}% -> "
    f"{'met' if ok else 'NOT met'}"
  )
  tq = [runs[s]["quickdrop", last]["unlearn_seconds"] for s in seeds]
  tn = [runs[s]["quickdrop_nodistill", last]["unlearn_seconds"] for s in seeds]
  train = np.mean([runs[s]["quickdrop", last]["train_seconds"] for s in seeds])
  print(
    f"unlearning seconds (mean): distilled {np.mean(tq):.2f}, real init {np.mean(tn):.2f}; "
    f"quickdrop training {train:.0f}s"
  )


def ablation(args):
  names = [n for n in args.datasets.split(",") if n]
  seeds = [int(v) for v in args.seeds.split(",")]
  runs = {n: {} for n in names}
  retrain = {n: {} for n in names}
  for seed in seeds:  # all datasets of a seed first: a partial run still has paired seeds
    for name in names:
      runs[name][seed] = ablation_runs(name, seed, args)
  if args.ablation_retrain:
    for seed in seeds:
      for name in names:
        retrain[name][seed] = ablation_retrain(name, seed, args)
  over = {}
  if args.ablation_overhead:
    for name in names:
      every = args.digits_distill_every if name == "digits" else args.fmnist_distill_every
      over[(name, every)] = overhead(name, args, every)
  print(f"\ncommand: python3 benchmarks/quickdrop_table.py {' '.join(sys.argv[1:])}")
  print(f"load (uptime) at the end: {os.getloadavg()}")
  if over:
    print_overhead(over)
  for name in names:
    print_ablation(name, args, seeds, runs[name], retrain[name])


# ---------------------------------------------------------------------------------------
# Printing.


def _f(v, nd=4):
  return "  n/a " if v is None else f"{v:.{nd}f}"


def print_overhead(rows: dict):
  print("\n== Distillation overhead per training round (same process, interleaved, median)")
  print(
    f"{'dataset':<12}{'runner':<7}{'clients':>8}{'every':>6}{'fedavg_s':>10}"
    f"{'quickdrop_s':>12}{'ratio':>7}  target <= 1.30"
  )
  for (name, _), o in rows.items():
    print(
      f"{name:<12}{o['runner']:<7}{o['clients']:>8}{o['distill_every']:>6}"
      f"{o['plain_s']:>10.2f}{o['quickdrop_s']:>12.2f}{o['ratio']:>7.2f}  "
      f"{'met' if o['ratio'] <= 1.3 else 'NOT met'}"
    )


def print_compare(name: str, res: dict):
  r, q = res["retrain"], res["quickdrop"]
  print(
    f"\n== {name}: forget class {r['request']['classes']}, "
    f"{make_config(name, ARGS, 'retrain').fl.rounds} training rounds"
  )
  print(
    f"{'model':<22}{'forget':>8}{'retain':>8}{'test':>8}{'unlearn_s':>11}{'speedup':>9}"
    f"{'rounds':>7}{'examples':>10}{'MB_up':>8}"
  )
  for label, d in (("fedavg (original)", r["original"]), ("quickdrop (original)", q["original"])):
    print(f"{label:<22}{_f(d['forget_acc']):>8}{_f(d['retain_acc']):>8}{_f(d['test_acc']):>8}")
  for label, d in (("retrain", r), ("quickdrop", q)):
    sp = r["unlearn_seconds"] / max(d["unlearn_seconds"], 1e-9)
    print(
      f"{label:<22}{_f(d['forget_acc']):>8}{_f(d['retain_acc']):>8}{_f(d['test_acc']):>8}"
      f"{d['unlearn_seconds']:>11.2f}{sp:>9.1f}{d['rounds']:>7}{d['examples']:>10}"
      f"{d['bytes_up'] / 1e6:>8.1f}"
    )
  gap_f = 100 * (q["forget_acc"] - r["forget_acc"])
  gap_r = 100 * (q["retain_acc"] - r["retain_acc"])
  sp = r["unlearn_seconds"] / max(q["unlearn_seconds"], 1e-9)
  print(
    f"targets: forget <= retrain + 2 pts: {gap_f:+.2f} pts "
    f"({'met' if gap_f <= 2 else 'NOT met'}); retain within 2 pts: {gap_r:+.2f} pts "
    f"({'met' if abs(gap_r) <= 2 else 'NOT met'}); speed-up >= 100x: {sp:.1f}x "
    f"({'met' if sp >= 100 else 'NOT met'})"
  )
  print(
    f"training time (the two trainers' runs): fedavg {r['train_seconds']:.1f}s, "
    f"quickdrop {q['train_seconds']:.1f}s, ratio "
    f"{q['train_seconds'] / max(r['train_seconds'], 1e-9):.2f}; synthetic images "
    f"{q['synthetic_images']} ({q['synthetic_bytes'] / 1e3:.0f} kB), SGA on "
    f"{q['forget_synthetic_images']}, recovery on {q['retain_synthetic_images']}; "
    f"compile {q['compile_seconds']:.1f}s"
  )


def print_sequence(res: dict):
  print(
    "\n== Sequential unlearning on digits (each step: SGA + "
    f"{make_config('digits', ARGS, 'quickdrop').quickdrop.recovery_rounds} recovery rounds)"
  )
  print(f"{'step':>4}{'class':>6}{'retain':>8}{'forget':>8}{'class_acc':>10}{'test':>8}")
  for s in res["sequence"]:
    cls = s["classes"][0] if s["classes"] else "-"
    ca = s["class_acc"][0] if s["class_acc"] else None
    print(
      f"{s['step']:>4}{cls:>6}{_f(s['retain_acc']):>8}{_f(s['forget_acc']):>8}"
      f"{_f(ca):>10}{_f(s['test_acc']):>8}"
    )
  print(f"total unlearning {res['unlearn_seconds']:.2f}s over {res['rounds']} rounds")


def main():
  global ARGS
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--datasets", default="digits")
  p.add_argument("--workdir", default="/tmp/quickdrop_table")
  p.add_argument("--forget_class", type=int, default=0)
  p.add_argument("--fmnist_rounds", type=int, default=20)
  p.add_argument("--fmnist_distill_every", type=int, default=0)
  p.add_argument("--digits_distill_every", type=int, default=0)
  p.add_argument("--overhead_rounds", type=int, default=3)
  p.add_argument(
    "--digits_overhead_every",
    default="0,1",
    help="distill_every values timed on digits (0 = once per round, 1 = every step)",
  )
  p.add_argument("--overhead_clients", type=int, default=2)
  p.add_argument("--no_overhead", action="store_true")
  p.add_argument("--no_sequence", action="store_true")
  p.add_argument(
    "--ablation",
    action="store_true",
    help="instead of parts 1-3: quickdrop vs quickdrop_nodistill over --seeds",
  )
  p.add_argument("--seeds", default="0,1,2", help="--ablation: run seeds")
  p.add_argument(
    "--ablation_recovery",
    default="",
    help="--ablation: recovery_rounds values (default: 0 and the config's)",
  )
  p.add_argument("--ablation_retrain", action="store_true", help="--ablation: also retrain")
  p.add_argument(
    "--ablation_overhead",
    action="store_true",
    help="--ablation: also time distilling vs plain rounds (part 1)",
  )
  p.add_argument(
    "--train_size",
    type=int,
    default=0,
    help="Fashion-MNIST: a seeded subsample of this many training images (0 = all 60,000)",
  )
  p.add_argument(
    "--source",
    default="",
    help="Fashion-MNIST: data.source override (e.g. npz:<file> of a fixed subsample)",
  )
  p.add_argument(
    "--image_lr", type=float, default=0.0, help="quickdrop.image_lr (0 = the config's)"
  )
  ARGS = args = p.parse_args()
  names = [n for n in args.datasets.split(",") if n]
  bad = [n for n in names if n not in DATASETS]
  if bad:
    raise SystemExit(f"--datasets: unknown {bad}; allowed {DATASETS}")
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}; "
    f"workdir {args.workdir}",
    flush=True,
  )
  if args.ablation:
    ablation(args)
    return
  over = {}
  if not args.no_overhead:
    for name in names:
      if name == "digits":
        everies = [int(v) for v in args.digits_overhead_every.split(",")]
      else:
        everies = [args.fmnist_distill_every]
      for every in everies:
        over[(name, every)] = overhead(name, args, every)
  results = {name: compare(name, args) for name in names}
  seq = sequence(args) if "digits" in names and not args.no_sequence else None
  if over:
    print_overhead(over)
  for name, res in results.items():
    print_compare(name, res)
  if seq is not None:
    print_sequence(seq)


ARGS = None

if __name__ == "__main__":
  main()
