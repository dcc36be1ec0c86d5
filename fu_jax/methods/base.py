"""What every unlearning method sees, and the helpers they share: FedAvg phases (and the
FedAvg trainer), the unlearning round over the target clients, config sections and checks.

A method is a `Method(name, kinds, trainer, unlearn, why, check, section, unlearns,
streams)`, everything about it in one place (`fu_jax.methods.register` adds it):
  kinds     request kinds it serves (class | client_class | client | samples); others are
            refused, with `why` (one sentence: what it can serve and why) in the message;
  trainer   the `Trainer` whose model it starts from: `FEDAVG`, or one of its own such as
            QuickDrop's distilling FedAvg;
  unlearn(task, env, trained: Trained) -> Outcome;
  check     optional check(task) raising Unservable when this data does not allow the
            request (run before training);
  section   its config section, a `Section(name, defaults, validate)`: config.<name>'s keys
            with their defaults and meaning, and validate(config) raising ConfigError on a
            bad value (run before anything is loaded or trained). Methods of one algorithm
            share one Section object (fedaf and fedaf_c read config.fedaf); None = no keys;
  unlearns  False for a reference that returns the trained model as it is (fedavg): it
            gets no speed-up over retrain;
  streams   the fold_in ids under fl.STREAM_UNLEARN its own randomness is drawn from
            (fedaf 11, sga 21, federaser 31, channel's `stream_tag`s), so two algorithms
            never share randomness: the registry refuses an id two sections declare.
A `Trainer(name, train, unlearn_only)` is train(task, env) -> Trained, run once per workdir
and training config; every key of config.<name> but those listed in `unlearn_only` enters
the trained-model cache key, so a key added to the section retrains until it is declared
unlearning-only (a forgotten declaration costs a retraining, never a stale model).

Configuration: each method module owns its config section (`config_section(fl_cfg)`: defaults
and what each key means), declares it with its methods, and reads it directly
(`task.config.<section>.<key>`); experiments/configs/default.py assembles the sections of
the registered methods. A default that follows an `fl.*` value is a `linked` field
reference, and `check_section` validates a section against its `Rule`s.

`Task` is the data of one experiment (immutable). `Env` is supplied by the experiment loop:
it runs checkpointed, logged, timed rounds (`env.rounds`), builds client runners with the
configured runner kind, and evaluates a model. Methods therefore stay free of orbax,
TensorBoard and flags.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import fl
from fu_jax import tree as tu
from fu_jax.containers import ClientData, Dataset

REQUEST_KINDS = ("class", "client_class", "client", "samples")


class Request(NamedTuple):
  """What to forget: every sample of `classes` (kind 'class'), those held by `client`
  (kind 'client_class'), all of `client`'s data (kind 'client'; classes empty), or
  individual training samples (kind 'samples'; classes empty; client = the client they were
  drawn from, -1 for every client or an index file). Task.forget marks the samples."""

  kind: str
  classes: tuple
  client: int


class Task(NamedTuple):
  """One experiment's data, fixed before any method runs.

  clients.y holds the training labels as trained on (backdoor flips included); y_true the
  original labels. forget [N, max_n] marks the samples to forget; retain_valid = valid &
  ~forget; client_weights [N] is 0 for a forgotten client, 1 otherwise. calibration: the
  server's calibration split (x [m, H, W, C] float32, y int32 [m]) that no client trains
  on (`unlearn.calibration_size`), or None.
  """

  config: Any
  dataset: Dataset
  clients: ClientData
  y_true: Any
  forget: Any
  retain_valid: Any
  client_weights: np.ndarray
  request: Request
  model: Any  # flax module
  input_shape: tuple
  num_classes: int
  calibration: Any = None

  @property
  def apply_fn(self):
    """(params, x) -> logits; equal for equal models, so jit caches keyed on it hit."""
    from fu_jax import models  # local import, as in init_params below

    return models.logits_fn(self.model)


class Trained(NamedTuple):
  """The model before unlearning: parameters plus what its trainer kept (QuickDrop's
  synthetic sets, FedEraser's store of updates; None for plain FedAvg). Not to be confused
  with a LocalProgram's `extra`, the per-client input of its init (masks, radii...)."""

  params: Any
  kept: Any = None


class Outcome(NamedTuple):
  """A method's result: the unlearned parameters and extra results.json fields."""

  params: Any
  results: dict


class Env(Protocol):
  """Services of the experiment loop (experiments.env.RunEnv implements them; a benchmark or
  test may implement the part the code it calls uses)."""

  def rounds(self, phase: str, init_state, num_rounds: int, round_fn, params_fn):
    """Runs round_fn(state, r) -> (state, metrics) for r in [0, num_rounds), resuming from
    the phase's latest checkpoint, and returns the last state; metrics may carry
    'bytes_up', 'bytes_down' and 'examples', which are summed into the run's cost. Logs,
    evaluates params_fn(state), checks for NaN."""

  def round_metrics(self, phase: str) -> list[dict]:
    """The metrics each round of `phase` reported, cost keys removed, in round order, as
    they read back from JSON. They are saved with the phase's checkpoints, so rounds a
    resumed run restored have theirs too: a per-round statistic a method reports in its
    results must come from here (returned by round_fn as a metric), never from a variable
    round_fn fills, which restored rounds leave empty."""

  def runner(self, program: fl.LocalProgram, epochs: int, batch_size: int) -> fl.ClientRunner:
    """A client runner of the configured kind."""

  def evaluate(self, params) -> dict:
    """Test metrics of a model."""

  def add_cost(self, **amounts) -> None:
    """Adds cost outside rounds (e.g. a one-shot unlearning step)."""

  def artifact_dir(self, name: str) -> str | None:
    """A directory, created, where a trainer or method writes its files; None where this
    process writes none (every process but the first of a multi-process run)."""


def last_round_metrics(env: Env, phase: str) -> dict:
  """The metrics the last round of `phase` reported (env.round_metrics), restored with it
  on a resume; {} when none are known (a checkpoint written before they were kept)."""
  rounds = env.round_metrics(phase)
  return dict(rounds[-1]) if rounds else {}


class Unservable(ValueError):
  """The request is of a kind the method serves, but this data does not allow it (e.g.
  FedEraser on a class held by several clients): raised by Method.check before training."""


class Trainer(NamedTuple):
  """How the model before unlearning is trained: train(task, env) -> Trained.

  unlearn_only: the keys of config.<name> (the trainer's own section, when the config has
  one) that do NOT change the trained model. Every other key of the section, with seed,
  data, fl, model and backdoor, forms its cache key (experiments.caches.training_config): the
  list names what may be left out, so an omission is safe.
  """

  name: str
  train: Callable
  unlearn_only: tuple = ()


class Section(NamedTuple):
  """A method's config section, config.<name>: defaults(fl_cfg) -> ConfigDict of every key
  with its default and meaning (fl_cfg: the config's fl section, for `linked` defaults);
  validate(config) raises ConfigError on a bad value of it (None = nothing to check)."""

  name: str
  defaults: Callable
  validate: Callable | None = None


class Method(NamedTuple):
  """One unlearning method, all it declares (the module docstring says what each field is)."""

  name: str
  kinds: tuple
  trainer: Trainer
  unlearn: Callable
  why: str = ""  # why the kinds not listed are refused (shown when one is requested)
  check: Callable | None = None  # check(task) raises Unservable; None = always served
  section: Section | None = None  # its config section; None = it has no keys
  unlearns: bool = True  # False: the trained model as it is (no speed-up over retrain)
  streams: tuple = ()  # its fold_in ids under fl.STREAM_UNLEARN

  @property
  def validate(self) -> Callable | None:
    """validate(config) raising ConfigError on a bad value of its section; None = nothing."""
    return None if self.section is None else self.section.validate


# ---------------------------------------------------------------------------------------
# Config sections and their validation.


class ConfigError(ValueError):
  """A configuration value outside what is allowed (one line: key, value, what is allowed)."""


def require(ok: bool, msg: str):
  """Raises ConfigError(msg) unless ok."""
  if not ok:
    raise ConfigError(msg)


class Rule(NamedTuple):
  """ok(value) -> bool, and what is allowed, as the error message says it."""

  ok: Callable
  allowed: str


def one_of(choices) -> Rule:
  choices = tuple(choices)
  return Rule(lambda v: v in choices, f"allowed {choices}")


def at_least(low, note: str = "") -> Rule:
  return Rule(lambda v: v >= low, f"must be >= {low}" + (f" ({note})" if note else ""))


def positive(note: str = "") -> Rule:
  return Rule(lambda v: v > 0, "must be > 0" + (f" ({note})" if note else ""))


def in_range(low, high, *, low_open: bool = False, high_open: bool = False) -> Rule:
  """low <= v <= high, with either end open."""

  def ok(v):
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

  return Rule(ok, f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def check_section(config, section: str, rules: dict):
  """Checks config.<section>.<key> against rules[key] (a Rule); raises ConfigError naming
  the first bad value: '<section>.<key>=<value>: <what is allowed>'."""
  values = config[section]
  for key, rule in rules.items():
    v = values[key]
    require(rule.ok(v), f"{section}.{key}={v!r}: {rule.allowed}")


def new_section():
  """An empty config section (ml_collections.ConfigDict)."""
  import ml_collections  # the runner's dependency; the transforms do not need it

  return ml_collections.ConfigDict()


def linked(section, key: str):
  """A default that follows section.<key> (e.g. fl.batch_size) until it is set itself.

  section.get_ref(key) alone would alias the two keys (setting this one would set
  section.<key> too); .identity() makes a derived reference that setting replaces.
  """
  return section.get_ref(key).identity()


def client_optimizer(config, lr=None) -> optax.GradientTransformation:
  lr = config.fl.client_lr if lr is None else lr
  return optax.sgd(lr, momentum=config.fl.client_momentum or None)


@functools.lru_cache(maxsize=32)
def _sgd_program(apply_fn, lr: float, momentum: float) -> fl.LocalProgram:
  return fl.sgd_program(apply_fn, optax.sgd(lr, momentum=momentum or None))


def client_program(task: Task) -> fl.LocalProgram:
  """Local training with `client_optimizer`: one LocalProgram object per (model, lr,
  momentum), so every runner built from it shares compiled steps (fl.ClientRunner) where a
  fresh program per phase would recompile them, e.g. once per model of an audit's bank."""
  cfg = task.config
  return _sgd_program(task.apply_fn, float(cfg.fl.client_lr), float(cfg.fl.client_momentum or 0.0))


def num_sampled(config) -> int:
  return fl.num_sampled_clients(config.fl.clients_per_round, config.data.num_clients)


def fedavg_phase(
  task: Task,
  env: Env,
  phase: str,
  params,
  num_rounds: int,
  *,
  valid=None,
  y=None,
  client_weights=None,
  program=None,
  extra=None,
  epochs=None,
  stream: int = fl.STREAM_CLIENT,
  round_offset: int = 0,
):
  """`num_rounds` FedAvg rounds from `params` over the clients' `valid` examples.

  Defaults: all valid examples, the training labels, every client, plain SGD. Rounds are
  numbered round_offset + r for sampling and keys, so phases never reuse randomness.
  Communication (fl.round_cost): each sampled client with rows to train on and weight > 0
  downloads and uploads the full model.
  """
  cfg = task.config
  c = task.clients
  valid = c.valid if valid is None else valid
  y = c.y if y is None else y
  weights = np.ones(c.count.shape[0]) if client_weights is None else client_weights
  if program is None:
    program = client_program(task)
  epochs = epochs or cfg.fl.local_epochs
  runner = env.runner(program, epochs, cfg.fl.batch_size)
  server_opt = fl.server_optimizer(float(cfg.fl.server_lr))
  play = fl.fedavg_play(
    runner,
    (c.x, y),
    valid,
    extra,
    seed=cfg.seed,
    client_weights=weights,
    num_sampled=num_sampled(cfg),
    server_opt=server_opt,
    stream=stream,
  )
  server = fl.fedavg_rounds(
    play,
    fl.server_init(params, server_opt),
    num_rounds,
    rounds=env.rounds,
    phase=phase,
    round_offset=round_offset,
    model_bytes=tu.tree_num_bytes(params),
    epochs=epochs,
  )
  return server.params


def init_params(task: Task, key=None):
  from fu_jax import models  # local import: models pulls in all architectures

  key = fl.stream_key(task.config.seed, fl.STREAM_INIT) if key is None else key
  return models.init_params(task.model, key, task.input_shape)


def train_fedavg(task: Task, env: Env) -> Trained:
  """The plain FedAvg model every method but QuickDrop and FedEraser starts from."""
  params = fedavg_phase(task, env, "train", init_params(task), task.config.fl.rounds)
  return Trained(params)


FEDAVG = Trainer("fedavg", train_fedavg)


# ---------------------------------------------------------------------------------------
# Target clients and their unlearning round (SGA, FedAF, FedEraser).

OLD_LABELS = ("trained", "original")


def target_clients(task: Task) -> np.ndarray:
  """Sorted indices of the clients holding at least one sample to forget."""
  return np.flatnonzero(np.asarray(task.forget).any(axis=1))


def old_labels(task: Task, source: str):
  """[N, max_n] int labels of the old memories: as trained on, or the clean originals."""
  if source not in OLD_LABELS:
    raise ValueError(f"old_labels={source!r}: allowed {OLD_LABELS}")
  return task.clients.y if source == "trained" else task.y_true


def client_keys(seed: int, method_id: int, part: int, clients) -> jax.Array:
  """One key per client: stream_key(seed, STREAM_UNLEARN, method_id, part, client)."""
  return jnp.stack(
    [fl.stream_key(seed, fl.STREAM_UNLEARN, method_id, part, int(c)) for c in clients]
  )


def loss_bound(setting: float, num_classes: int) -> float | None:
  """A loss-threshold setting as the bound: 0 = log K (a uniform prediction's loss, past which
  ascending only anti-predicts), < 0 = none, else the value itself."""
  if setting == 0:
    return math.log(num_classes)
  return None if setting < 0 else float(setting)


def budget_epochs(task: Task, clients, epochs: int, min_steps: int, batch_size: int) -> int:
  """Local epochs of an unlearning round that give every target client at least
  `min_steps` optimizer steps: max(epochs, ceil(min_steps / s_min)), where s_min =
  ceil(n_min / batch_size) is the steps per epoch of the target client with the fewest
  forget samples n_min (a client takes ceil(n_k / batch_size) steps an epoch, so the others
  take more). An epoch count alone makes the amount of unlearning depend on how many
  samples a client holds: 40 images at batch 64 are one step an epoch, 1,500 are 24.
  min_steps 0 = `epochs` as given."""
  counts = np.asarray(task.forget)[np.asarray(clients)].sum(axis=1)
  return epochs_for_steps(counts, epochs, min_steps, batch_size)


def epochs_for_steps(counts, epochs: int, min_steps: int, batch_size: int) -> int:
  """max(epochs, ceil(min_steps / s_min)), s_min = ceil(n_min / batch_size) for the
  smallest positive entry n_min of `counts` (samples per client); `epochs` when min_steps
  is 0 or no count is positive."""
  counts = np.asarray(counts)
  counts = counts[counts > 0]
  if min_steps <= 0 or counts.size == 0:
    return int(epochs)
  s_min = math.ceil(int(counts.min()) / int(batch_size))
  return max(int(epochs), math.ceil(int(min_steps) / s_min))


class TargetResult(NamedTuple):
  params: Any  # the aggregated model
  clients: np.ndarray  # target client indices
  counts: np.ndarray  # their forget-sample counts (the aggregation weights)
  metrics: dict  # example-weighted means of the programs' metrics
  cost: dict  # fl.round_cost of the round


@jax.jit
def apply_mean_delta(params, client_params, weights):
  """params + sum_k w_k (client_params_k - params) / sum_k w_k (client axis 0)."""
  return optax.tree.add(params, fl.aggregate(params, client_params, weights))


def run_on_targets(
  task: Task,
  env: Env,
  program: fl.LocalProgram,
  params,
  *,
  y,
  epochs: int,
  batch_size: int,
  keys,
  extra=None,
  clients=None,
) -> TargetResult:
  """Runs `program` on each target client's forget samples, from `params`; returns
  params + sum_k n_k (theta_k - params) / sum_k n_k over the targets (n_k = forget count).

  y: labels pytree with leading [N, max_n] axes (all clients); extra: per-target pytree with
  a leading [T] axis (T = len(clients)); keys: [T] keys; clients: default target_clients.
  Cost (fl.round_cost): each target client with samples to forget downloads `params` and
  uploads its model.
  """
  idx = target_clients(task) if clients is None else np.asarray(clients)
  take = lambda a: np.asarray(a)[idx]  # host gathers: no per-shape XLA compile
  valid = take(task.forget)
  runner = env.runner(program, epochs, batch_size)
  x = task.clients.x[idx]  # only the targets' images (clients.x may be an index block)
  res = runner.run(params, (x, jax.tree.map(take, y)), valid, extra, keys)
  counts = valid.sum(1).astype(np.float32)
  new = apply_mean_delta(params, res.params, counts)
  w = counts / max(float(counts.sum()), 1.0)
  metrics = {k: float(np.sum(np.asarray(m) * w)) for k, m in res.metrics.items()}
  cost = fl.round_cost(counts, counts, model_bytes=tu.tree_num_bytes(params), epochs=epochs)
  return TargetResult(new, idx, counts.astype(np.int64), metrics, cost)


def recover(task: Task, env: Env, phase: str, params, rounds: int):
  """`rounds` FedAvg rounds on the retained data (forgotten client weighted 0), numbered
  after the training rounds and the unlearning round."""
  if rounds <= 0:
    return params
  return fedavg_phase(
    task,
    env,
    phase,
    params,
    int(rounds),
    valid=task.retain_valid,
    client_weights=task.client_weights,
    round_offset=task.config.fl.rounds + 1,
  )
