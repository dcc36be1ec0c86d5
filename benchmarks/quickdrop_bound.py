"""How much can better synthetic sets improve QuickDrop's recovery? An upper bound.

    python3 benchmarks/quickdrop_bound.py --workdir=/tmp/qd_bound --seeds=0,1,2 \
        [--dataset=fmnist_iid] [--rounds=5] [--train_size=12000] [--recovery=5,20] \
        [--distill_every=0] [--image_lr=0.1] [--pretrain_dirs=DIR,DIR,...]

From one QuickDrop-trained model per seed (the `quickdrop` trainer; with model_update='real'
its model does not depend on the image steps), this runs the unlearning pipeline with
different sets and compares retained test accuracy (forget class --forget_class):

  distilled        quickdrop: SGA on the distilled forget images, recovery on the distilled
                   retained images (the method as shipped);
  real subset      quickdrop_nodistill: the same on the sets' real-image initialisation;
  oracle           SGA as `real subset`, then recovery rounds whose every client step uses
                   the gradient of ALL its real retained data (one full-batch step per round
                   and epoch, the same clipped SGD). Gradient matching aims at making a
                   set's gradient equal to the real data's, so a perfectly distilled set
                   cannot give a better recovery step than this: `oracle - real subset` bounds
                   what distillation can add to the recovery at this number of recovery
                   rounds;
  oracle SGA+recovery  the same, with the SGA step also taken on each client's whole real
                   forget data (one full-batch normalised step): perfect sets in both phases;
  masked logits    the trained model with the forgotten class's logit removed (no unlearning
                   step at all): what retain accuracy is when the forgotten class simply
                   stops being predicted.

Each row at each --recovery value (recovery_rounds), mean +- sample std over --seeds. The
models are trained (or taken from <workdir>'s pretraining cache) like
benchmarks/quickdrop_table.py --ablation trains them; --pretrain_dirs restores the final
checkpoint of existing training directories instead (one per seed, in --seeds order; their
config.json must hold the same data and training config as the one built here, apart from
keys added since). Unlearning runs in this process without checkpoints.
"""

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fu_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.use_defaults()  # before any JAX computation

from experiments import caches  # pylint: disable=wrong-import-position
from experiments import task as task_lib  # pylint: disable=wrong-import-position
from experiments.configs import fashion_mnist as fmnist_cfg  # pylint: disable=wrong-import-position
from fu_jax import (
  checkpoint,  # pylint: disable=wrong-import-position
  fl,  # pylint: disable=wrong-import-position
  images,  # pylint: disable=wrong-import-position
)
from fu_jax.methods import base  # pylint: disable=wrong-import-position
from fu_jax.methods import quickdrop as qd  # pylint: disable=wrong-import-position
from fu_jax.metrics import accuracy as acc_lib  # pylint: disable=wrong-import-position


