"""The experiment loop: data -> FedAvg training (cached) -> unlearning request -> method ->
evaluation -> results.json, with TensorBoard logging and resumable orbax checkpoints.

Layout of a workdir:
  pretrain/<trainer>-<hash>/   the trained model before unlearning, keyed by the training
                               config, shared by every method run into this workdir, with
                               its evaluation and membership scores per request
                               (eval-<hash>.json, mia-<hash>.json) and timing.json (its train_seconds)
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
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import compare
from fu_jax import checkpoint, fl, models, multihost
from fu_jax import data as data_lib
from fu_jax import images as images_lib
from fu_jax import logging as log_lib
from fu_jax import losses as losses_lib
from fu_jax import methods as methods_lib
from fu_jax.methods import base
from fu_jax.metrics import accuracy as acc_lib
from fu_jax.metrics import backdoor as bd_lib
from fu_jax.metrics import mia as mia_lib
from fu_jax.metrics import relearn as relearn_lib

# results.json fields that measure time: they differ between otherwise identical runs.
TIMING_FIELDS = (
  "train_seconds",
  "unlearn_seconds",
  "unlearn_parallel_seconds",
  "compile_seconds",
  "eval_seconds",
  "speedup_vs_retrain",
  "speedup_parallel_vs_retrain",
  "train_overhead_vs_fedavg",
  "selection_seconds",  # channel methods' channel selection
)
PARTITIONS = data_lib.PARTITIONS

# Which results.json metric measures forgetting and which utility, per request kind (the
# README's metric table). Every kind also reports bd_acc when a backdoor is planted and
# the membership-inference scores (mia_*) as further forgetting measures.
#   class         forget_acc: test accuracy of the forgotten classes (retrain ~0);
#                 retain_acc: test accuracy of the other classes.
#   client_class  forget_train_acc: accuracy on the forgotten training samples (the
#                 class's other holders keep it, so its test accuracy must stay high:
#                 class_acc, a utility); retain_acc: test accuracy of every class.
#   client        forget_train_acc; retain_acc: test accuracy of every class.
#   samples       (individual training samples) as client.
METRICS_BY_KIND = {
  "class": ("forget_acc", "retain_acc"),
  "client_class": ("forget_train_acc", "retain_acc"),
  "client": ("forget_train_acc", "retain_acc"),
  "samples": ("forget_train_acc", "retain_acc"),
}

# Set by experiments.main's SIGINT handler. Python prints and drops an exception raised
# inside a garbage-collection callback (JAX runs some), so a KeyboardInterrupt that lands
# there would be lost; every round checks this before it starts.
INTERRUPTED = threading.Event()


ConfigError = base.ConfigError


# ---------------------------------------------------------------------------------------
# Validation.


_require = base.require


def validate(
  config, method_name: str, num_classes: int | None = None, num_train: int | None = None
):
  """Raises ConfigError naming the bad value and what is allowed: the runner's sections
  here, the method's own section by its Method.validate.

  num_classes, num_train: known after loading the data; checks needing them are skipped
  when None.
  """
  method = methods_lib.get(method_name)  # unknown method -> ValueError listing the allowed
  d, f = config.data, config.fl
  _require(
    isinstance(d.num_clients, int) and d.num_clients >= 1,
    f"data.num_clients={d.num_clients!r}: must be an int >= 1",
  )
  size = d.get("train_size", 0)
  _require(
    isinstance(size, int) and not isinstance(size, bool) and size >= 0,
    f"data.train_size={size!r}: must be 0 (all) or an int in 1..number of training examples",
  )
  if num_train is not None:
    _require(
      size <= num_train,
      f"data.train_size={size}: allowed 0 (all) or 1..{num_train} (the training set)",
    )
  _require(d.partition in PARTITIONS, f"data.partition={d.partition!r}: allowed {PARTITIONS}")
  _require(d.alpha > 0, f"data.alpha={d.alpha!r}: must be > 0")
  sigma = d.get("size_sigma", 0.0)
  _require(
    isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0,
    f"data.size_sigma={sigma!r}: must be a finite number >= 0 (0 = equal sizes)",
  )
  _require(isinstance(f.rounds, int) and f.rounds >= 1, f"fl.rounds={f.rounds!r}: must be >= 1")
  _require(f.local_epochs >= 1, f"fl.local_epochs={f.local_epochs!r}: must be >= 1")
  _require(f.batch_size >= 1, f"fl.batch_size={f.batch_size!r}: must be >= 1")
  _require(f.client_lr > 0, f"fl.client_lr={f.client_lr!r}: must be > 0")
  _require(f.runner in fl.RUNNERS, f"fl.runner={f.runner!r}: allowed {fl.RUNNERS}")
  _require(
    multihost.process_count() == 1 or f.runner in ("auto", "shard"),
    f"fl.runner={f.runner!r} would run every client in each of the "
    f"{multihost.process_count()} processes; with several processes allowed: "
    "'shard' or 'auto' (which picks it)",
  )
  _require(
    config.model.name in models.MODEL_NAMES,
    f"model.name={config.model.name!r}: allowed {models.MODEL_NAMES}",
  )
  fl.num_sampled_clients(f.clients_per_round, d.num_clients)
  u = config.unlearn
  _require(u.kind in base.REQUEST_KINDS, f"unlearn.kind={u.kind!r}: allowed {base.REQUEST_KINDS}")
  if u.kind in ("client", "client_class"):
    _require(
      0 <= u.forget_client < d.num_clients,
      f"unlearn.forget_client={u.forget_client}: allowed 0..{d.num_clients - 1}",
    )
  if u.kind == "samples":
    _validate_samples(config)
  cal = u.get("calibration_size", 0)
  _require(
    isinstance(cal, int) and not isinstance(cal, bool) and cal >= 0,
    f"unlearn.calibration_size={cal!r}: must be an int >= 0 (0 = no calibration split)",
  )
  if num_train is not None and cal:
    room = num_train - size if size else num_train - 1
    _require(
      cal <= room,
      f"unlearn.calibration_size={cal}: allowed 0..{room} (the training images "
      + ("outside the data.train_size subsample)" if size else "less one)"),
    )
  if num_classes is not None and u.kind not in ("client", "samples"):
    for c in request_classes(config):
      _require(0 <= c < num_classes, f"unlearn.forget_class={c}: allowed 0..{num_classes - 1}")
  r = config.eval.relearn_steps
  _require(
    isinstance(r, int) and r >= 0, f"eval.relearn_steps={r!r}: must be an int >= 0 (0 = off)"
  )
  _require(  # why: fu_jax/metrics/relearn.py's docstring
    r == 0 or u.kind != "samples",
    f"eval.relearn_steps={r} with unlearn.kind=samples: relearn time is undefined for a "
    "samples request (retrained models still classify the forgotten samples); set "
    "eval.relearn_steps=0 and audit it with experiments.audit",
  )
  m = config.eval.relearn_retained
  _require(
    isinstance(m, (int, float)) and m >= 0,
    f"eval.relearn_retained={m!r}: must be a number >= 0 (0 = forgotten samples only)",
  )
  if method.validate is not None:
    method.validate(config)
  why = f" ({method.why})" if method.why else ""
  _require(
    u.kind in method.kinds,
    f"method {method_name!r} cannot serve unlearn.kind={u.kind!r}{why}; it serves {method.kinds}",
  )


def _validate_samples(config):
  u, n = config.unlearn, config.data.num_clients
  path = u.get("forget_indices", "") or ""
  frac = u.get("forget_fraction", 0.0)
  if path:
    _require(
      not frac,
      f"unlearn.forget_fraction={frac!r} and unlearn.forget_indices="
      f"{path!r}: set one of them, not both",
    )
    _require(
      os.path.isfile(path),
      f"unlearn.forget_indices={path!r}: no such file (expected "
      "a .npy file of training-set positions)",
    )
    return
  _require(
    isinstance(frac, (int, float)) and 0 < frac <= 1,
    f"unlearn.forget_fraction={frac!r}: must be in (0, 1] (or give "
    "unlearn.forget_indices=<file.npy>) for unlearn.kind='samples'",
  )
  _require(
    u.forget_client == -1 or 0 <= u.forget_client < n,
    f"unlearn.forget_client={u.forget_client}: allowed -1 (every client) or 0..{n - 1}",
  )


def request_classes(config) -> tuple:
  extra = tuple(int(c) for c in config.unlearn.get("also_classes", ()) or ())
  return (int(config.unlearn.forget_class),) + extra


def methods_for(name: str, kind: str) -> list[str]:
  """[name], or for 'all' every registered method serving `kind`, retrain first."""
  if name != "all":
    methods_lib.get(name)
    return [name]
  names = ["retrain"] + sorted(
    n for n, m in methods_lib.REGISTRY.items() if n != "retrain" and kind in m.kinds
  )
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


def load_forget_indices(path: str) -> np.ndarray:
  """The 1-D integer array of training-set positions in the .npy file `path` (ConfigError
  naming the file when it cannot be read, is not 1-D integer, or is empty)."""
  try:
    idx = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(
      f"unlearn.forget_indices={path!r}: cannot read it as a .npy array ({e})"
    ) from None
  _require(
    idx.ndim == 1 and (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)),
    f"unlearn.forget_indices={path!r}: expected a 1-D integer array, got {idx.dtype} {idx.shape}",
  )
  _require(idx.size > 0, f"unlearn.forget_indices={path!r} is empty: no sample to forget")
  return idx


def forget_indices_digest(path: str) -> str:
  """sha256 (16 hex digits) of the sorted unique positions in unlearn.forget_indices: the
  request's identity in every cache key and config.json, so a file rewritten in place with
  other positions never reuses results computed for the old ones (and duplicates or order,
  which forget_samples ignores, do not count)."""
  idx = np.unique(load_forget_indices(path)).astype("<i8")
  return hashlib.sha256(idx.tobytes()).hexdigest()[:16]


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
    idx = load_forget_indices(path)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
      raise ConfigError(
        f"unlearn.forget_indices={path!r}: position {int(bad[0])} out of "
        f"range; allowed 0..{n - 1} (training-set positions)"
      )
    rows[idx] = True
    return rows
  clients = range(int(owner.max()) + 1) if u.forget_client == -1 else [int(u.forget_client)]
  for k in clients:
    own = np.flatnonzero(owner == k)
    if own.size == 0:
      continue
    count = max(1, math.floor(float(u.forget_fraction) * own.size + 0.5))
    perm = np.asarray(
      jax.random.permutation(fl.stream_key(data_seed(config), fl.STREAM_FORGET, k), own.size)
    )
    rows[own[perm[:count]]] = True
  return rows


def build_task(config) -> base.Task:
  ds = data_lib.load_dataset(
    config.data.source,
    seed=data_seed(config),
    data_dir=config.data.data_dir or None,
    max_test=config.data.get("test_size", 0) or None,
  )
  validate(config, config.method, ds.num_classes, num_train=len(ds.y_train))
  ds, calibration = data_lib.split_calibration(
    ds,
    config.data.get("train_size", 0),
    config.unlearn.get("calibration_size", 0),
    data_seed(config),
  )
  parts = data_lib.partition(
    ds.y_train,
    config.data.num_clients,
    kind=config.data.partition,
    seed=data_seed(config),
    alpha=config.data.alpha,
    classes_per_client=config.data.classes_per_client,
    min_size=config.data.min_size,
    size_sigma=config.data.get("size_sigma", 0.0),
  )
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
  _require(
    forget_rows.any(),
    f"the unlearning request {u.kind} (classes={classes}, "
    f"client={client}) selects no training sample; pick a class/client that holds data",
  )
  y_train = ds.y_train
  # One copy of the training images on the device; clients are index blocks into it.
  if config.backdoor.enabled:  # the triggered copy, in float32 (triggers are set there)
    trigger = _trigger(config, ds)
    x_train, y_train = bd_lib.plant_backdoor(
      ds.x_train, y_train, forget_rows, trigger, _flip(config), num_classes=ds.num_classes
    )
    table = images_lib.ImageTable(x_train)
  else:
    table = images_lib.dataset_table(ds)
  clients = data_lib.index_clients(y_train, parts)
  idx = np.where(clients.index >= 0, clients.index, 0)
  forget = forget_rows[idx] & clients.valid
  y_true = np.where(clients.valid, ds.y_train[idx], 0).astype(np.int32)
  weights = np.ones(config.data.num_clients, np.float32)
  if u.kind == "client":
    weights[client] = 0.0
  print(
    f"data {ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test, "
    f"{ds.num_classes} classes, {config.data.num_clients} clients, "
    f"sizes {[len(p) for p in parts][:20]}",
    flush=True,
  )
  model = models.create(config.model.name, ds.num_classes, **_model_overrides(config))
  dev = lambda a: jnp.asarray(a)
  index = dev(clients.index)
  clients = type(clients)(
    x=images_lib.ClientImages(index, table),
    y=dev(clients.y),
    valid=dev(clients.valid),
    count=dev(clients.count),
    index=index,
  )
  return base.Task(
    config=config,
    dataset=ds,
    clients=clients,
    y_true=dev(y_true),
    forget=dev(forget),
    retain_valid=dev(np.asarray(clients.valid) & ~forget),
    client_weights=weights,
    request=base.Request(u.kind, classes, client),
    model=model,
    input_shape=tuple(ds.x_train.shape[1:]),
    num_classes=ds.num_classes,
    calibration=None if calibration is None else (dev(calibration[0]), calibration[1]),
  )


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

  EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  )

  def __init__(self):
    self.seconds = 0.0
    # Per event: tracing, lowering to MLIR, and XLA's compilation, which with the
    # persistent cache (fu_jax/compilation_cache.py) becomes loading the executable.
    self.by_event = dict.fromkeys(self.EVENTS, 0.0)
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event in self.EVENTS:
      self.seconds += duration
      self.by_event[event] += duration

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


def compile_clock() -> _CompileClock:
  """The process's compile clock (its `seconds` sum every compilation since created)."""
  return _clock()


