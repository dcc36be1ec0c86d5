"""FedAF against Retrain, FedAF-C and SGA, like the paper's Table 2, plus the label ablation
and the cost of the CountSketch penalty.

    PYTHONPATH=. python benchmarks/fedaf_table.py --datasets=digits --seeds=0,1,2
    PYTHONPATH=. python benchmarks/fedaf_table.py --datasets=fmnist --seeds=0 \
        [--workdir=/tmp/fedaf_table] [--variants=retrain,fedaf,fedaf_sketch,...]

Setting (the paper's): one class (0) of one client (0) is forgotten, with a BadNets trigger
planted in exactly those samples (labels shifted by one) before training.
  digits  experiments/configs/digits.py with 4 clients (the paper's count), CNN, 20 rounds;
          fedaf.lr 0.005: a client holds ~34 samples of a class, i.e. 3 unlearning steps
          (lr 0.002 left bd_acc at 80%, 0.01 / 0.02 cost 6 / 12 test points; seed 0).
  fmnist  experiments/configs/fashion_mnist.py:fedaf -- full Fashion-MNIST, 4 clients,
          5 rounds, CNN; FedAF's defaults (lr 0.002, ~24 unlearning steps).
  digits_small  tests/test_fedaf.py's setting: digits, MLP, 5 clients, 4 rounds, lr 0.02.
Membership inference is off (not part of Table 2).

Variants: retrain; fedaf (diagonal Fisher, debias labels); fedaf_sketch (CountSketch t=50);
fedaf_r1 (fedaf + 1 recovery FedAvg round); fedaf_c (no EWC); sga (bounded ascent + 1
recovery round); fedaf_uniform / fedaf_random / fedaf_teacher (label ablation; fedaf is the
debias row); fedaf_lr001 (the paper's MNIST lr 0.001); fedaf_lam300 / fedaf_lam1e3 /
fedaf_lam1e4 (EWC strength 30x / 100x / 1000x the paper's, to see what the penalty can
preserve; a variant that diverges is reported as such); fedaf_stop / fedaf_stop5 /
fedaf_stop8 (fedaf.max_old_loss = log K / 5 / 8 nats: a client stops once a batch's loss on
the labels to forget exceeds it, bounding the unbounded -CE(y_old) term as SGA's bound
does); fedaf_tw05 (that term at half weight); fedaf_lam300_stop8 / fedaf_lam1e3_stop8
(both: a stronger penalty with the bound). Composed variants 'fedaf[_c]+key=value+...' set
fedaf.* keys, e.g. the preserver ablation (BUILD.md):
    --datasets=digits_small --seeds=0,1,2 --penalty=0 --variants=fedaf_c+epochs=3+$F,\
    fedaf+epochs=3+lam=1000+$F,fedaf+epochs=3+lam=1000+fisher_labels=model+$F
with F=min_steps=0+max_steps=0 (a fixed budget: no step floor, no forgetting rule, both of
which postdate the ablation).
Every variant starts from the
same trained model (one pretraining per dataset and seed, shared through a symlink).
Finished runs are reused when rerun.

Printed per dataset: for each variant, mean +- sample std (ddof 1) over seeds of test accuracy, backdoor
accuracy after unlearning (bd_acc_before is the trained model's), unlearning seconds
(compiled; compilation excluded) and the speed-up over retrain, each with retrain's value
or the gap to it. Then the EWC penalty cost: seconds per call of the penalty gradient alone
and of a whole unlearning step (batch forward/backward + penalty + SGD) for the diagonal and
the t=50 sketch on the dataset's model, and the curvature memory (d vs t*d floats).
"""

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fu_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.use_defaults()  # before any JAX computation

from experiments import caches  # pylint: disable=wrong-import-position
from experiments import run as run_lib  # pylint: disable=wrong-import-position
from experiments.configs import digits as digits_cfg  # pylint: disable=wrong-import-position
from experiments.configs import fashion_mnist as fmnist_cfg  # pylint: disable=wrong-import-position
from fu_jax import (
  ewc,  # pylint: disable=wrong-import-position
  fl,  # pylint: disable=wrong-import-position
  models,  # pylint: disable=wrong-import-position
)
from fu_jax import tree as tu  # pylint: disable=wrong-import-position
from fu_jax.methods import fedaf  # pylint: disable=wrong-import-position

