r"""Per-example privacy audit of one unlearning method over a bank of models.

  python -m experiments.audit --method=<name> --config=experiments/configs/audit_digits.py \
      --workdir=<dir> --models=K [--config.<key>=<value> ...]

Trains K models before unlearning and runs the method on each (the "unlearned" side), and
K models retrained from scratch without the forgotten samples (the reference side). The data
(split, partition, forgotten samples) come from config.seed (or config.data.seed) and stay
fixed; each model's training randomness (initialisation, client sampling, batch order, the
method's own randomness) comes from its bank seed, stream_key(config.seed, STREAM_BANK,
side, k) with side 0 for the unlearned side and 1 for the reference: every model of both
sides is independent, and a larger K reuses the first models.

Each forgotten sample is scored under each model by its logit-scaled confidence, and
fu_jax.metrics.audit turns the two [K, n] arrays into the NeurIPS'23 forget score F (and the
final score F x retain-accuracy ratio x test-accuracy ratio; retain accuracy on the retained
training samples, as in the competition), per-example epsilons and U-LiRA, with 95%
bootstrap intervals (ulira_auc_ci, f_ci; --bootstrap replicates drawn from
stream_key(config.seed, STREAM_BANK, BOOTSTRAP_ID): every method's audit of one setting uses
the same draws) and TPRs only at the FPRs the K x n negatives support (None otherwise). When
the method starts from a trained model, the trained models themselves (no unlearning) are
audited against the same reference too ("original"). --method=retrain audits a retrain bank
against the independent reference bank: the null every other method is read against.

--bank: `sequential` runs the models one after another through the runner's machinery
(any method, any model); `vmap` runs each side's FedAvg phases (training, retrain, finetune)
for all K models as one vmapped program (fu_jax.bank; equal to the sequential models to float
tolerance), then a method with its own unlearning (sga, fedaf, ...) runs it per model from
its bank-trained model, the K runs sharing one set of compiled programs (per-model values
such as SGA's ball radius or FedAF's Fisher are runtime arguments; tests/test_audit.py
checks that the second model compiles nothing); `auto` (default) picks vmap where the client runner vmaps (dense
models on CPU; any model on accelerators), since a vmapped conv net is slow on XLA:CPU.

Writes <workdir>/audit/<method>/audit.json and epsilons.png. Models live in
<workdir>/audit/models/<side>_<k>/ (the trained model cached per bank seed and shared by
every method audited into this workdir, each method's checkpoints, and audit_stats.json per
model): a rerun or another method reuses what exists.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import caches, validation
from experiments import env as env_lib
from experiments import task as task_lib
from fu_jax import bank as bank_lib
from fu_jax import checkpoint, fl
from fu_jax import methods as methods_lib
from fu_jax.methods import base
from fu_jax.metrics import accuracy as acc_lib
from fu_jax.metrics import audit as audit_lib

UNLEARNED, REFERENCE = 0, 1
BOOTSTRAP_ID = 2  # the bootstrap's draws: an id under STREAM_BANK no bank side uses
SIDE_NAMES = {UNLEARNED: "u", REFERENCE: "r"}
BANKS = ("auto", "vmap", "sequential")


def bank_seed(seed: int, side: int, k: int) -> int:
  """The training seed of model k of a side: an int drawn from (seed, STREAM_BANK, side, k)."""
  key = fl.stream_key(seed, fl.STREAM_BANK, side, k)
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def bootstrap_seed(seed: int) -> int:
  """The seed of the audit's bootstrap draws: an int drawn from (seed, STREAM_BANK, 2)."""
  key = fl.stream_key(seed, fl.STREAM_BANK, BOOTSTRAP_ID)
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def model_config(config, method: str, seed: int):
  """config for one bank model: its training seed, the data seed pinned, no MIA."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.seed = task_lib.data_seed(config)
    c.seed = seed
    c.method = method
    c.mia.enabled = False
  return c


def stats_key(config, method: base.Method) -> dict:
  """What determines one model's audit statistics (and its checkpoints)."""
  d = caches.config_dict(config)
  key = caches.training_config(config, method.trainer)
  key.update(method=method.name, unlearn=d["unlearn"])
  s = method.section  # fedaf_c reads the fedaf section, channel_de channel, ...
  if s is not None and s.name in d:
    key[s.name] = d[s.name]
  return key