def _clock() -> _CompileClock:
  global _CLOCK  # one listener per process: jax.monitoring has no way to scope it
  if _CLOCK is None:
    _CLOCK = _CompileClock()
  return _CLOCK


# ---------------------------------------------------------------------------------------
# The environment methods run in.


def _to_dict(config) -> dict:
  """The config as a JSON dict (what config.json holds and the caches are keyed on), with a
  samples request's unlearn.forget_indices path as {"path": ..., "sha256": digest of the
  positions} (forget_indices_digest): the file's content is part of the config."""
  d = json.loads(config.to_json_best_effort())
  u = d.get("unlearn", {})
  path = u.get("forget_indices") or ""
  if path and u.get("kind") == "samples":
    u["forget_indices"] = {"path": path, "sha256": forget_indices_digest(path)}
  return d


def _request_key(d: dict) -> dict:
  """d['unlearn'] (from _to_dict) as a cache key: an index file by its content alone, so
  the same positions under another path share the cached results."""
  u = dict(d["unlearn"])
  if isinstance(u.get("forget_indices"), dict):
    u["forget_indices"] = {"sha256": u["forget_indices"]["sha256"]}
  return u


def _hash(d: dict) -> str:
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def training_config(config, trainer: base.Trainer | str) -> dict:
  """The part of the config that determines the trained model before unlearning: its
  cache key (pretrain/<trainer>-<hash of this>; tests/test_config.py pins it)."""
  t = methods_lib.trainer(trainer)
  d = _to_dict(config)
  key = {
    "seed": d["seed"],
    "data": d["data"],
    "fl": {k: v for k, v in d["fl"].items() if k not in ("runner", "chunk_size")},
    "model": d["model"],
    "trainer": t.name,
    "backdoor": d["backdoor"],
  }
  if d["backdoor"]["enabled"]:  # the trigger sits in the data to be forgotten
    key["unlearn"] = {k: v for k, v in _request_key(d).items() if k != "calibration_size"}
  cal = d["unlearn"].get("calibration_size", 0)
  if cal and not d["data"].get("train_size", 0):  # carved off the clients' training data
    key["calibration_size"] = cal
  if isinstance(d.get(t.name), dict):
    # The trainer's section but its unlearning-only keys (e.g. quickdrop.unlearn_lr), which
    # must not invalidate the cached model: a key nobody declared is in the key (safe).
    key[t.name] = {k: v for k, v in d[t.name].items() if k not in t.unlearn_only}
  return key