# name -> (method, config overrides)
VARIANTS = {
  "retrain": ("retrain", {}),
  "fedaf": ("fedaf", {}),
  "fedaf_sketch": ("fedaf", {"fedaf.fisher": "sketch"}),
  "fedaf_r1": ("fedaf", {"fedaf.recovery_rounds": 1}),
  "fedaf_c": ("fedaf_c", {}),
  "sga": ("sga", {}),
  "fedaf_uniform": ("fedaf", {"fedaf.label": "uniform"}),
  "fedaf_random": ("fedaf", {"fedaf.label": "random"}),
  "fedaf_teacher": ("fedaf", {"fedaf.label": "teacher"}),
  "fedaf_lr001": ("fedaf", {"fedaf.lr": 0.001}),
  "fedaf_lam300": ("fedaf", {"fedaf.lam": 300.0}),
  "fedaf_lam1e3": ("fedaf", {"fedaf.lam": 1e3}),
  "fedaf_lam1e4": ("fedaf", {"fedaf.lam": 1e4}),
  "fedaf_stop": ("fedaf", {"fedaf.max_old_loss": 0.0}),
  "fedaf_stop5": ("fedaf", {"fedaf.max_old_loss": 5.0}),
  "fedaf_stop8": ("fedaf", {"fedaf.max_old_loss": 8.0}),
  "fedaf_tw05": ("fedaf", {"fedaf.true_weight": 0.5}),
  "fedaf_lam300_stop8": ("fedaf", {"fedaf.lam": 300.0, "fedaf.max_old_loss": 8.0}),
  "fedaf_lam1e3_stop8": ("fedaf", {"fedaf.lam": 1e3, "fedaf.max_old_loss": 8.0}),
}
# Composed variants: "<fedaf|fedaf_c>+<key>=<value>+...", keys of the fedaf section, e.g.
# "fedaf+epochs=5+lr=0.05+fisher_labels=model+lam=100" (the preserver ablation).


def variant_spec(name: str):
  """(method, overrides) of a listed or composed variant; SystemExit on a bad one."""
  if name in VARIANTS:
    return VARIANTS[name]
  method, *tokens = name.split("+")
  if method not in ("fedaf", "fedaf_c") or not tokens:
    raise SystemExit(
      f"unknown variant {name!r}; allowed {list(VARIANTS)} or "
      "'fedaf[_c]+key=value+...' (keys of the fedaf section)"
    )
  section = digits_cfg.get_config().fedaf
  overrides = {}
  for tok in tokens:
    key, sep, value = tok.partition("=")
    if not sep or key not in section:
      raise SystemExit(f"variant {name!r}: {tok!r} is not key=value with a fedaf.* key")
    overrides["fedaf." + key] = type(section[key])(value)
  return method, overrides


# Config sections that only matter to the method that owns them (a finished retrain run
# stays valid when, e.g., a FedAF default changes).
METHOD_SECTIONS = ("fedaf", "sga", "quickdrop", "channel", "cdp", "finetune")
NOT_RESULTS = ("method", "eval_every", "checkpoint_every")


def make_config(dataset: str, seed: int, variant: str):
  if dataset == "digits":
    c = digits_cfg.get_config()
    c.data.num_clients = 4
    c.unlearn.kind = "client_class"
    c.backdoor.enabled = True
    c.fedaf.lr = 0.005
  elif dataset == "digits_small":
    # tests/test_fedaf.py's end-to-end setting: MLP, 5 clients, 4 rounds, fedaf.lr 0.02.
    c = digits_cfg.get_config()
    c.fl.rounds, c.data.num_clients, c.checkpoint_every, c.eval_every = 4, 5, 100, 100
    c.model.name = "mlp"
    c.unlearn.kind = "client_class"
    c.backdoor.enabled = True
    c.fedaf.lr = 0.02
  elif dataset == "fmnist":
    c = fmnist_cfg.get_config("fedaf")
  else:
    raise ValueError(f"dataset {dataset!r}: allowed digits, digits_small, fmnist")
  c.seed = seed
  c.mia.enabled = False
  c.unlearn.forget_class, c.unlearn.forget_client = 0, 0
  method, overrides = variant_spec(variant)
  c.method = method
  c.update_from_flattened_dict(overrides)
  return c


def _relevant(cfg_dict: dict, method: str) -> dict:
  own = {"fedaf_c": "fedaf"}.get(method, method)
  out = {
    k: v
    for k, v in cfg_dict.items()
    if k not in NOT_RESULTS and (k not in METHOD_SECTIONS or k == own)
  }
  if not out.get("mia", {}).get("enabled", True):
    out["mia"] = {"enabled": False}  # its other keys change nothing when it is off
  return out