def retain_train_accuracy(task: base.Task, params) -> float:
  keep = np.asarray(task.retain_valid)
  x = np.asarray(task.clients.x[keep])
  y = np.asarray(task.y_true)[keep]
  return acc_lib.accuracy(acc_lib.predict_logits(task.apply_fn, params, x), y)


def model_stats(task: base.Task, params) -> dict:
  """phi of every forgotten sample (original labels), retain-train and test accuracy."""
  forget = np.asarray(task.forget)
  x = np.asarray(task.clients.x[forget])
  y = np.asarray(task.y_true)[forget]
  logits = acc_lib.predict_logits(task.apply_fn, params, x)
  test = acc_lib.accuracy(
    acc_lib.predict_logits(task.apply_fn, params, task.dataset.x_test), task.dataset.y_test
  )
  return {
    "phi": audit_lib.logit_confidence(logits, y).tolist(),
    "retain_acc": retain_train_accuracy(task, params),
    "test_acc": test,
    "forget_acc": acc_lib.accuracy(logits, y),
  }


def run_model(config, workdir: str, method_name: str, side: int, k: int) -> dict:
  """Trains (or reloads) bank model k of `side`, unlearns with the method, returns stats.

  Reference-side models are retrain runs. Cached in <dir>/<method>/audit_stats.json.
  """
  method = methods_lib.get(method_name)
  seed = bank_seed(config.seed, side, k)
  cfg = model_config(config, method_name, seed)
  directory = os.path.join(workdir, "audit", "models", f"{SIDE_NAMES[side]}_{k}")
  out_dir = os.path.join(directory, method.name)
  os.makedirs(out_dir, exist_ok=True)
  key = stats_key(cfg, method)
  path = os.path.join(out_dir, "audit_stats.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached["key"] == json.loads(json.dumps(key)):
      return cached
  task = task_lib.build_task(cfg)
  trained, train_seconds, original = None, 0.0, None
  if method.name != "retrain":
    trained, train_env = caches.pretrained(task, directory, method.trainer)
    train_seconds = train_env.seconds["wall"] - train_env.seconds["compile"]
    original = model_stats(task, trained.params)
  env = env_lib.RunEnv(task, out_dir, key)
  t0 = time.perf_counter()
  outcome = method.unlearn(task, env, trained)
  jax.block_until_ready(outcome.params)
  wall = time.perf_counter() - t0
  env.logger.close()
  fl.check_finite(outcome.params, f"audit model {SIDE_NAMES[side]}_{k} ({method.name})")
  stats = dict(
    model_stats(task, outcome.params),
    key=key,
    seed=seed,
    train_seconds=train_seconds,
    unlearn_wall_seconds=wall,
    unlearn_seconds=env.seconds["wall"] - env.seconds["compile"],
    original=original,
  )
  checkpoint.write_json_atomic(path, stats)
  return stats


def _cached(config, workdir, method_name, side, k):
  method = methods_lib.get(method_name)
  cfg = model_config(config, method_name, bank_seed(config.seed, side, k))
  path = os.path.join(
    workdir, "audit", "models", f"{SIDE_NAMES[side]}_{k}", method.name, "audit_stats.json"
  )
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached["key"] == json.loads(json.dumps(stats_key(cfg, method))):
      return cached
  return None


def bank_kind(config, requested: str) -> str:
  """'vmap' or 'sequential': auto = vmap where the client runner would vmap (dense models on
  CPU, every model on accelerators), since the bank adds a model axis to the same steps."""
  if requested not in BANKS:
    raise validation.ConfigError(f"--bank={requested!r}: allowed {BANKS}")
  if requested != "auto":
    return requested
  return "sequential" if fl.choose_runner(config.model.name) == "loop" else "vmap"


def _trained_bank(workdir: str, cfgs: list, like, train):
  """The bank's trained models, cached in <workdir>/audit/models/trained-<hash>.npz (keyed by
  every model's training config) so the audits of several methods train them once."""
  key = [caches.training_config(c, "fedavg") for c in cfgs]
  digest = caches.config_hash({"k": key})
  path = os.path.join(workdir, "audit", "models", f"trained-{digest}.npz")
  leaves, treedef = jax.tree.flatten(like)
  if os.path.exists(path):
    with np.load(path) as f:
      meta = json.loads(str(f["meta"]))
      return (
        jax.tree.unflatten(treedef, [jnp.asarray(f[f"l{i}"]) for i in range(len(leaves))]),
        meta["train_seconds"],
      )
  t0 = time.perf_counter()
  trained = jax.block_until_ready(train())
  seconds = time.perf_counter() - t0
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + f".tmp-{os.getpid()}.npz"
  np.savez(
    tmp,
    meta=json.dumps({"train_seconds": seconds}),
    **{f"l{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(trained))},
  )
  os.replace(tmp, path)
  return trained, seconds


def _bank_side(
  config, workdir: str, method_name: str, side: int, num_models: int, cached: list
) -> list:
  """All K models of a side with their FedAvg phases (training, retrain, finetune) as one
  vmapped program each (fu_jax.bank); other methods' unlearning then runs per model."""
  method = methods_lib.get(method_name)
  seeds = [bank_seed(config.seed, side, k) for k in range(num_models)]
  cfgs = [model_config(config, method_name, s) for s in seeds]
  task = task_lib.build_task(cfgs[0])
  tasks = [task._replace(config=c) for c in cfgs]
  cfg = cfgs[0]
  c = task.clients
  runner = bank_lib.BankRunner(
    fl.sgd_program(task.apply_fn, base.client_optimizer(cfg)), cfg.fl.batch_size
  )
  common = dict(
    seeds=seeds,
    epochs=cfg.fl.local_epochs,
    num_sampled=base.num_sampled(cfg),
    server_lr=cfg.fl.server_lr,
  )
  stack = lambda ps: jax.tree.map(lambda *a: jnp.stack(a), *ps)
  init = stack([base.init_params(t) for t in tasks])
  t0 = time.perf_counter()
  if method.name == "retrain":
    params = bank_lib.fedavg_bank(
      runner,
      init,
      (c.x, c.y),
      task.retain_valid,
      client_weights=task.client_weights,
      num_rounds=cfg.fl.rounds,
      **common,
    )
    trained, train_seconds = None, 0.0
  else:
    if method.trainer.name != "fedavg":
      raise validation.ConfigError(
        f"--bank=vmap trains FedAvg models; {method.name} starts from "
        f"its own trainer {method.trainer.name!r}: use --bank=sequential"
      )
    trained, train_seconds = _trained_bank(
      workdir,
      cfgs,
      init,
      lambda: bank_lib.fedavg_bank(
        runner,
        init,
        (c.x, c.y),
        c.valid,
        client_weights=np.ones(c.valid.shape[0], np.float32),
        num_rounds=cfg.fl.rounds,
        **common,
      ),
    )
    t0 = time.perf_counter()
    if method.name == "fedavg":
      params = trained
    elif method.name == "finetune":
      params = bank_lib.fedavg_bank(
        runner,
        trained,
        (c.x, c.y),
        task.retain_valid,
        client_weights=task.client_weights,
        num_rounds=cfg.finetune.rounds,
        round_offset=cfg.fl.rounds,
        **common,
      )
    else:
      params = None
  bank_seconds = 0.0
  if params is not None:
    jax.block_until_ready(params)
    bank_seconds = time.perf_counter() - t0
  out = []
  for k in range(num_models):
    if params is None and cached[k]:  # this model's unlearning ran before
      out.append(cached[k])
      continue
    directory = os.path.join(workdir, "audit", "models", f"{SIDE_NAMES[side]}_{k}")
    out_dir = os.path.join(directory, method.name)
    os.makedirs(out_dir, exist_ok=True)
    key = stats_key(cfgs[k], method)
    one = lambda tree: jax.tree.map(lambda a: a[k], tree)
    if params is None:  # the method's own unlearning, per model, from its bank-trained model
      env = env_lib.RunEnv(tasks[k], out_dir, key)
      t1 = time.perf_counter()
      outcome = method.unlearn(tasks[k], env, base.Trained(one(trained)))
      jax.block_until_ready(outcome.params)
      env.logger.close()
      p_k, seconds = outcome.params, time.perf_counter() - t1
    else:
      p_k, seconds = one(params), bank_seconds / num_models
    fl.check_finite(p_k, f"audit model {SIDE_NAMES[side]}_{k} ({method.name})")
    stats = dict(
      model_stats(tasks[k], p_k),
      key=key,
      seed=seeds[k],
      train_seconds=train_seconds / num_models,
      unlearn_wall_seconds=seconds,
      unlearn_seconds=seconds,
      original=None if trained is None else model_stats(tasks[k], one(trained)),
      bank="vmap",
    )
    checkpoint.write_json_atomic(os.path.join(out_dir, "audit_stats.json"), stats)
    out.append(stats)
  print(
    f"[audit {method.name}] side {SIDE_NAMES[side]}: {num_models} models as a vmapped bank "
    f"in {time.perf_counter() - t0 + train_seconds:.1f} s",
    flush=True,
  )
  return out


def _side(config, workdir, method, side, num_models, bank="sequential"):
  cached = [_cached(config, workdir, method, side, k) for k in range(num_models)]
  if bank == "vmap" and not all(cached):
    return _bank_side(config, workdir, method, side, num_models, cached)
  out = []
  for k in range(num_models):
    t0 = time.perf_counter()
    out.append(cached[k] or run_model(config, workdir, method, side, k))
    print(
      f"[audit {method}] {SIDE_NAMES[side]}_{k} done in {time.perf_counter() - t0:.1f} s "
      f"(retain {out[-1]['retain_acc']:.3f}, test {out[-1]['test_acc']:.3f}, forget "
      f"{out[-1]['forget_acc']:.3f})",
      flush=True,
    )
  return out


def summarize(
  unlearned: list, reference: list, *, seed: int = 0, bootstrap: int = audit_lib.BOOTSTRAP
) -> dict:
  """audit_lib.audit of the two sides (intervals from `bootstrap` replicates of `seed`'s
  draws) plus accuracies and the final score."""
  u = np.array([s["phi"] for s in unlearned])
  r = np.array([s["phi"] for s in reference])
  out = audit_lib.audit(u, r, seed=seed, bootstrap=bootstrap)
  acc = lambda side, k: [s[k] for s in side]
  out["final_score"] = audit_lib.final_score(
    out["forget_score"],
    retain_unlearned=acc(unlearned, "retain_acc"),
    retain_retrained=acc(reference, "retain_acc"),
    test_unlearned=acc(unlearned, "test_acc"),
    test_retrained=acc(reference, "test_acc"),
  )
  for name, side in (("unlearned", unlearned), ("retrained", reference)):
    for k in ("retain_acc", "test_acc", "forget_acc"):
      out[f"{name}_{k}"] = float(np.mean(acc(side, k)))
  out["mean_phi_unlearned"] = float(u.mean())
  out["mean_phi_retrained"] = float(r.mean())
  return out


def audit(
  config,
  workdir: str,
  method_name: str,
  num_models: int,
  bank: str = "auto",
  bootstrap: int = audit_lib.BOOTSTRAP,
) -> dict:
  """Runs the audit; writes <workdir>/audit/<method>/audit.json and epsilons.png."""
  method = methods_lib.get(method_name)
  bank = bank_kind(config, bank)
  if num_models < 3:
    raise validation.ConfigError(
      f"--models={num_models}: the audit needs >= 3 models per side "
      "(U-LiRA's leave-one-out fits and F's buckets)"
    )
  validation.validate(config, method.name)
  validation.validate(config, "retrain")
  if not isinstance(bootstrap, int) or bootstrap < 0:
    raise validation.ConfigError(
      f"--bootstrap={bootstrap!r}: must be an int >= 0 (0 = no intervals)"
    )
  if config.unlearn.kind == "client":
    raise validation.ConfigError(
      "unlearn.kind='client': the audit scores forgotten samples under "
      "each model; use samples, client_class or class"
    )
  t0 = time.perf_counter()
  unlearned = _side(config, workdir, method.name, UNLEARNED, num_models, bank)
  t_ref = time.perf_counter()
  reference = _side(config, workdir, "retrain", REFERENCE, num_models, bank)
  t_ref = time.perf_counter() - t_ref
  boot = dict(seed=bootstrap_seed(config.seed), bootstrap=bootstrap)
  result = summarize(unlearned, reference, **boot)
  if all(s.get("original") for s in unlearned):
    orig = summarize([s["original"] for s in unlearned], reference, **boot)
    result["original"] = {
      k: orig[k]
      for k in (
        "forget_score",
        "f_ci",
        "final_score",
        "ulira_auc",
        "ulira_auc_ci",
        *audit_lib.TPR_FPRS.values(),
      )
    }
  result.update(
    method=method.name,
    num_models=num_models,
    request={
      "kind": config.unlearn.kind,
      "client": int(config.unlearn.forget_client),
      "fraction": float(config.unlearn.get("forget_fraction", 0.0)),
    },
    data_seed=task_lib.data_seed(config),
    seeds_unlearned=[s["seed"] for s in unlearned],
    seeds_retrained=[s["seed"] for s in reference],
    cost={
      "train_seconds": float(sum(s["train_seconds"] for s in unlearned)),
      "unlearn_seconds": float(sum(s["unlearn_seconds"] for s in unlearned)),
      "retrain_seconds": float(sum(s["unlearn_seconds"] for s in reference)),
      "reference_wall_seconds": t_ref,
      "audit_wall_seconds": time.perf_counter() - t0,
      "bank": bank,
    },
  )
  out_dir = os.path.join(workdir, "audit", method.name)
  os.makedirs(out_dir, exist_ok=True)
  checkpoint.write_json_atomic(os.path.join(out_dir, "audit.json"), result)
  plot_epsilons(result, os.path.join(out_dir, "epsilons.png"))
  print(
    f"[audit {method.name}] K={num_models} n={result['num_examples']}: "
    f"F={with_ci(result['forget_score'], result['f_ci'])} "
    f"final={result['final_score']:.3f} "
    f"U-LiRA AUC={with_ci(result['ulira_auc'], result['ulira_auc_ci'])} "
    + " ".join(
      f"TPR@{100 * fpr:g}%FPR={'—' if result[k] is None else f'{result[k]:.3f}'}"
      for fpr, k in audit_lib.TPR_FPRS.items()
    )
    + (
      f" | original F={with_ci(result['original']['forget_score'], result['original']['f_ci'])}"
      f" U-LiRA AUC={with_ci(result['original']['ulira_auc'], result['original']['ulira_auc_ci'])}"
      if "original" in result
      else ""
    ),
    flush=True,
  )
  return result


def with_ci(value, ci) -> str:
  """'0.723 [0.68, 0.77]' (the value alone without an interval; '—' for None)."""
  if value is None:
    return "—"
  return f"{value:.3f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def plot_epsilons(result: dict, path: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  eps = np.asarray(result["epsilons"])
  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.hist(np.minimum(eps, 6.25), bins=np.arange(0, 6.75, 0.25), color="tab:blue")
  ax.set_xlabel("per-example epsilon (>= 6 shown at 6; cap 50 = degenerate/separated)")
  ax.set_ylabel("forgotten samples")
  ax.set_title(
    f"{result['method']}: F = {result['forget_score']:.3f}, U-LiRA AUC = "
    f"{result['ulira_auc']:.3f} (K = {result['num_models']})"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/configs/audit_digits.py")
  try:
    audit(FLAGS.config, FLAGS.workdir, FLAGS.method, FLAGS.models, FLAGS.bank, FLAGS.bootstrap)
  except (ValueError, OSError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app, flags, logging
  from ml_collections import config_flags

  from fu_jax import xla_flags

  xla_flags.use_defaults()
  FLAGS = flags.FLAGS
  flags.DEFINE_string("method", None, "Unlearning method to audit.", required=True)
  flags.DEFINE_string("workdir", None, "Directory for the bank and audit outputs.", required=True)
  flags.DEFINE_integer("models", 16, "K: models per side (unlearned and retrained).")
  flags.DEFINE_string(
    "bank",
    "auto",
    "How the K models of a side run: vmap (one vmapped "
    "program per FedAvg phase), sequential (one run after another), auto "
    "(vmap where the client runner vmaps).",
  )
  flags.DEFINE_integer(
    "bootstrap",
    1000,
    "Bootstrap replicates of the 95% intervals of U-LiRA's AUC and F (0 = none).",
  )
  config_flags.DEFINE_config_file(
    "config", None, "Config file (a get_config() module).", lock_config=True
  )
  app.run(main)
