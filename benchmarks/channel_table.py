"""Channel-explanation unlearning (Xu et al.) against Retrain and CDP, plus the paper's Table 3.

    PYTHONPATH=. python benchmarks/channel_table.py --dataset=digits --partition=iid
    PYTHONPATH=. python benchmarks/channel_table.py --dataset=fashion_mnist --partition=shards \
        [--rounds=20] [--epochs=2] [--workdir=/tmp/channel_table]

For one dataset and partition (iid, or shards = one class per client, the paper's non-IID
setting) it trains FedAvg once (cached in the workdir), then runs retrain, channel_de,
channel_ce, channel_de_random and cdp through experiments.run.run on the same trained model,
forgetting class `--forget_class`, and prints per method: forget / retain / test accuracy
(the original model's alongside), bytes up and down, examples touched, unlearning seconds
(compiled; compilation excluded; select_s = the channel-selection part of it) and the
speed-up over retrain, with (speedup) and without (sp_ft) the selection.

Table 3 of the paper: in each conv layer of the trained model, zero 30% of the output
channels chosen as the most important for the forget class (highest effect on the server's
forget batch I), the least important, or at random, and report accuracy on the test
samples of the forgotten class and of the retained classes.

Runs are resumable: rerunning with the same flags reuses finished runs' results.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fu_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.use_defaults()  # before any JAX computation

from experiments import caches  # pylint: disable=wrong-import-position
from experiments import run as run_lib  # pylint: disable=wrong-import-position
from experiments import task as task_lib  # pylint: disable=wrong-import-position
from experiments.configs import digits as digits_cfg  # pylint: disable=wrong-import-position
from experiments.configs import fashion_mnist as fmnist_cfg  # pylint: disable=wrong-import-position
from fu_jax import (
  fl,  # pylint: disable=wrong-import-position
  masking,  # pylint: disable=wrong-import-position
)
from fu_jax.methods import channel  # pylint: disable=wrong-import-position
from fu_jax.metrics import accuracy as acc_lib  # pylint: disable=wrong-import-position

METHODS = ("retrain", "channel_de", "channel_ce", "channel_de_random", "cdp")


def make_config(args, method):
  if args.dataset == "digits":
    c = digits_cfg.get_config()
    if args.partition == "shards":
      c.data.partition, c.data.classes_per_client = "shards", 1
  else:
    c = fmnist_cfg.get_config(args.partition)
  c.method = method
  c.mia.enabled = args.mia
  c.unlearn.forget_class = args.forget_class
  if args.rounds:
    c.fl.rounds = args.rounds
  c.eval_every = c.fl.rounds  # evaluate at the end of each phase only
  # Flags left at 0 keep the config's defaults (experiments/configs/default.py).
  for key, value in (
    ("channel.epochs", args.epochs),
    ("channel.delta", args.delta),
    ("channel.server_samples", args.server_samples),
    ("cdp.sparsity", args.cdp_sparsity),
    ("cdp.finetune_rounds", args.cdp_rounds),
  ):
    if value:
      _set(c, key, value)
  return c


def _set(config, key, value):
  node = config
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  node[last] = type(node[last])(value)


def run_method(args, wd, method, overrides=()):
  """One run; a variant (overrides) runs in its own sub-workdir that links the pretraining."""
  if overrides:
    sub = os.path.join(wd, "variants", "+".join(f"{k}={v}" for k, v in overrides))
    os.makedirs(sub, exist_ok=True)
    if not os.path.exists(os.path.join(sub, "pretrain")):
      os.makedirs(os.path.join(wd, "pretrain"), exist_ok=True)
      os.symlink(os.path.join(wd, "pretrain"), os.path.join(sub, "pretrain"))
    wd = sub
  path = os.path.join(wd, method, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = make_config(args, method)
  for k, v in overrides:
    _set(config, k, v)
  t0 = time.time()
  res = run_lib.run(config, wd)
  print(f"  [{method}] finished in {time.time() - t0:.0f} s wall", flush=True)
  return res


def parse_variants(text):
  """'m@k=v+k=v;m2@k=v' -> [(label, method, ((k, v), ...))]."""
  out = []
  for item in filter(None, text.split(";")):
    method, _, rest = item.partition("@")
    kv = tuple(tuple(x.split("=", 1)) for x in filter(None, rest.split("+")))
    label = method + "".join(f"[{k.split('.')[-1]}={v}]" for k, v in kv)
    out.append((label, method, kv))
  return out


def _fmt_bytes(b):
  if b == 0:
    return "0"
  for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if b >= s:
      return f"{b / s:.2f} {unit}"
  return f"{b} B"


def print_table(results):
  rt = results["retrain"]
  o = rt["original"]
  print(
    f"original model: forget {o['forget_acc']:.4f}  retain {o['retain_acc']:.4f}  "
    f"test {o['test_acc']:.4f}"
  )
  head = (
    f"{'method':<30}{'forget':>8}{'retain':>8}{'d_ret':>8}{'test':>8}{'bytes_up':>11}"
    f"{'bytes_dn':>11}{'examples':>10}{'rounds':>7}{'unlearn_s':>10}{'select_s':>9}"
    f"{'speedup':>9}{'sp_ft':>9}"
  )
  print(head)
  print("-" * len(head))
  for m, r in results.items():
    sp = rt["unlearn_seconds"] / max(r["unlearn_seconds"], 1e-9)
    sel = r.get("selection_seconds")
    # Xu et al. (Sec. 4.3): the selection "can be performed at any time during the inference
    # phase"; sp_ft is the speed-up of the rest (fine-tuning, or pruning + fine-tuning).
    sp_ft = rt["unlearn_seconds"] / max(r["unlearn_seconds"] - (sel or 0.0), 1e-9)
    print(
      f"{m:<30}{r['forget_acc']:>8.4f}{r['retain_acc']:>8.4f}"
      f"{r['retain_acc'] - o['retain_acc']:>+8.4f}{r['test_acc']:>8.4f}"
      f"{_fmt_bytes(r['bytes_up']):>11}{_fmt_bytes(r['bytes_down']):>11}"
      f"{r['examples']:>10}{r['rounds']:>7}{r['unlearn_seconds']:>10.2f}"
      f"{'' if sel is None else f'{sel:.2f}':>9}{sp:>8.1f}x{sp_ft:>8.1f}x"
    )
  de = results.get("channel_de")
  if de:
    print(
      f"channel_de: {de['selected_channels']}/{de['model_channels']} channels "
      f"({de['selected_channel_fraction']:.3f}), {de['selected_param_fraction']:.3f} of "
      f"params; one upload {_fmt_bytes(de['upload_bytes_per_client_round'])} = "
      f"{de['upload_fraction_of_model']:.3f} of the model "
      f"({_fmt_bytes(de['model_bytes'])}); retrain per round "
      f"{_fmt_bytes(rt['bytes_up'] / max(rt['rounds'], 1))} up, channel_de per round "
      f"{_fmt_bytes(de['bytes_up'] / max(de['rounds'], 1))} up"
    )
  ce = results.get("channel_ce")
  if ce:
    print(
      f"channel_ce: server sample {ce['server_samples']} "
      f"({ce['perturbation_examples']} perturbation), {ce['finetune_epochs']} epochs"
    )
  cdp = results.get("cdp")
  if cdp:
    print(
      f"cdp: pruned {cdp['pruned_channels']} conv channels "
      f"({cdp['pruned_channel_fraction_of_conv']:.3f}), {cdp['finetune_rounds']} "
      "fine-tune rounds"
    )


def table3(args, wd, frac=0.3):
  """Prune important / random / non-important channels of one layer (Xu et al. Table 3)."""
  cfg = make_config(args, "retrain")
  task = task_lib.build_task(cfg)
  trained, _ = caches.pretrained(task, wd, "fedavg")
  params = trained.params
  x, y = channel.forget_batch(task, cfg.channel.effect_samples)
  convs = [p for p in channel.scored_layers(params, "conv")]
  eff = jax.jit(
    lambda p: masking.channel_effects(
      channel.apply_fn(task), p, jnp.asarray(x), jnp.asarray(y), metric="both", layers=tuple(convs)
    )
  )(params)
  ds = task.dataset
  forget_c = np.isin(ds.y_test, task.request.classes)

  def accs(p):
    pred = acc_lib.predict_logits(task.apply_fn, p, ds.x_test).argmax(-1)
    ok = pred == ds.y_test
    return float(ok[forget_c].mean()), float(ok[~forget_c].mean())

  base = accs(params)
  neg = masking.ChannelEffects(
    acc={k: -v for k, v in eff.acc.items()}, loss={k: -v for k, v in eff.loss.items()}
  )
  key = fl.stream_key(cfg.seed, fl.STREAM_EVAL, 3)
  print(
    f"Table 3 ({frac:.0%} of one layer's channels zeroed; accuracy on test samples of "
    f"the forgotten class / of the retained classes; |I| = {x.shape[0]})"
  )
  print(f"{'layer':<10}{'selection':<15}{'forget':>8}{'retain':>8}")
  out = {}
  for layer in convs:
    print(f"{'/'.join(layer):<10}{'original':<15}{base[0]:>8.4f}{base[1]:>8.4f}")
    sub = lambda e: {layer: e[layer]}
    choices = {
      "important": masking.top_delta_channels(
        masking.ChannelEffects(sub(eff.acc), sub(eff.loss)), frac
      ),
      "random": masking.random_channels([(layer, eff.acc[layer].shape[0])], frac, key),
      "non-important": masking.top_delta_channels(
        masking.ChannelEffects(sub(neg.acc), sub(neg.loss)), frac
      ),
    }
    for name, cm in choices.items():
      pruned = masking.zero_masked(params, masking.channel_mask_to_param_mask(cm, params))
      a = accs(pruned)
      out[f"{'/'.join(layer)}/{name}"] = a
      print(f"{'/'.join(layer):<10}{name:<15}{a[0]:>8.4f}{a[1]:>8.4f}")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
  ap.add_argument("--partition", choices=("iid", "shards"), default="iid")
  ap.add_argument("--rounds", type=int, default=0, help="FedAvg rounds (0 = config's)")
  ap.add_argument("--epochs", type=int, default=0, help="channel.epochs (0 = config's)")
  ap.add_argument("--delta", type=float, default=0.0, help="channel.delta (0 = config's)")
  ap.add_argument("--server_samples", type=int, default=0, help="0 = config's (1600)")
  ap.add_argument("--cdp_sparsity", type=float, default=0.0, help="0 = config's")
  ap.add_argument("--cdp_rounds", type=int, default=0, help="0 = config's")
  ap.add_argument("--forget_class", type=int, default=0)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument(
    "--variants",
    default="channel_de@channel.epochs=1;"
    "channel_de_random@channel.epochs=1;channel_ce@channel.epochs=1",
    help="extra rows: 'method@key=value+key=value;...' (config keys)",
  )
  ap.add_argument("--mia", action="store_true", help="also run membership inference")
  ap.add_argument("--no_table3", action="store_true")
  ap.add_argument("--workdir", default="/tmp/channel_table")
  args = ap.parse_args()
  wd = os.path.join(args.workdir, f"{args.dataset}-{args.partition}-r{args.rounds}")
  os.makedirs(wd, exist_ok=True)
  print(
    f"== {args.dataset} {args.partition}, rounds={args.rounds or 'config'}, "
    f"forget class {args.forget_class}; "
    f"backend {jax.default_backend()}, workdir {wd}",
    flush=True,
  )
  results = {}
  for m in args.methods.split(","):
    results[m] = run_method(args, wd, m)
  for label, m, kv in parse_variants(args.variants):
    results[label] = run_method(args, wd, m, kv)
  print()
  print_table(results)
  if not args.no_table3:
    print()
    table3(args, wd)


if __name__ == "__main__":
  main()