def run_variant(root: str, dataset: str, seed: int, variant: str) -> dict:
  """results.json of one variant, reusing a finished run with the same relevant config."""
  cfg = make_config(dataset, seed, variant)
  method = cfg.method
  base_wd = os.path.join(root, dataset, f"seed_{seed}")
  wd = base_wd if variant == "retrain" else os.path.join(base_wd, "variants", variant)
  os.makedirs(wd, exist_ok=True)
  if variant != "retrain":  # share the trained model with retrain's workdir
    os.makedirs(os.path.join(base_wd, "pretrain"), exist_ok=True)
    link = os.path.join(wd, "pretrain")
    if not os.path.islink(link):
      os.symlink(os.path.join(base_wd, "pretrain"), link)
  out = os.path.join(wd, method)
  res_path, cfg_path = os.path.join(out, "results.json"), os.path.join(out, "config.json")
  want = _relevant(caches.config_dict(cfg), method)
  if os.path.exists(res_path) and os.path.exists(cfg_path):
    with open(cfg_path) as f:
      if _relevant(json.load(f), method) == want:
        with open(res_path) as g:
          return json.load(g)
  if os.path.exists(out):
    shutil.rmtree(out)  # an unfinished or outdated run of this benchmark's own workdir
  t0 = time.perf_counter()
  try:
    res = run_lib.run(cfg, wd)
  except fl.DivergenceError as e:  # a diverged variant is a finding, reported as a row
    print(f"  {dataset} seed {seed} {variant}: {e}", flush=True)
    return {"diverged": str(e), "seed": seed}
  print(f"  {dataset} seed {seed} {variant}: {time.perf_counter() - t0:.0f} s wall", flush=True)
  return res


# ---------------------------------------------------------------------------------------
# The table.


def _ms(values, scale=1.0, fmt="{:.1f}"):
  v = np.asarray([x for x in values if x is not None], np.float64) * scale
  if v.size == 0:
    return "n/a"
  s = fmt.format(v.mean())
  return s + ("+-" + fmt.format(v.std(ddof=1)) if v.size > 1 else "")