def runner_kind(config) -> str:
  """The client runner a config runs with: fl.runner, or for 'auto' fl.choose_runner's
  pick for the backend and model; with several processes 'auto' is 'shard', the one
  runner whose client axis spans processes."""
  kind = config.fl.runner
  if kind != "auto":
    return kind
  return "shard" if multihost.process_count() > 1 else fl.choose_runner(config.model.name)


def _write_json(path: str, obj):
  """checkpoint.write_json_atomic in process 0 only (the one process that writes files)."""
  if multihost.is_primary():
    checkpoint.write_json_atomic(path, obj)


def _json_roundtrip(obj):
  """obj as it reads back from its JSON file (NaN as null, tuples as lists)."""
  return checkpoint.json_value(_nan_to_none(obj))


def _compiled_now() -> float:
  """Wall seconds minus the compilation seconds so far: differences of it are compiled run
  time (the clock the loop runner's per-client times are read from)."""
  return time.perf_counter() - _clock().seconds


class RunEnv:
  """Implements base.Env for one method directory (or the shared pretraining directory).

  Time is kept two ways: seconds['wall'] - seconds['compile'] is the compute the rounds took
  here (clients one after another, as the loop runner runs them); seconds['parallel'] is
  the critical path had the sampled clients of each round run in parallel: the round's
  compiled time with its loop-run clients' sum replaced by the slowest client
  (fl.ClientClock; vmap / shard rounds are already parallel and count as they are).
  """

  def __init__(self, task: base.Task, directory: str, config_dict: dict):
    self.task, self.dir, self.config_dict = task, directory, config_dict
    cfg = task.config
    # Process 0 alone writes TensorBoard events and progress lines (fu_jax/multihost.py).
    self.logger = log_lib.RunLogger(directory, write=multihost.is_primary())
    self.cost = {"bytes_up": 0, "bytes_down": 0, "examples": 0, "rounds": 0}
    self.seconds = {"wall": 0.0, "compile": 0.0, "eval": 0.0, "parallel": 0.0}
    # This process only; 'serial' / 'critical': fl.ClientClock totals inside rounds.
    self.process = {"wall": 0.0, "compile": 0.0, "eval": 0.0, "serial": 0.0, "critical": 0.0}
    self.step = 0  # TensorBoard step across this directory's phases
    # Per phase, the metrics each of its rounds reported (cost keys removed), as they read
    # back from JSON: saved with the phase's checkpoints, so restored rounds have them too.
    self.metrics = {}
    self.clock = fl.ClientClock(_compiled_now)
    self._eval_fn = lambda p: evaluate(task, p)
    self.runner_kind = runner_kind(cfg)

  def runner(self, program, epochs, batch_size):
    return fl.ClientRunner(
      program,
      kind=self.runner_kind,
      epochs=epochs,
      batch_size=batch_size,
      chunk_size=self.task.config.fl.chunk_size,
      clock=self.clock,
    )

  def evaluate(self, params):
    return self._eval_fn(params)

  def artifact_dir(self, name: str) -> str | None:
    """<this directory>/<name>, created: where a trainer or method writes its files (None
    in every process but process 0, which alone writes files)."""
    if not multihost.is_primary():
      return None
    path = os.path.join(self.dir, name)
    os.makedirs(path, exist_ok=True)
    return path

  def add_cost(self, **amounts):
    for k, v in amounts.items():
      self.cost[k] = self.cost.get(k, 0) + v

  def rounds(self, phase, init_state, num_rounds, round_fn, params_fn):
    cfg = self.task.config
    ckpt = checkpoint.Checkpointer(
      os.path.join(self.dir, "ckpt", phase), self.config_dict, every=cfg.checkpoint_every
    )
    state, start, meta = ckpt.restore_or(init_state, meta_template=self._meta(phase))
    self.metrics[phase] = []
    if meta is not None:
      self.cost, self.step = meta["cost"], meta["step"]
      self.seconds = {"parallel": 0.0, **meta["seconds"]}
      # Absent from checkpoints written before round metrics were kept.
      self.metrics[phase] = list(meta.get("metrics", []))
    if start:
      print(f"[{phase}] resumed after round {start}/{num_rounds}", flush=True)
    started = time.perf_counter()
    for r in range(start, num_rounds):
      if INTERRUPTED.is_set():
        raise KeyboardInterrupt
      before = self.clock.totals()
      with _clock().measure() as t:
        state, metrics = round_fn(state, r)
        jax.block_until_ready(state)
      after = self.clock.totals()
      self.seconds["parallel"] += fl.parallel_seconds(t["wall"] - t["compile"], before, after)
      self.process["serial"] += after[0] - before[0]
      self.process["critical"] += after[1] - before[1]
      params = params_fn(state)
      fl.check_finite(params, f"{phase} round {r + 1}")
      if "loss" in metrics and not math.isfinite(metrics["loss"]):
        raise fl.DivergenceError(
          f"{phase} round {r + 1}: train loss is {metrics['loss']}; "
          "lower the learning rate. No results were written."
        )
      for k in list(self.cost):
        self.cost[k] += metrics.pop(k, 0)
      self.cost["rounds"] += 1
      self.metrics[phase].append(checkpoint.json_value(metrics))
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
        forgetting = metric_names(self.task.request.kind)[0]
        self.logger.progress(
          phase,
          r + 1,
          num_rounds,
          {
            "loss": metrics.get("loss", float("nan")),
            "test_acc": ev["test_acc"],
            forgetting: ev[forgetting],
          },
          started,
        )
      self.logger.scalars(self.step, scalars)
      self.logger.flush()  # on disk before the checkpoint that covers it (resume: no gap)
      ckpt.maybe_save(r + 1, state, meta=self._meta(phase), force=r + 1 == num_rounds)
    ckpt.close()
    return state

  def round_metrics(self, phase):
    """The metrics each round of `phase` reported (base.Env.round_metrics)."""
    return list(self.metrics.get(phase, []))

  def _meta(self, phase):
    return {
      "cost": self.cost,
      "seconds": self.seconds,
      "step": self.step,
      "metrics": self.metrics.get(phase, []),
    }


