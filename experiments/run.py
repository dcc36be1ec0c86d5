"""The experiment loop: data -> FedAvg training (cached) -> unlearning request -> method ->
evaluation -> results.json, with TensorBoard logging and resumable orbax checkpoints.

Layout of a workdir:
  pretrain/<trainer>-<hash>/   the trained model before unlearning, keyed by the training
                               config, shared by every method run into this workdir
  <method>/                    config.json, results.json, TensorBoard events, ckpt/<phase>/

Every random choice derives from config.seed through fl.stream_key, so a killed run
resumed from its checkpoints ends bit-identical to an uninterrupted one (timings aside).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import checkpoint
from fu_jax import data as data_lib
from fu_jax import fl
from fu_jax import logging as log_lib
from fu_jax import losses as losses_lib
from fu_jax import methods as methods_lib
from fu_jax import models
from fu_jax.methods import base
from fu_jax.metrics import accuracy as acc_lib
from fu_jax.metrics import backdoor as bd_lib
from fu_jax.metrics import mia as mia_lib

# results.json fields that measure time: they differ between otherwise identical runs.
TIMING_FIELDS = ("train_seconds", "unlearn_seconds", "compile_seconds", "eval_seconds",
                 "speedup_vs_retrain")
PARTITIONS = ("iid", "dirichlet", "shards")


class ConfigError(ValueError):
  """A configuration value outside what is allowed."""


# ---------------------------------------------------------------------------------------
# Validation.


def _require(ok: bool, msg: str):
  if not ok:
    raise ConfigError(msg)


def validate(config, method_name: str, num_classes: int | None = None):
  """Raises ConfigError naming the bad value and what is allowed."""
  methods_lib.get(method_name)  # unknown method -> ValueError listing the allowed ones
  d, f = config.data, config.fl
  _require(isinstance(d.num_clients, int) and d.num_clients >= 1,
           f"data.num_clients={d.num_clients!r}: must be an int >= 1")
  _require(d.partition in PARTITIONS,
           f"data.partition={d.partition!r}: allowed {PARTITIONS}")
  _require(d.alpha > 0, f"data.alpha={d.alpha!r}: must be > 0")
  _require(isinstance(f.rounds, int) and f.rounds >= 1, f"fl.rounds={f.rounds!r}: must be >= 1")
  _require(f.local_epochs >= 1, f"fl.local_epochs={f.local_epochs!r}: must be >= 1")
  _require(f.batch_size >= 1, f"fl.batch_size={f.batch_size!r}: must be >= 1")
  _require(f.client_lr > 0, f"fl.client_lr={f.client_lr!r}: must be > 0")
  _require(f.runner in fl.RUNNERS, f"fl.runner={f.runner!r}: allowed {fl.RUNNERS}")
  _require(config.model.name in models.MODEL_NAMES,
           f"model.name={config.model.name!r}: allowed {models.MODEL_NAMES}")
  fl.num_sampled_clients(f.clients_per_round, d.num_clients)
  u = config.unlearn
  _require(u.kind in base.REQUEST_KINDS, f"unlearn.kind={u.kind!r}: allowed {base.REQUEST_KINDS}")
  if u.kind in ("client", "client_class"):
    _require(0 <= u.forget_client < d.num_clients,
             f"unlearn.forget_client={u.forget_client}: allowed 0..{d.num_clients - 1}")
  if u.kind == "samples":
    _validate_samples(config)
  if num_classes is not None and u.kind not in ("client", "samples"):
    for c in request_classes(config):
      _require(0 <= c < num_classes,
               f"unlearn.forget_class={c}: allowed 0..{num_classes - 1}")
  method = methods_lib.get(method_name)
  why = f" ({method.why})" if method.why else ""
  _require(u.kind in method.kinds,
           f"method {method_name!r} cannot serve unlearn.kind={u.kind!r}{why}; it serves "
           f"{method.kinds}")


def _validate_samples(config):
  u, n = config.unlearn, config.data.num_clients
  path = u.get("forget_indices", "") or ""
  frac = u.get("forget_fraction", 0.0)
  if path:
    _require(not frac, f"unlearn.forget_fraction={frac!r} and unlearn.forget_indices="
             f"{path!r}: set one of them, not both")
    _require(os.path.isfile(path), f"unlearn.forget_indices={path!r}: no such file (expected "
             "a .npy file of training-set positions)")
    return
  _require(isinstance(frac, (int, float)) and 0 < frac <= 1,
           f"unlearn.forget_fraction={frac!r}: must be in (0, 1] (or give "
           "unlearn.forget_indices=<file.npy>) for unlearn.kind='samples'")
  _require(u.forget_client == -1 or 0 <= u.forget_client < n,
           f"unlearn.forget_client={u.forget_client}: allowed -1 (every client) or "
           f"0..{n - 1}")


def request_classes(config) -> tuple:
  extra = tuple(int(c) for c in config.unlearn.get("also_classes", ()) or ())
  return (int(config.unlearn.forget_class),) + extra


def methods_for(name: str, kind: str) -> list[str]:
  """[name], or for 'all' every registered method serving `kind`, retrain first."""
  if name != "all":
    methods_lib.get(name)
    return [name]
  names = ["retrain"] + sorted(n for n, m in methods_lib.REGISTRY.items()
                               if n != "retrain" and kind in m.kinds)
  skipped = sorted(n for n, m in methods_lib.REGISTRY.items() if kind not in m.kinds)
  if skipped:
    print(f"--method=all: {skipped} cannot serve unlearn.kind={kind!r}; skipped", flush=True)
  return names


# ---------------------------------------------------------------------------------------
# Task construction.


def data_seed(config) -> int:
  """The seed of the train/test split, the partition and a samples request's selection:
  config.data.seed, or config.seed when it is -1 (an audit's model bank varies config.seed
  with the data fixed)."""
  s = int(config.data.get("seed", -1))
  return int(config.seed) if s == -1 else s


def forget_samples(config, owner: np.ndarray) -> np.ndarray:
  """bool [n_train]: the training rows a kind='samples' request forgets.

  From unlearn.forget_indices (a .npy of training-set positions; duplicates collapse), or
  for each selected client k (unlearn.forget_client, -1 = every client) the first
  max(1, floor(forget_fraction * n_k + 1/2)) of a random permutation of its rows, drawn
  with stream_key(data_seed, STREAM_FORGET, k): the same samples for every method and
  for every training seed of an audit's bank.
  """
  u, n = config.unlearn, owner.size
  rows = np.zeros(n, bool)
  path = u.get("forget_indices", "") or ""
  if path:
    try:
      idx = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ConfigError(f"unlearn.forget_indices={path!r}: cannot read it as a .npy array "
                        f"({e})") from None
    _require(idx.ndim == 1 and (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)),
             f"unlearn.forget_indices={path!r}: expected a 1-D integer array, got "
             f"{idx.dtype} {idx.shape}")
    _require(idx.size > 0, f"unlearn.forget_indices={path!r} is empty: no sample to forget")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
      raise ConfigError(f"unlearn.forget_indices={path!r}: position {int(bad[0])} out of "
                        f"range; allowed 0..{n - 1} (training-set positions)")
    rows[idx] = True
    return rows
  clients = range(int(owner.max()) + 1) if u.forget_client == -1 else [int(u.forget_client)]
  for k in clients:
    own = np.flatnonzero(owner == k)
    if own.size == 0:
      continue
    count = max(1, math.floor(float(u.forget_fraction) * own.size + 0.5))
    perm = np.asarray(jax.random.permutation(
        fl.stream_key(data_seed(config), fl.STREAM_FORGET, k), own.size))
    rows[own[perm[:count]]] = True
  return rows


def build_task(config) -> base.Task:
  ds = data_lib.load_dataset(config.data.source, seed=data_seed(config),
                             data_dir=config.data.data_dir or None,
                             max_train=config.data.get("train_size", 0) or None,
                             max_test=config.data.get("test_size", 0) or None)
  validate(config, config.method, ds.num_classes)
  parts = data_lib.partition(ds.y_train, config.data.num_clients, kind=config.data.partition,
                             seed=data_seed(config), alpha=config.data.alpha,
                             classes_per_client=config.data.classes_per_client,
                             min_size=config.data.min_size)
  u = config.unlearn
  classes = () if u.kind in ("client", "samples") else request_classes(config)
  client = u.forget_client if u.kind != "class" else -1
  if u.kind == "samples" and (u.get("forget_indices", "") or ""):
    client = -1
  owner = np.full(len(ds.y_train), -1)
  for k, p in enumerate(parts):
    owner[p] = k
  forget_rows = np.zeros(len(ds.y_train), bool)
  if u.kind == "class":
    forget_rows = np.isin(ds.y_train, classes)
  elif u.kind == "client_class":
    forget_rows = np.isin(ds.y_train, classes) & (owner == client)
  elif u.kind == "samples":
    forget_rows = forget_samples(config, owner)
  else:
    forget_rows = owner == client
  _require(forget_rows.any(), f"the unlearning request {u.kind} (classes={classes}, "
           f"client={client}) selects no training sample; pick a class/client that holds data")
  x_train, y_train = ds.x_train, ds.y_train
  if config.backdoor.enabled:
    trigger = _trigger(config, ds)
    x_train, y_train = bd_lib.plant_backdoor(x_train, y_train, forget_rows, trigger,
                                             _flip(config), num_classes=ds.num_classes)
  clients = data_lib.stack_clients(x_train, y_train, parts)
  idx = np.where(clients.index >= 0, clients.index, 0)
  forget = forget_rows[idx] & clients.valid
  y_true = np.where(clients.valid, ds.y_train[idx], 0).astype(np.int32)
  weights = np.ones(config.data.num_clients, np.float32)
  if u.kind == "client":
    weights[client] = 0.0
  hist = data_lib.label_histogram(parts, ds.y_train, ds.num_classes)
  print(f"data {ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test, "
        f"{ds.num_classes} classes, {config.data.num_clients} clients, "
        f"sizes {[len(p) for p in parts][:20]}", flush=True)
  del hist
  model = models.create(config.model.name, ds.num_classes, **_model_overrides(config))
  dev = lambda a: jnp.asarray(a)
  clients = type(clients)(*[dev(a) for a in clients])
  return base.Task(config=config, dataset=ds, clients=clients, y_true=dev(y_true),
                   forget=dev(forget), retain_valid=dev(np.asarray(clients.valid) & ~forget),
                   client_weights=weights, request=base.Request(u.kind, classes, client),
                   model=model, input_shape=tuple(ds.x_train.shape[1:]),
                   num_classes=ds.num_classes)


def _model_overrides(config) -> dict:
  return {k: v for k, v in config.model.items() if k != "name"}


def _trigger(config, ds):
  return bd_lib.trigger_for(ds.x_train, size=config.backdoor.size)


def _flip(config):
  return bd_lib.Flip("shift", int(config.backdoor.shift))


# ---------------------------------------------------------------------------------------
# Timing: compilation is measured apart from the compiled run time.


class _CompileClock:
  """Sums XLA compilation time reported through jax.monitoring while active."""
  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event in self.EVENTS:
      self.seconds += duration

  @contextlib.contextmanager
  def measure(self):
    """Yields a dict filled with wall and compile seconds of the block (nestable)."""
    out = {}
    before = self.seconds
    t0 = time.perf_counter()
    try:
      yield out
    finally:
      out["wall"] = time.perf_counter() - t0
      out["compile"] = self.seconds - before


_CLOCK = None


def _clock() -> _CompileClock:
  global _CLOCK  # one listener per process: jax.monitoring has no way to scope it
  if _CLOCK is None:
    _CLOCK = _CompileClock()
  return _CLOCK


# ---------------------------------------------------------------------------------------
# The environment methods run in.


def _to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _hash(d: dict) -> str:
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def training_config(config, trainer: str) -> dict:
  """The part of the config that determines the trained model before unlearning."""
  d = _to_dict(config)
  key = {"seed": d["seed"], "data": d["data"], "fl": {k: v for k, v in d["fl"].items()
                                                      if k not in ("runner", "chunk_size")},
         "model": d["model"], "trainer": trainer, "backdoor": d["backdoor"]}
  if d["backdoor"]["enabled"]:  # the trigger sits in the data to be forgotten
    key["unlearn"] = d["unlearn"]
  if trainer in d:
    # Only the section's training keys when the trainer declares them: unlearning-only keys
    # (e.g. quickdrop.unlearn_lr) must not invalidate the cached model.
    keep = getattr(methods_lib, "TRAIN_KEYS", {}).get(trainer)
    key[trainer] = {k: v for k, v in d[trainer].items() if keep is None or k in keep}
  return key


class RunEnv:
  """Implements base.Env for one method directory (or the shared pretraining directory)."""

  def __init__(self, task: base.Task, directory: str, config_dict: dict):
    self.task, self.dir, self.config_dict = task, directory, config_dict
    cfg = task.config
    self.logger = log_lib.RunLogger(directory)
    self.cost = {"bytes_up": 0, "bytes_down": 0, "examples": 0, "rounds": 0}
    self.seconds = {"wall": 0.0, "compile": 0.0, "eval": 0.0}
    self.process = {"wall": 0.0, "compile": 0.0, "eval": 0.0}  # this process only
    self.step = 0  # TensorBoard step across this directory's phases
    self._eval_fn = lambda p: evaluate(task, p)
    kind = cfg.fl.runner
    self.runner_kind = fl.choose_runner(cfg.model.name) if kind == "auto" else kind

  def runner(self, program, epochs, batch_size):
    return fl.ClientRunner(program, kind=self.runner_kind, epochs=epochs,
                           batch_size=batch_size, chunk_size=self.task.config.fl.chunk_size)

  def evaluate(self, params):
    return self._eval_fn(params)

  def artifact_dir(self, name: str) -> str:
    """<this directory>/<name>, created: where a trainer or method writes its files."""
    path = os.path.join(self.dir, name)
    os.makedirs(path, exist_ok=True)
    return path

  def add_cost(self, **amounts):
    for k, v in amounts.items():
      self.cost[k] = self.cost.get(k, 0) + v

  def rounds(self, phase, init_state, num_rounds, round_fn, params_fn):
    cfg = self.task.config
    ckpt = checkpoint.Checkpointer(os.path.join(self.dir, "ckpt", phase), self.config_dict,
                                   every=cfg.checkpoint_every)
    state, start, meta = ckpt.restore_or(init_state, meta_template=self._meta())
    if meta is not None:
      self.cost, self.seconds, self.step = meta["cost"], meta["seconds"], meta["step"]
    if start:
      print(f"[{phase}] resumed after round {start}/{num_rounds}", flush=True)
    started = time.perf_counter()
    for r in range(start, num_rounds):
      with _clock().measure() as t:
        state, metrics = round_fn(state, r)
        jax.block_until_ready(state)
      params = params_fn(state)
      fl.check_finite(params, f"{phase} round {r + 1}")
      if "loss" in metrics and not math.isfinite(metrics["loss"]):
        raise fl.DivergenceError(f"{phase} round {r + 1}: train loss is {metrics['loss']}; "
                                 "lower the learning rate. No results were written.")
      for k in list(self.cost):
        self.cost[k] += metrics.pop(k, 0)
      self.cost["rounds"] += 1
      for k in ("wall", "compile"):
        self.seconds[k] += t[k]
        self.process[k] += t[k]
      self.step += 1
      scalars = {"train": metrics, "time": {"round_s": t["wall"] - t["compile"]}}
      if (r + 1) % cfg.eval_every == 0 or r + 1 == num_rounds:
        t0 = time.perf_counter()
        ev = self.evaluate(params)
        self.seconds["eval"] += time.perf_counter() - t0
        self.process["eval"] += time.perf_counter() - t0
        scalars["eval"] = ev
        self.logger.progress(phase, r + 1, num_rounds,
                             {"loss": metrics.get("loss", float("nan")),
                              "test_acc": ev["test_acc"], "forget_acc": ev["forget_acc"]},
                             started)
      self.logger.scalars(self.step, scalars)
      ckpt.maybe_save(r + 1, state, meta=self._meta(), force=r + 1 == num_rounds)
    ckpt.close()
    return state

  def _meta(self):
    return {"cost": self.cost, "seconds": self.seconds, "step": self.step}


# ---------------------------------------------------------------------------------------
# Evaluation.


def evaluate(task: base.Task, params) -> dict:
  ds = task.dataset
  cfg = task.config
  out = acc_lib.evaluate(task.apply_fn, params, ds.x_test, ds.y_test, task.num_classes,
                         task.request.classes)
  forget = np.asarray(task.forget)
  x_f = np.asarray(task.clients.x)[forget]
  y_f = np.asarray(task.y_true)[forget]
  logits = acc_lib.predict_logits(task.apply_fn, params, x_f)
  out["forget_train_acc"] = acc_lib.accuracy(logits, y_f)
  if cfg.backdoor.enabled:
    src = task.request.classes[0] if task.request.classes else None
    out["bd_acc"] = bd_lib.backdoor_accuracy(task.apply_fn, params, ds.x_test, ds.y_test, src,
                                             _trigger(cfg, ds), _flip(cfg),
                                             num_classes=task.num_classes)
  return out


def sample_metrics(task: base.Task, params) -> dict:
  """Accuracy and mean loss on the forgotten training samples (their original labels) and
  on held-out samples of the same classes (every test row of a class among theirs): after
  a perfect sample-wise unlearning the two sides look alike, as under retraining."""
  ds = task.dataset
  forget = np.asarray(task.forget)
  x_f = np.asarray(task.clients.x)[forget]
  y_f = np.asarray(task.y_true)[forget]
  held = np.isin(ds.y_test, np.unique(y_f))
  lf = acc_lib.predict_logits(task.apply_fn, params, x_f)
  lh = acc_lib.predict_logits(task.apply_fn, params, ds.x_test[held])
  return {"forget_train_loss": float(np.mean(acc_lib.loss_from_logits(lf, y_f))),
          "heldout_acc": acc_lib.accuracy(lh, ds.y_test[held]),
          "heldout_loss": float(np.mean(acc_lib.loss_from_logits(lh, ds.y_test[held])))}


def membership_scores(task: base.Task, params) -> dict:
  """MIA on the forgotten training samples (members) vs held-out samples of the same classes.

  The test set is split in two by position: odd rows of the forgotten samples' classes are
  the non-members; even rows form the shadow models' pool, so no attacker trains on the
  non-members it is scored against.
  """
  ds, cfg = task.dataset, task.config
  forget = np.asarray(task.forget)
  x_m = np.asarray(task.clients.x)[forget]
  y_m = np.asarray(task.y_true)[forget]
  odd = np.arange(len(ds.y_test)) % 2 == 1
  held = odd & np.isin(ds.y_test, np.unique(y_m))
  out = mia_lib.membership_inference(task.apply_fn, params, x_m, y_m, ds.x_test[held],
                                     ds.y_test[held], seed=cfg.seed)
  if cfg.mia.shadows > 0:
    pool = np.flatnonzero(~odd)[:cfg.mia.shadow_pool]
    out.update(mia_lib.shadow_attack(
        _shadow_train_fn(task), task.apply_fn, params, ds.x_test[pool], ds.y_test[pool],
        x_m, y_m, ds.x_test[held], ds.y_test[held], num_shadows=cfg.mia.shadows,
        key=fl.stream_key(cfg.seed, fl.STREAM_EVAL), vectorize=_vectorize_shadows(cfg)))
  return out


def original_membership_scores(task: base.Task, params, pretrain_dir: str) -> dict:
  """membership_scores of the trained model, cached next to it: every method run on the
  same request scores the same model against the same samples (shadow models included)."""
  d = _to_dict(task.config)
  key = {"seed": d["seed"], "unlearn": d["unlearn"], "mia": d["mia"]}
  path = os.path.join(pretrain_dir, f"mia-{_hash(key)}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  scores = membership_scores(task, params)
  checkpoint.write_json_atomic(path, _nan_to_none(scores))
  return scores


def _vectorize_shadows(cfg) -> bool:
  # Same trade-off as the client runners: vmapped conv training is slow on XLA:CPU.
  return fl.choose_runner(cfg.model.name) == "vmap"


def _shadow_train_fn(task: base.Task):
  """The target's recipe, centralised: mia.shadow_epochs epochs of the client optimiser
  over the rows where mask is True (a pure function, vmappable over shadows)."""
  cfg = task.config
  opt = base.client_optimizer(cfg)
  bs = cfg.fl.batch_size
  # XLA's own conv backward inside lax.scan is ~20x slower on XLA:CPU (fu_jax/models.py),
  # which made the shadow fits dominate a run.
  model = models.with_conv_impl(task.model, "canonical")

  def loss_fn(p, batch):
    return losses_lib.masked_ce(model.apply({"params": p}, batch.x), batch.y, batch.mask)

  def train_fn(key, x, y, mask):
    params = models.init_params(task.model, key, task.input_shape)
    n_steps = fl.steps_per_epoch(x.shape[0] // 2, bs)  # shadows train on half the pool

    def epoch(state, e):
      order = fl.epoch_order(jax.random.fold_in(key, e), mask)

      def step(state, s):
        p, o = state
        g = jax.grad(loss_fn)(p, fl.take_batch((x, y), mask, order, s, bs))
        u, o = opt.update(g, o, p)
        return (optax.apply_updates(p, u), o), None

      return jax.lax.scan(step, state, jnp.arange(n_steps))[0], None

    state = (params, opt.init(params))
    return jax.lax.scan(epoch, state, jnp.arange(cfg.mia.shadow_epochs))[0][0]

  return train_fn if _vectorize_shadows(cfg) else jax.jit(train_fn)


# ---------------------------------------------------------------------------------------
# Training before unlearning (cached per workdir).


def pretrained(task: base.Task, workdir: str, trainer: str):
  """The model trained before unlearning, from the workdir's cache or trained now."""
  key = training_config(task.config, trainer)
  directory = os.path.join(workdir, "pretrain", f"{trainer}-{_hash(key)}")
  os.makedirs(directory, exist_ok=True)
  env = RunEnv(task, directory, key)
  trained = methods_lib.TRAINERS[trainer](task, env)
  env.logger.close()
  return trained, env