def make_config(args, seed: int):
  c = fmnist_cfg.get_config("iid" if args.dataset == "fmnist_iid" else "dirichlet")
  c.fl.rounds = args.rounds
  c.eval_every = c.checkpoint_every = max(1, args.rounds // 2)
  c.data.train_size = args.train_size
  if args.source:
    c.data.source = args.source
  c.quickdrop.distill_every = args.distill_every
  if args.image_lr:
    c.quickdrop.image_lr = args.image_lr
  c.mia.enabled = False
  c.unlearn.forget_class = args.forget_class
  c.method = "quickdrop"
  c.seed = seed
  return c


class _Env:
  """base.Env's runner and rounds, in memory (no checkpoints, no logging)."""

  def __init__(self, task: base.Task):
    cfg = task.config
    self.kind = fl.choose_runner(cfg.model.name) if cfg.fl.runner == "auto" else cfg.fl.runner
    self.chunk_size = cfg.fl.chunk_size

  def runner(self, program, epochs, batch_size):
    return fl.ClientRunner(
      program, kind=self.kind, epochs=epochs, batch_size=batch_size, chunk_size=self.chunk_size
    )

  def rounds(self, phase, state, num_rounds, round_fn, params_fn):
    del phase
    for r in range(num_rounds):
      state, _ = round_fn(state, r)
      fl.check_finite(params_fn(state), "bound")
    return state


def trained_model(task: base.Task, args, pretrain_dir: str | None) -> base.Trained:
  if pretrain_dir is None:
    trained, env = caches.pretrained(task, args.workdir, "quickdrop")
    del env
    return trained
  ckpt_dir = os.path.join(pretrain_dir, "ckpt", "train")
  with open(os.path.join(ckpt_dir, "config.json")) as f:
    stored = json.load(f)
  init, _ = qd.training_rounds(task, _Env(task), qd.settings(task.config))
  state, step, _ = checkpoint.Checkpointer(ckpt_dir, stored).restore_or(init)
  if step != task.config.fl.rounds:
    raise SystemExit(
      f"{ckpt_dir}: latest checkpoint after round {step}, need {task.config.fl.rounds}"
    )
  return base.Trained(state.server.params, kept=state.syn)


def with_recovery(task: base.Task, rounds: int) -> base.Task:
  cfg = task.config.copy_and_resolve_references()
  cfg.quickdrop.recovery_rounds = rounds
  return task._replace(config=cfg)


def oracle(task: base.Task, env, params, rounds: int, forgotten, *, sga: bool = False):
  """Recovery rounds on every client's whole real retained data, one full-batch step each
  (sga=True: first QuickDrop's SGA round with one full-batch step on each client's real
  forget data). Returns (evaluation, params)."""
  cfg = task.config.copy_and_resolve_references()
  c = task.clients
  cfg.fl.batch_size = int(np.asarray(c.valid).sum(axis=1).max())
  s = qd.settings(cfg)
  phases = qd.unlearning_phases(task._replace(config=cfg), env, s)
  real = (images.materialize(c.x), c.y)
  weights = np.asarray(task.client_weights, np.float32)
  drop = np.isin(np.asarray(task.y_true), forgotten)
  if sga:
    fvalid = np.asarray(c.valid) & drop
    params = phases.run(
      "oracle_sga",
      params,
      1,
      real,
      jnp.asarray(fvalid),
      program="sga",
      weights=(fvalid.sum(axis=1) > 0).astype(np.float32) * weights,
      num_sampled=len(weights),
      round_offset=cfg.fl.rounds,
    )
  keep = jnp.asarray(np.asarray(c.valid) & ~drop)
  params = phases.run(
    "oracle",
    params,
    rounds,
    real,
    keep,
    program="recovery",
    weights=weights,
    num_sampled=base.num_sampled(cfg),
    round_offset=cfg.fl.rounds + 1,
  )
  return evaluate(task, params, forgotten), params


def evaluate(task: base.Task, params, forgotten, apply_fn=None) -> dict:
  ds = task.dataset
  ev = acc_lib.evaluate(
    apply_fn or task.apply_fn, params, ds.x_test, ds.y_test, task.num_classes, forgotten
  )
  return {"retain_acc": ev["retain_acc"], "forget_acc": ev["forget_acc"]}


def probe(args, seed: int, pretrain_dir: str | None) -> dict:
  task = task_lib.build_task(make_config(args, seed))
  trained = trained_model(task, args, pretrain_dir)
  forgotten = tuple(task.request.classes)
  env = _Env(task)
  real = qd.init_sets(task, qd.settings(task.config))
  if not np.array_equal(np.asarray(real.valid), np.asarray(trained.kept.valid)):
    raise SystemExit(
      "the trained sets do not have the layout init_sets builds here: "
      "a different data or training config"
    )
  out = {"trained": evaluate(task, trained.params, forgotten)}
  drop = np.isin(np.arange(task.num_classes), forgotten)
  masked = lambda p, x: jnp.where(drop, -1e9, task.apply_fn(p, x))
  out["masked logits"] = evaluate(task, trained.params, forgotten, masked)
  out["oracle SGA"] = oracle(task, env, trained.params, 0, forgotten, sga=True)[0]
  sga_real = qd._unlearn(
    with_recovery(task, 0),
    env,
    trained._replace(kept=real),
  ).params
  out["after SGA (distilled)"] = evaluate(
    task,
    qd._unlearn(with_recovery(task, 0), env, trained).params,
    forgotten,
  )
  out["after SGA (real subset)"] = evaluate(task, sga_real, forgotten)
  for rec in args.recovery:
    t = with_recovery(task, rec)
    out[f"distilled@{rec}"] = evaluate(task, qd._unlearn(t, env, trained).params, forgotten)
    out[f"real subset@{rec}"] = evaluate(
      task,
      qd._unlearn(t, env, trained._replace(kept=real)).params,
      forgotten,
    )
    out[f"oracle@{rec}"] = oracle(task, env, sga_real, rec, forgotten)[0]
    out[f"oracle SGA+recovery@{rec}"] = oracle(task, env, trained.params, rec, forgotten, sga=True)[
      0
    ]
    print(
      f"  seed {seed} recovery {rec}: "
      + ", ".join(
        f"{k} {100 * out[k]['retain_acc']:.1f}"
        for k in (f"distilled@{rec}", f"real subset@{rec}", f"oracle@{rec}")
      ),
      flush=True,
    )
  return out


def _ms(v):
  v = 100 * np.asarray(v, np.float64)
  sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  return f"{v.mean():5.1f} +- {sd:3.1f}"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/qd_bound")
  p.add_argument("--dataset", default="fmnist_iid", choices=("fmnist_iid", "fmnist_dir"))
  p.add_argument("--seeds", default="0")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--train_size", type=int, default=12000)
  p.add_argument("--source", default="", help="data.source override (default: the config's)")
  p.add_argument("--forget_class", type=int, default=0)
  p.add_argument("--distill_every", type=int, default=0)
  p.add_argument("--image_lr", type=float, default=0.0)
  p.add_argument("--recovery", default="5")
  p.add_argument("--pretrain_dirs", default="")
  args = p.parse_args()
  args.recovery = [int(v) for v in args.recovery.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  dirs = [d for d in args.pretrain_dirs.split(",") if d] or [None] * len(seeds)
  if len(dirs) != len(seeds):
    raise SystemExit(f"--pretrain_dirs: {len(dirs)} directories for {len(seeds)} seeds")
  res = [probe(args, s, d) for s, d in zip(seeds, dirs)]
  print(f"\ncommand: python3 benchmarks/quickdrop_bound.py {' '.join(sys.argv[1:])}")
  print(f"load (uptime) at the end: {os.getloadavg()}")
  print(f"seeds {seeds}; retain / forget accuracy in %, mean +- sample std")
  for key in res[0]:
    print(
      f"{key:<26}{_ms([r[key]['retain_acc'] for r in res]):>15}"
      f"{_ms([r[key]['forget_acc'] for r in res]):>15}"
    )
  for rec in args.recovery:
    d = [r[f"distilled@{rec}"]["retain_acc"] - r[f"real subset@{rec}"]["retain_acc"] for r in res]
    o = [r[f"oracle@{rec}"]["retain_acc"] - r[f"real subset@{rec}"]["retain_acc"] for r in res]
    print(f"recovery {rec}: distilled - real {_ms(d)}; oracle - real {_ms(o)} (paired)")


if __name__ == "__main__":
  main()