# ---------------------------------------------------------------------------------------
# Evaluation.


def metric_names(kind: str) -> tuple[str, str]:
  """(forgetting metric, utility metric) of a request kind: see METRICS_BY_KIND."""
  if kind not in METRICS_BY_KIND:
    raise ConfigError(
      f"unlearn.kind={kind!r}: no metric is defined for it; allowed {tuple(METRICS_BY_KIND)}"
    )
  return METRICS_BY_KIND[kind]


def forgotten_records(task: base.Task):
  """The forgotten training samples as they were trained on: (x, y, source class).

  x as the client holds it (with the trigger when a backdoor was planted) and y the label
  trained on (the flipped one under a backdoor; the true label otherwise); source = the
  true label. These are the records whose influence unlearning must remove: their clean
  originals were never in the training set, and scoring them cannot tell the trained model
  from retrain (BUILD.md, "What the evaluation measures").
  """
  forget = np.asarray(task.forget)
  return (
    np.asarray(task.clients.x[forget]),
    np.asarray(task.clients.y)[forget],
    np.asarray(task.y_true)[forget],
  )


def evaluate(task: base.Task, params, forgotten_classes=None) -> dict:
  """Test metrics of a model, named per request kind (METRICS_BY_KIND, the README table).

    test_acc          all test samples.
    retain_acc        test samples of the classes that must survive: for a class request
                      all but the forgotten classes; for client_class and client every
                      class (other clients keep the class).
    forget_acc        class requests: test accuracy of the forgotten classes; null for
                      client_class and client (no class is forgotten everywhere).
    class_acc         client_class: test accuracy of the request's classes (utility).
    forget_train_acc  accuracy on the forgotten training samples as trained on
                      (forgotten_records: triggered images and flipped labels under a
                      backdoor), so it means "still reproduces the forgotten data" in every
                      setting; retrain's value is the reference.
    bd_acc            backdoor.enabled: triggered test images of the source class predicted
                      as the flipped label.

  forgotten_classes: the classes forgotten class-wide by the end of the method (default
  the request's; e.g. a QuickDrop sequence forgets more).
  """
  ds = task.dataset
  cfg = task.config
  kind = task.request.kind
  if forgotten_classes is None:
    forgotten_classes = task.request.classes
  wide = tuple(forgotten_classes) if kind == "class" else ()
  out = acc_lib.evaluate(task.apply_fn, params, ds.x_test, ds.y_test, task.num_classes, wide)
  if kind == "client_class":
    rows = np.isin(ds.y_test, np.asarray(task.request.classes))
    per_class = np.nan_to_num(np.asarray(out["per_class_acc"], np.float64))
    n = np.bincount(np.asarray(ds.y_test)[rows], minlength=task.num_classes)
    out["class_acc"] = float(np.sum(per_class * n) / max(n.sum(), 1))
  x_f, y_f, _ = forgotten_records(task)
  logits = acc_lib.predict_logits(task.apply_fn, params, x_f)
  out["forget_train_acc"] = acc_lib.accuracy(logits, y_f)
  if cfg.backdoor.enabled:
    src = task.request.classes[0] if task.request.classes else None
    out["bd_acc"] = bd_lib.backdoor_accuracy(
      task.apply_fn,
      params,
      ds.x_test,
      ds.y_test,
      src,
      _trigger(cfg, ds),
      _flip(cfg),
      num_classes=task.num_classes,
    )
  return out


