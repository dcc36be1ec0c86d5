"""FedEraser, FRR and relearn time on Fashion-MNIST: the tables of the baselines' comparison.

    PYTHONPATH=. python benchmarks/baselines_table.py --tables=shards,backdoor,fedaf,relearn \
        [--workdir=/tmp/baselines_table] [--train_size=6000] [--fedaf_train_size=12000]

Every run goes through experiments.run.run (finished runs are reused from results.json, so
an interrupted benchmark resumes); MIA is off. Tables (`experiments/configs/fashion_mnist.py`
with the overrides printed above each table):

  shards    Xu et al.'s non-IID setting: one class per client (`:shards`, plain SGD lr 0.1,
            20 rounds), forget class 0 = client 0's data: retrain, fedavg, federaser,
            channel_de, channel_ce.
  backdoor  a client-level backdoor request: 10 IID clients, client 0's samples all carry
            the trigger with shifted labels, `unlearn.kind=client`; every method serving
            client requests. Relearning fine-tunes on client 0's triggered samples.
  fedaf     FedAF's Table 2 setting (`:fedaf`: 4 clients, 5 rounds, class 0 of client 0
            with a backdoor) with retrain, fedaf, sga and FRR's variant from the trained
            model (`frr.init=trained`, 5 rounds) twice: its per-example gradients on XLA's
            convolution like retrain's steps (`frr.conv_impl=model`, the fair timing) and on
            im2col; --fedaf_scratch adds FRR as the paper runs it (a fresh initialisation,
            the training's rounds), --fedaf_im2col retrain/fedavg/frr on an im2col model.
  relearn   class-wise unlearning (10 IID clients, forget class 0), every method, relearn
            time on the forgotten samples alone and mixed with retained samples
            (`eval.relearn_retained`).

Seconds: `unlearn_seconds` is compiled compute without evaluation or compilation;
`parallel` the critical path (per round the slowest client plus the server).
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
from fu_jax.methods import base  # pylint: disable=wrong-import-position

CLIENT_METHODS = ("retrain", "fedavg", "federaser", "frr", "finetune", "sga", "fedaf", "fedaf_c")
CLASS_METHODS = (
  "retrain",
  "fedavg",
  "finetune",
  "sga",
  "fedaf",
  "fedaf_c",
  "cdp",
  "channel_de",
  "channel_ce",
  "channel_de_random",
  "quickdrop",
  "quickdrop_nodistill",
  "frr",
)


def tables(args) -> dict:
  """name -> (variant, overrides, [(label, method, extra overrides, sub-workdir)])."""
  n = {"data.train_size": args.train_size, "mia.enabled": False}
  im2col = {"model.conv_impl": "im2col"}
  frr_trained = {"frr.init": "trained", "frr.rounds": 5}  # FRR's variant (frr.py)
  return {
    "shards": (
      "shards",
      {**n, "eval.relearn_steps": 100},
      [(m, m, {}, "") for m in ("retrain", "fedavg", "federaser", "channel_de", "channel_ce")],
    ),
    "backdoor": (
      "iid",
      {
        **n,
        "fl.rounds": 10,
        "unlearn.kind": "client",
        "backdoor.enabled": True,
        "eval.relearn_steps": 200,
      },
      [(m, m, {}, "") for m in CLIENT_METHODS],
    ),
    "fedaf": (
      "fedaf",
      {**n, "data.train_size": args.fedaf_train_size, "eval.relearn_steps": 100},
      [
        ("retrain", "retrain", {}, ""),
        ("fedavg", "fedavg", {}, ""),
        ("fedaf", "fedaf", {}, ""),
        (
          "frr (init=trained, variant), per-example grads on XLA's conv (as retrain)",
          "frr",
          {**frr_trained, "frr.conv_impl": "model"},
          "frr_xla",
        ),
        (
          "frr (init=trained, variant), per-example grads on im2col",
          "frr",
          {**frr_trained, "frr.conv_impl": "im2col"},
          "",
        ),
        ("sga", "sga", {}, ""),
      ]
      + (
        [("frr (paper: fresh init, fl.rounds)", "frr", {"frr.init": "scratch"}, "frr_scratch")]
        if args.fedaf_scratch
        else []
      )
      + (
        [
          ("retrain, im2col model", "retrain", im2col, "im2col"),
          ("fedavg, im2col model", "fedavg", im2col, "im2col"),
          ("frr (init=trained, variant), im2col model", "frr", {**im2col, **frr_trained}, "im2col"),
        ]
        if args.fedaf_im2col
        else []
      ),
    ),
    "relearn": (
      "iid",
      {
        **n,
        "data.train_size": args.relearn_train_size,
        "eval.relearn_steps": 200,
        "eval.relearn_retained": 9.0,
      },
      [(m, m, {}, "") for m in CLASS_METHODS],
    ),
  }


def make_config(variant: str, overrides: dict, method: str, seed: int):
  c = fashion_mnist.get_config(variant)
  for path, v in overrides.items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  c.method = method
  c.seed = seed
  return c


def run_cached(config, workdir: str) -> dict | None:
  path = os.path.join(workdir, config.method, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  t = time.perf_counter()
  try:
    out = run_lib.run(config, workdir)
  except base.Unservable as e:
    print(f"  {config.method}: skipped: {e}", flush=True)
    return None
  print(
    f"  {config.method} in {workdir}: {time.perf_counter() - t:.0f}s wall, load {os.getloadavg()}",
    flush=True,
  )
  return out


def _pct(v):
  return "—" if v is None else f"{100 * v:.1f}"


def _mb(v):
  return f"{v / 1e6:.1f} MB"


def print_table(name: str, spec, rows: list, args):
  variant, overrides, _ = spec
  ref = next((d for label, m, _, _, d in rows if m == "retrain" and d), None)
  print(
    f"\n== {name}: fashion_mnist.py:{variant} "
    + " ".join(f"--config.{k}={v}" for k, v in overrides.items())
    + f" --config.seed={args.seed}"
  )
  head = [
    "method",
    "test",
    "retain",
    "forget",
    "forget train",
    "backdoor",
    "unlearn s",
    "parallel s",
    "speed-up",
    "par. speed-up",
    "rounds",
    "bytes up+down",
    "storage",
    "relearn",
  ]
  if name == "relearn":
    head.append("relearn (forgotten only)")
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  first = next((d for _, _, _, _, d in rows if d), None)
  if first is not None:
    o = first["original"]
    cells = [
      "trained (FedAvg)",
      _pct(o["test_acc"]),
      _pct(o["retain_acc"]),
      _pct(o.get("forget_acc")),
      _pct(o.get("forget_train_acc")),
      _pct(o.get("bd_acc")),
    ] + [""] * (len(head) - 6)
    print("| " + " | ".join(cells) + " |")
  for label, method, _, _, d in rows:
    if d is None:
      print(f"| {label} | skipped |")
      continue
    unl, par = d["unlearn_seconds"], d["unlearn_parallel_seconds"]
    if method == "fedavg":
      sp = spp = "—"
    elif ref is not None:
      sp = f"{ref['unlearn_seconds'] / max(unl, 1e-9):.1f}x"
      spp = f"{ref['unlearn_parallel_seconds'] / max(par, 1e-9):.1f}x"
    else:
      sp = spp = "n/a"
    store = d.get("stored_update_bytes")
    storage = (
      "0"
      if store is None
      else (f"{_mb(store)} updates + {_mb(d.get('stored_model_bytes', 0))} models")
    )
    rl = d.get("relearn_steps_to_recover")
    rl = "—" if rl is None else (">=" if d.get("relearn_capped") else "") + str(rl)
    cells = [
      label,
      _pct(d["test_acc"]),
      _pct(d["retain_acc"]),
      _pct(d.get("forget_acc")),
      _pct(d.get("forget_train_acc")),
      _pct(d.get("bd_acc")),
      f"{unl:.2f}",
      f"{par:.2f}",
      sp,
      spp,
      str(d["rounds"]),
      _mb(d["bytes_up"] + d["bytes_down"]),
      storage,
      rl,
    ]
    if name == "relearn":
      r0 = d.get("relearn_forgotten_only_steps")
      cells.append(
        "—" if r0 is None else (">=" if d.get("relearn_forgotten_only_capped") else "") + str(r0)
      )
    print("| " + " | ".join(cells) + " |")
  ts = [d["train_seconds"] for _, _, _, _, d in rows if d]
  if ts:
    print(f"(training seconds of the trained models: {sorted(set(round(t, 1) for t in ts))})")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tables", default="shards,backdoor,fedaf,relearn")
  p.add_argument("--workdir", default="/tmp/baselines_table")
  p.add_argument(
    "--train_size",
    type=int,
    default=6000,
    help="data.train_size of shards and backdoor (0 = all 60,000)",
  )
  p.add_argument("--fedaf_train_size", type=int, default=12000)
  p.add_argument("--relearn_train_size", type=int, default=4000)
  p.add_argument(
    "--fedaf_scratch",
    action="store_true",
    help="fedaf table: also FRR from a fresh initialisation (the paper's protocol)",
  )
  p.add_argument(
    "--fedaf_im2col",
    action="store_true",
    help="fedaf table: also retrain, fedavg and frr on an im2col model (its own training)",
  )
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  specs = tables(args)
  names = [t for t in args.tables.split(",") if t]
  bad = [t for t in names if t not in specs]
  if bad:
    raise SystemExit(f"--tables: unknown {bad}; allowed {sorted(specs)}")
  print(f"load at the start: {os.getloadavg()}", flush=True)
  results = {}
  for name in names:
    variant, overrides, runs = specs[name]
    rows = []
    for label, method, extra, sub in runs:
      wd = os.path.join(args.workdir, name, sub)
      link = os.path.join(wd, "pretrain")
      if sub and not extra.get("model.conv_impl") and not os.path.exists(link):
        # Same trained model as the table's main directory (unlearning keys are not part of
        # the training key): link it instead of training it again.
        os.makedirs(wd, exist_ok=True)
        os.makedirs(os.path.join(args.workdir, name, "pretrain"), exist_ok=True)
        os.symlink(os.path.join(args.workdir, name, "pretrain"), link)
      cfg = make_config(variant, {**overrides, **extra}, method, args.seed)
      print(f"[{name}] {label} (load {os.getloadavg()})", flush=True)
      rows.append((label, method, extra, sub, run_cached(cfg, wd)))
    results[name] = rows
  print(f"\ncommand: python3 benchmarks/baselines_table.py {' '.join(sys.argv[1:])}")
  print(f"load (uptime) at the end: {os.getloadavg()}")
  for name in names:
    print_table(name, specs[name], results[name], args)


if __name__ == "__main__":
  main()