# ---------------------------------------------------------------------------------------
# One run.


def run(config, workdir: str) -> dict:
  """Train (or load the cached model), unlearn with config.method, evaluate, write results."""
  method = methods_lib.get(config.method)
  validate(config, config.method)
  task = build_task(config)
  out_dir = os.path.join(workdir, method.name)
  os.makedirs(out_dir, exist_ok=True)
  cfg_dict = _to_dict(config)
  cfg_path = os.path.join(out_dir, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      diff = checkpoint.config_diff(json.load(f), cfg_dict)
    if diff:
      raise checkpoint.ConfigMismatchError(
          f"{out_dir} was run with a different config (keys differ: {', '.join(diff)}); "
          "use another --workdir or the original config.")
  checkpoint.write_json_atomic(cfg_path, cfg_dict)
  results_path = os.path.join(out_dir, "results.json")
  if os.path.exists(results_path):
    os.remove(results_path)  # a rerun rewrites it; never leave a stale one next to new logs

  trained, train_env = pretrained(task, workdir, method.pretrain)
  t0 = time.perf_counter()
  original = evaluate(task, trained.params)
  eval_seconds = time.perf_counter() - t0

  env = RunEnv(task, out_dir, cfg_dict)
  with _clock().measure() as t:
    outcome = method.unlearn(task, env, trained)
    jax.block_until_ready(outcome.params)
  fl.check_finite(outcome.params, f"method {method.name}")
  # Rounds' times (restored across resumes) plus what the method spent outside rounds in
  # this process; evaluation and compilation are reported apart.
  p = env.process
  outside_wall = max(0.0, t["wall"] - p["wall"] - p["eval"])
  outside_compile = max(0.0, t["compile"] - p["compile"])
  unlearn_seconds = (env.seconds["wall"] - env.seconds["compile"]) + outside_wall - outside_compile
  final = evaluate(task, outcome.params)
  if task.request.kind == "samples":
    final.update(sample_metrics(task, outcome.params))
    original.update(sample_metrics(task, trained.params))
  if config.mia.enabled:
    final.update(membership_scores(task, outcome.params))
    original.update(original_membership_scores(task, trained.params, train_env.dir))
  results = {
      "method": method.name,
      "seed": config.seed,
      "request": {"kind": task.request.kind, "classes": list(task.request.classes),
                  "client": task.request.client},
      **final,
      **({"bd_acc_before": original["bd_acc"]} if "bd_acc" in original else {}),
      "original": original,
      "train_seconds": train_env.seconds["wall"] - train_env.seconds["compile"],
      "unlearn_seconds": unlearn_seconds,
      "compile_seconds": env.seconds["compile"] + outside_compile,
      "eval_seconds": eval_seconds + env.seconds["eval"],
      "rounds": env.cost["rounds"],
      "bytes_up": env.cost["bytes_up"],
      "bytes_down": env.cost["bytes_down"],
      "examples": env.cost["examples"],
      "runner": env.runner_kind,
      **outcome.results,
  }
  _check_results_finite(results)
  results = _nan_to_none(results)
  env.logger.scalars(env.step + 1, {"final": {k: v for k, v in final.items()}})
  env.logger.hparams(_to_dict(config), {k: v for k, v in results.items()
                                         if isinstance(v, (int, float))})
  env.logger.close()
  checkpoint.write_json_atomic(results_path, results)
  print(f"[{method.name}] " + " ".join(
      f"{k}={results[k]:.4f}" for k in ("test_acc", "retain_acc", "forget_acc",
                                         "unlearn_seconds") if isinstance(results.get(k), float)),
        flush=True)
  print(f"results: {results_path}", flush=True)
  return results


def _nan_to_none(obj):
  """Strict JSON has no NaN: metrics without rows (e.g. forget_acc of a client request)
  are written as null."""
  if isinstance(obj, dict):
    return {k: _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_nan_to_none(v) for v in obj]
  if isinstance(obj, float) and math.isnan(obj):
    return None
  return obj


def _check_results_finite(results: dict):
  for k in ("test_acc", "retain_acc"):
    v = results.get(k)
    if v is None or not math.isfinite(v):
      raise fl.DivergenceError(f"{k}={v}: the run produced a non-finite result; nothing "
                               "was written")