def sample_metrics(task: base.Task, params) -> dict:
  """Accuracy and mean loss on the forgotten training samples (their original labels) and
  on held-out samples of the same classes (every test row of a class among theirs): after
  a perfect sample-wise unlearning the two sides look alike, as under retraining."""
  ds = task.dataset
  forget = np.asarray(task.forget)
  x_f = np.asarray(task.clients.x[forget])  # only the forgotten rows' images
  y_f = np.asarray(task.y_true)[forget]
  held = np.isin(ds.y_test, np.unique(y_f))
  lf = acc_lib.predict_logits(task.apply_fn, params, x_f)
  lh = acc_lib.predict_logits(task.apply_fn, params, ds.x_test[held])
  return {
    "forget_train_loss": float(np.mean(acc_lib.loss_from_logits(lf, y_f))),
    "heldout_acc": acc_lib.accuracy(lh, ds.y_test[held]),
    "heldout_loss": float(np.mean(acc_lib.loss_from_logits(lh, ds.y_test[held]))),
  }


def membership_scores(task: base.Task, params) -> dict:
  """MIA: the forgotten training samples (members) vs held-out samples of the same classes.

  Members are the records as trained on (forgotten_records); non-members are made the same
  way from held-out data, so the attacker can only separate members from non-members, not
  triggered from clean images: the test rows of the members' source classes, with the
  trigger planted and the label flipped when a backdoor was planted (their clean
  originals and true labels otherwise). Under a backdoor the question answered is thus
  "was this triggered record trained on"; the backdoor's own strength is bd_acc.

  The test set is split in two by position: odd rows are the non-members; even rows form
  the shadow models' pool, so no attacker trains on the non-members it is scored against.
  """
  ds, cfg = task.dataset, task.config
  x_m, y_m, src = forgotten_records(task)
  odd = np.arange(len(ds.y_test)) % 2 == 1
  held = odd & np.isin(ds.y_test, np.unique(src))
  x_o, y_o = ds.x_test[held], ds.y_test[held]
  if cfg.backdoor.enabled:
    x_o = bd_lib.apply_trigger(x_o, _trigger(cfg, ds))
    y_o = bd_lib.flip_labels(y_o, _flip(cfg), task.num_classes)
  out = mia_lib.membership_inference(task.apply_fn, params, x_m, y_m, x_o, y_o, seed=cfg.seed)
  if cfg.mia.shadows > 0:
    pool = np.flatnonzero(~odd)[: cfg.mia.shadow_pool]
    out.update(
      mia_lib.shadow_attack(
        _shadow_train_fn(task),
        task.apply_fn,
        params,
        ds.x_test[pool],
        ds.y_test[pool],
        x_m,
        y_m,
        x_o,
        y_o,
        num_shadows=cfg.mia.shadows,
        key=fl.stream_key(cfg.seed, fl.STREAM_EVAL),
        vectorize=_vectorize_shadows(cfg),
      )
    )
  return out