def table(dataset: str, runs: dict) -> str:
  """runs[variant] = list of results (one per seed, same seed order for every variant)."""
  ref = runs["retrain"]
  r_test = [r["test_acc"] for r in ref]
  r_bd = [r["bd_acc"] for r in ref]
  r_sec = [r["unlearn_seconds"] for r in ref]
  lines = [
    f"== {dataset}: forget class 0 of client 0 (backdoor), seeds={[r['seed'] for r in ref]} ==",
    f"bd_acc before unlearning (trained model): "
    f"{_ms([r['original']['bd_acc'] for r in ref], 100)} %   "
    f"test acc before: {_ms([r['original']['test_acc'] for r in ref], 100)} %",
    f"{'variant':<15}{'test acc %':>14}{'gap to R':>10}{'retain %':>14}{'gap to R':>10}"
    f"{'bd after %':>13}{'(R)':>8}{'unlearn s':>13}{'(R)':>10}{'speed-up':>11}"
    f"{'rounds':>8}",
  ]
  for name, rs in runs.items():
    bad = [r for r in rs if "diverged" in r]
    if bad:
      lines.append(
        f"{name:<15}diverged (seeds {[r['seed'] for r in bad]}): {bad[0]['diverged'].split(';')[0]}"
      )
      continue
    test = [r["test_acc"] for r in rs]
    gap = [t - rt for t, rt in zip(test, r_test)]
    ret = [r["retain_acc"] for r in rs]
    rgap = [t - r["retain_acc"] for t, r in zip(ret, ref)]
    sec = [r["unlearn_seconds"] for r in rs]
    speed = [rt / max(s, 1e-9) for s, rt in zip(sec, r_sec)]
    lines.append(
      f"{name:<15}{_ms(test, 100):>14}{_ms(gap, 100, '{:+.1f}'):>10}"
      f"{_ms(ret, 100):>14}{_ms(rgap, 100, '{:+.1f}'):>10}"
      f"{_ms([r.get('bd_acc') for r in rs], 100):>13}{_ms(r_bd, 100):>8}"
      f"{_ms(sec, 1, '{:.2f}'):>13}{_ms(r_sec, 1, '{:.1f}'):>10}"
      f"{_ms(speed, 1, '{:.1f}') + 'x':>11}{rs[0]['rounds']:>8}"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Sketch vs diagonal penalty cost.


def _time(fn, *args, reps=20):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def penalty_cost(dataset: str, width: int = 50, batch: int = 64) -> str:
  cfg = make_config(dataset, 0, "fedaf")
  shape = (8, 8, 1) if dataset == "digits" else (28, 28, 1)
  model = models.create(cfg.model.name, 10)
  params = models.init_params(model, jax.random.key(0), shape)
  d = optax.tree.size(params)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  rand = lambda p, lead=(): jax.random.normal(next(keys), lead + p.shape, p.dtype)
  anchor = jax.tree.map(rand, params)
  states = {
    "diag": ewc.ewc_state_diag(anchor, jax.tree.map(lambda p: jnp.abs(rand(p)), params)),
    f"sketch t={width}": ewc.ewc_state_sketch(
      anchor, jax.tree.map(lambda p: rand(p, (width,)), params), 1024.0
    ),
  }
  x = jax.random.normal(jax.random.key(2), (batch,) + shape)
  y_new = jax.nn.softmax(jax.random.normal(jax.random.key(3), (batch, 10)))
  y_old = jnp.zeros((batch,), jnp.int32)
  batch_ = fl.Batch(x, (y_new, y_old), jnp.ones((batch,), bool))
  rows, base_step = [], None
  for name, state in states.items():
    grad_fn = jax.jit(lambda p, s: ewc.ewc_gradient(p, s, 10.0))
    kind = "diag" if name == "diag" else "sketch"
    prog = fedaf.unlearn_program(
      models.logits_fn(model), optax.sgd(0.002), ewc_kind=kind, lam=10.0, width=width
    )
    extra = state.fisher if kind == "diag" else (state.sketch, state.n)
    st = prog.init(params, (extra, batch, None), None)
    step = jax.jit(lambda s, b: prog.step(s, b, None)[0])
    t_pen = _time(grad_fn, params, state)
    t_step = _time(step, st, batch_)
    mem = tu.tree_num_bytes(state.fisher if kind == "diag" else state.sketch)
    rows.append((name, t_pen, t_step, mem))
  if True:  # the unlearning step without any penalty (fedaf_c), for reference
    prog = fedaf.unlearn_program(
      models.logits_fn(model), optax.sgd(0.002), ewc_kind=None, lam=0.0, width=1
    )
    step = jax.jit(lambda s, b: prog.step(s, b, None)[0])
    base_step = _time(step, prog.init(params, (None, batch, None), None), batch_)
  diag = rows[0]
  out = [
    f"== EWC penalty cost, {cfg.model.name} on {shape}, d={d} params, batch {batch} ==",
    f"{'curvature':<14}{'penalty grad ms':>17}{'x diag':>8}{'unlearn step ms':>17}"
    f"{'x diag':>8}{'memory':>12}",
  ]
  for name, t_pen, t_step, mem in rows:
    out.append(
      f"{name:<14}{t_pen * 1e3:>17.3f}{t_pen / diag[1]:>8.2f}{t_step * 1e3:>17.2f}"
      f"{t_step / diag[2]:>8.2f}{mem / 2**20:>9.2f} MiB"
    )
  out.append(
    f"{'none (fedaf_c)':<14}{'':>17}{'':>8}{base_step * 1e3:>17.2f}{base_step / diag[2]:>8.2f}"
  )
  out.append(
    f"memory: diag d floats = {d * 4 / 2**20:.2f} MiB; sketch t*d floats = "
    f"{width * d * 4 / 2**20:.2f} MiB (O(t d))"
  )
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--datasets", default="digits", help="comma list: digits, digits_small, fmnist")
  ap.add_argument("--seeds", default="0", help="comma list of seeds")
  ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list")
  ap.add_argument("--workdir", default="/tmp/fedaf_table")
  ap.add_argument("--penalty", default=1, type=int, help="measure the penalty cost (1/0)")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  variants = args.variants.split(",")
  if "retrain" not in variants:
    variants = ["retrain"] + variants
  for v in variants:
    variant_spec(v)  # SystemExit naming a bad variant before anything runs
  report = []
  for dataset in args.datasets.split(","):
    runs = {v: [] for v in variants}
    for seed in seeds:
      for v in variants:  # retrain first: it trains the shared model
        runs[v].append(run_variant(args.workdir, dataset, seed, v))
    report.append(table(dataset, runs))
    print(report[-1], flush=True)
    if args.penalty:
      report.append(penalty_cost(dataset))
      print(report[-1], flush=True)
    with open(os.path.join(args.workdir, f"{dataset}_runs.json"), "w") as f:
      json.dump(runs, f, indent=1)
  print("\n\n".join(report))


if __name__ == "__main__":
  main()