RELEARN_ID = 1  # fold_in ids under fl.STREAM_EVAL
RELEARN_MIX_ID = 2


def relearn_fields(task: base.Task, original_forget_acc: float, params) -> dict:
  """relearn_steps_to_recover when eval.relearn_steps > 0: central SGD steps (client lr,
  momentum and batch size) on the forgotten training samples, with the labels they were
  trained with, until their accuracy reaches half the original model's on the same samples;
  capped at the budget (relearn_capped = True).

  eval.relearn_retained = r > 0 mixes round(r * n) retained training samples (drawn without
  replacement, key RELEARN_MIX_ID) into the n forgotten ones; accuracy is still measured on
  the forgotten ones. A class request's forgotten samples share one label, so fine-tuning on
  them alone recovers in one step for every model that forgot (BUILD.md); with the retained
  samples mixed in the class must be told apart again. The forgotten-only count is then
  reported too (relearn_forgotten_only_steps, relearn_forgotten_only_capped)."""
  cfg = task.config
  budget = int(cfg.eval.relearn_steps)
  if budget <= 0:
    return {}
  # The original model's accuracy on these records is its evaluation's forget_train_acc.
  x, y, _ = forgotten_records(task)
  kw = dict(
    target=0.5 * original_forget_acc,
    max_steps=budget,
    lr=cfg.fl.client_lr,
    momentum=cfg.fl.client_momentum,
    batch_size=cfg.fl.batch_size,
    key=fl.stream_key(cfg.seed, fl.STREAM_EVAL, RELEARN_ID),
  )
  only = relearn_lib.relearn_steps(task.apply_fn, params, x, y, **kw)
  out = {}
  ratio = float(cfg.eval.relearn_retained)
  if ratio > 0:
    rows, cols = np.nonzero(np.asarray(task.retain_valid))
    m = min(len(rows), int(round(ratio * len(y))))
    pick = np.sort(
      np.asarray(
        jax.random.permutation(fl.stream_key(cfg.seed, fl.STREAM_EVAL, RELEARN_MIX_ID), len(rows))
      )[:m]
    )
    xr = np.asarray(task.clients.x[rows[pick], cols[pick]])
    yr = np.asarray(task.clients.y)[rows[pick], cols[pick]]
    score = np.concatenate([np.ones(len(y), bool), np.zeros(m, bool)])
    r = relearn_lib.relearn_steps(
      task.apply_fn, params, np.concatenate([x, xr]), np.concatenate([y, yr]), score=score, **kw
    )
    out = {
      "relearn_forgotten_only_steps": only.steps,
      "relearn_forgotten_only_capped": not only.reached,
      "relearn_retained_rows": m,
    }
  else:
    r = only
  return {
    "relearn_steps_to_recover": r.steps,
    "relearn_capped": not r.reached,
    "relearn_target_acc": r.target,
    "relearn_start_acc": r.start_acc,
    **out,
  }


def original_evaluation(task: base.Task, params, pretrain_dir: str) -> dict:
  """evaluate() (and sample_metrics for a samples request) of the trained model, cached next
  to it like its membership scores: every method run on the same request evaluates the same
  model on the same data."""
  d = _to_dict(task.config)
  # The rest is in the pretrain key; the evaluation is versioned (EVAL_VERSION) so numbers
  # written by an earlier evaluation are not reused.
  key = {"seed": d["seed"], "unlearn": _request_key(d), "evaluation": EVAL_VERSION}
  path = os.path.join(pretrain_dir, f"eval-{_hash(key)}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  ev = evaluate(task, params)
  if task.request.kind == "samples":
    ev.update(sample_metrics(task, params))
  ev = _json_roundtrip(ev)  # as read back: the same values for every method
  _write_json(path, ev)
  return ev


def original_membership_scores(task: base.Task, params, pretrain_dir: str) -> dict:
  """membership_scores of the trained model, cached next to it: every method run on the
  same request scores the same model against the same samples (shadow models included)."""
  d = _to_dict(task.config)
  # The directory is keyed by the training config (backdoor included); the members'
  # definition is versioned so caches written under an earlier definition are not reused.
  key = {"seed": d["seed"], "unlearn": _request_key(d), "mia": d["mia"], "members": MIA_MEMBERS}
  path = os.path.join(pretrain_dir, f"mia-{_hash(key)}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  scores = membership_scores(task, params)
  _write_json(path, _nan_to_none(scores))
  return scores


MIA_MEMBERS = "as_trained"  # see forgotten_records
# The trained model's cached evaluation (eval-*.json): raise it whenever evaluate() or
# sample_metrics() change what they compute, so workdirs do not keep the old numbers.
EVAL_VERSION = 1


def _vectorize_shadows(cfg) -> bool:
  # Same trade-off as the client runners: vmapped conv training is slow on XLA:CPU.
  return fl.choose_runner(cfg.model.name) != "loop"


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
    return losses_lib.masked_ce(models.logits_fn(model)(p, batch.x), batch.y, batch.mask)

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


def pretrained(task: base.Task, workdir: str, trainer: base.Trainer | str):
  """The model trained before unlearning, from the workdir's cache or trained now."""
  trainer = methods_lib.trainer(trainer)
  key = training_config(task.config, trainer)
  directory = os.path.join(workdir, "pretrain", f"{trainer.name}-{_hash(key)}")
  os.makedirs(directory, exist_ok=True)
  env = RunEnv(task, directory, key)
  trained = trainer.train(task, env)
  env.logger.close()
  _write_json(
    os.path.join(directory, TRAIN_TIMING),
    {
      "train_seconds": env.seconds["wall"] - env.seconds["compile"],
      "compile_seconds": env.seconds["compile"],
    },
  )
  return trained, env


TRAIN_TIMING = "timing.json"  # a pretraining directory's train_seconds


def train_overhead(config, workdir: str, trainer: base.Trainer, train_seconds: float):
  """train_seconds / plain FedAvg's train_seconds for the same config, from the workdir's
  pretraining cache (1.0 for the fedavg trainer itself; None when FedAvg's is not there)."""
  if trainer.name == base.FEDAVG.name:
    return 1.0
  key = training_config(config, base.FEDAVG)
  path = os.path.join(workdir, "pretrain", f"fedavg-{_hash(key)}", TRAIN_TIMING)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    ref = json.load(f)["train_seconds"]
  return train_seconds / ref if ref > 0 else None


# Config sections that fix the data, the trained model and the request: a retrain run
# compared against must agree on them.
_SHARED_SECTIONS = ("seed", "data", "fl", "model", "unlearn", "backdoor")


def speedups(config, workdir: str, method: str, seconds: float, parallel: float) -> dict:
  """speedup_vs_retrain and speedup_parallel_vs_retrain from <workdir>/retrain's results
  (1.0 for retrain itself; None for compare.NO_UNLEARNING and when there is no finished retrain run
  of the same data, training and request)."""
  if method == "retrain":
    return {"speedup_vs_retrain": 1.0, "speedup_parallel_vs_retrain": 1.0}
  none = {"speedup_vs_retrain": None, "speedup_parallel_vs_retrain": None}
  if method in compare.NO_UNLEARNING:
    return none
  res_path = os.path.join(workdir, "retrain", "results.json")
  cfg_path = os.path.join(workdir, "retrain", "config.json")
  if not (os.path.exists(res_path) and os.path.exists(cfg_path)):
    return none
  with open(cfg_path) as f:
    ref_cfg = json.load(f)
  mine = _to_dict(config)
  if any(ref_cfg.get(k) != mine.get(k) for k in _SHARED_SECTIONS):
    return none
  with open(res_path) as f:
    ref = json.load(f)
  ratio = lambda a, b: a / b if a is not None and b and b > 0 else None
  return {
    "speedup_vs_retrain": ratio(ref.get("unlearn_seconds"), seconds),
    "speedup_parallel_vs_retrain": ratio(ref.get("unlearn_parallel_seconds"), parallel),
  }


# ---------------------------------------------------------------------------------------
# One run.

# Method keys that defaulted to 0 meaning "fl.<key>" before they became linked defaults
# (base.linked): a config.json written then holds 0 where one written now holds the fl value.
FORMER_PLACEHOLDERS = {
  "channel.local_epochs": "local_epochs",
  "channel.lr": "client_lr",
  "channel.batch_size": "batch_size",
  "fedaf.batch_size": "batch_size",
  "sga.batch_size": "batch_size",
  "frr.local_epochs": "local_epochs",
  "quickdrop.unlearn_batch_size": "batch_size",
  "quickdrop.recovery_epochs": "local_epochs",
  "quickdrop.recovery_lr": "client_lr",
}


def config_changes(old: dict, new: dict) -> list[str]:
  """checkpoint.config_diff(old, new) without the former placeholders that mean the same
  run (0 in `old`, the fl value it stood for in `new`), so a workdir written before the
  linked defaults is still resumed and recognised as finished."""

  def same(path):
    if path not in FORMER_PLACEHOLDERS:
      return False
    section, key = path.split(".")
    fl_value = new.get("fl", {}).get(FORMER_PLACEHOLDERS[path])
    return old.get(section, {}).get(key) == 0 and new[section].get(key) == fl_value

  return [k for k in checkpoint.config_diff(old, new) if not same(k)]


def run(config, workdir: str, *, rerun: bool = True) -> dict:
  """Train (or load the cached model), unlearn with config.method, evaluate, write results.

  With rerun=False a finished run (results.json next to the same config.json) is not
  recomputed: its results are read back and returned (experiments.main's default).
  """
  method = methods_lib.get(config.method)
  validate(config, config.method)
  out_dir = os.path.join(workdir, method.name)
  cfg_dict = _to_dict(config)
  cfg_path = os.path.join(out_dir, "config.json")
  results_path = os.path.join(out_dir, "results.json")
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      diff = config_changes(json.load(f), cfg_dict)
    if diff:
      raise checkpoint.ConfigMismatchError(
        f"{out_dir} was run with a different config (keys differ: {', '.join(diff)}); "
        "use another --workdir or the original config."
      )
    if not rerun and os.path.exists(results_path):
      print(
        f"[{method.name}] finished already, not recomputed (--rerun to recompute); "
        f"results: {results_path}",
        flush=True,
      )
      with open(results_path) as f:
        return json.load(f)
  task = build_task(config)
  if method.check is not None:
    method.check(task)  # base.Unservable before anything is trained or written
  # Every process has decided (from the same files) to compute this run before process 0
  # changes them.
  multihost.barrier(f"run {out_dir}")
  os.makedirs(out_dir, exist_ok=True)
  _write_json(cfg_path, cfg_dict)
  if os.path.exists(results_path) and multihost.is_primary():
    os.remove(results_path)  # a rerun rewrites it; never leave a stale one next to new logs

  trained, train_env = pretrained(task, workdir, method.trainer)
  original = original_evaluation(task, trained.params, train_env.dir)

  env = RunEnv(task, out_dir, cfg_dict)
  with _clock().measure() as t:
    outcome = method.unlearn(task, env, trained)
    jax.block_until_ready(outcome.params)
  fl.check_finite(outcome.params, f"method {method.name}")
  # Rounds' times (restored across resumes) plus what the method spent outside rounds in
  # this process; evaluation and compilation are reported apart. Outside rounds, work is
  # the server's or one client's at a time (channel effects, CDP statistics): it counts on
  # the critical path as it happened, except loop-run clients (fl.ClientClock).
  p = env.process
  outside_wall = max(0.0, t["wall"] - p["wall"] - p["eval"])
  outside_compile = max(0.0, t["compile"] - p["compile"])
  outside = max(0.0, outside_wall - outside_compile)
  unlearn_seconds = (env.seconds["wall"] - env.seconds["compile"]) + outside
  serial, critical = env.clock.totals()
  unlearn_parallel = env.seconds["parallel"] + fl.parallel_seconds(
    outside, (p["serial"], p["critical"]), (serial, critical)
  )
  train_seconds = train_env.seconds["wall"] - train_env.seconds["compile"]
  forgotten = tuple(outcome.results.get("forgotten_classes", task.request.classes))
  if forgotten != tuple(task.request.classes):  # e.g. a QuickDrop sequence
    original = evaluate(task, trained.params, forgotten)
  forgetting_metric, utility_metric = metric_names(task.request.kind)
  # eval_seconds: this run's own evaluations (per round and final, membership inference
  # included); the trained model's are shared by every method and cached beside it.
  t0 = time.perf_counter()
  final = evaluate(task, outcome.params, forgotten)
  if task.request.kind == "samples":
    final.update(sample_metrics(task, outcome.params))
  if config.mia.enabled:
    final.update(membership_scores(task, outcome.params))
  eval_seconds = time.perf_counter() - t0
  if config.mia.enabled:
    original.update(original_membership_scores(task, trained.params, train_env.dir))
  relearn = relearn_fields(task, original["forget_train_acc"], outcome.params)
  results = {
    "method": method.name,
    "seed": config.seed,
    "request": {
      "kind": task.request.kind,
      "classes": list(task.request.classes),
      "client": task.request.client,
    },
    "forgetting_metric": forgetting_metric,
    "utility_metric": utility_metric,
    "forgotten_classes": list(forgotten) if task.request.kind == "class" else [],
    **final,
    **({"bd_acc_before": original["bd_acc"]} if "bd_acc" in original else {}),
    "original": original,
    "train_seconds": train_seconds,
    "train_overhead_vs_fedavg": train_overhead(config, workdir, method.trainer, train_seconds),
    "unlearn_seconds": unlearn_seconds,
    "unlearn_parallel_seconds": unlearn_parallel,
    **speedups(config, workdir, method.name, unlearn_seconds, unlearn_parallel),
    "compile_seconds": env.seconds["compile"] + outside_compile,
    "eval_seconds": eval_seconds + env.seconds["eval"],
    "rounds": env.cost["rounds"],
    "bytes_up": env.cost["bytes_up"],
    "bytes_down": env.cost["bytes_down"],
    "examples": env.cost["examples"],
    "runner": env.runner_kind,
    **relearn,
    **outcome.results,
  }
  _check_results_finite(results)
  results = _nan_to_none(results)
  env.logger.summary(env.step + 1, _to_dict(config), results)
  env.logger.close()
  _write_json(results_path, results)
  # No process starts the next run (or reads these results) before they are written.
  multihost.barrier(f"results {out_dir}")
  if multihost.is_primary():
    print(
      f"[{method.name}] "
      + " ".join(
        f"{k}={results[k]:.4f}"
        for k in (
          "test_acc",
          utility_metric,
          forgetting_metric,
          "unlearn_seconds",
          "unlearn_parallel_seconds",
        )
        if isinstance(results.get(k), float)
      ),
      flush=True,
    )
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
      raise fl.DivergenceError(
        f"{k}={v}: the run produced a non-finite result; nothing was written"
      )
