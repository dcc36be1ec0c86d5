"""What every unlearning method sees, and the FedAvg phase helper they share.

A method is a `Method(name, kinds, pretrain, unlearn, why, check=None)`:
  kinds     request kinds it serves (class | client_class | client | samples); others are
            refused, with `why` (one sentence: what it can serve and why) in the message;
  pretrain  name of the trainer (in methods.TRAINERS) whose model it starts from: 'fedavg',
            or one of its own such as QuickDrop's distilling FedAvg;
  unlearn(task, env, trained: Trained) -> Outcome;
  check     optional check(task) raising Unservable when this data does not allow the
            request (run before training).
A trainer is trainer(task, env) -> Trained, run once per workdir and training config.

`Task` is the data of one experiment (immutable). `Env` is supplied by the experiment loop:
it runs checkpointed, logged, timed rounds (`env.rounds`), builds client runners with the
configured runner kind, and evaluates a model. Methods therefore stay free of orbax,
TensorBoard and flags.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import optax

from fu_jax import fl
from fu_jax import tree as tu
from fu_jax.types import ClientData, Dataset

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
  ~forget; client_weights [N] is 0 for a forgotten client, 1 otherwise.
  """
  config: Any
  dataset: Dataset
  clients: ClientData
  y_true: Any
  forget: Any
  retain_valid: Any
  client_weights: np.ndarray
  request: Request
  model: Any            # flax module
  input_shape: tuple
  num_classes: int

  @property
  def apply_fn(self):
    """(params, x) -> logits; equal for equal models, so jit caches keyed on it hit."""
    from fu_jax import models  # local import, as in init_params below
    return models.logits_fn(self.model)


class Trained(NamedTuple):
  """The model before unlearning: parameters plus what its trainer kept (e.g. QuickDrop's
  synthetic sets; None for plain FedAvg)."""
  params: Any
  extra: Any = None


class Outcome(NamedTuple):
  """A method's result: the unlearned parameters and extra results.json fields."""
  params: Any
  results: dict


class Env(NamedTuple):
  """Services of the experiment loop.

  rounds(phase, init_state, num_rounds, round_fn, params_fn) -> state
      runs round_fn(state, r) -> (state, metrics) for r in [0, num_rounds), resuming from
      the phase's latest checkpoint; metrics may carry 'bytes_up', 'bytes_down' and
      'examples', which are summed into the run's cost. Logs, evaluates, checks for NaN.
  runner(program, epochs, batch_size) -> fl.ClientRunner with the configured kind.
  evaluate(params) -> dict of test metrics.
  add_cost(**amounts) adds cost outside rounds (e.g. a one-shot unlearning step).
  """
  rounds: Callable
  runner: Callable
  evaluate: Callable
  add_cost: Callable


class Unservable(ValueError):
  """The request is of a kind the method serves, but this data does not allow it (e.g.
  FedEraser on a class held by several clients): raised by Method.check before training."""


class Method(NamedTuple):
  name: str
  kinds: tuple
  pretrain: str
  unlearn: Callable
  why: str = ""  # why the kinds not listed are refused (shown when one is requested)
  check: Optional[Callable] = None  # check(task) raises Unservable; None = always served


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
  return _sgd_program(task.apply_fn, float(cfg.fl.client_lr),
                      float(cfg.fl.client_momentum or 0.0))


@functools.lru_cache(maxsize=32)
def server_optimizer(lr: float) -> optax.GradientTransformation:
  """optax.sgd(lr), one object per lr: it is a static argument of the jitted server update,
  compared by identity."""
  return optax.sgd(lr)


def num_sampled(config) -> int:
  return fl.num_sampled_clients(config.fl.clients_per_round, config.data.num_clients)


def fedavg_phase(task: Task, env: Env, phase: str, params, num_rounds: int, *,
                 valid=None, y=None, client_weights=None, program=None, extra=None,
                 epochs=None, stream: int = fl.STREAM_CLIENT, round_offset: int = 0):
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
  runner = env.runner(program, epochs or cfg.fl.local_epochs, cfg.fl.batch_size)
  server_opt = server_optimizer(float(cfg.fl.server_lr))
  model_bytes = tu.tree_num_bytes(params)
  k = num_sampled(cfg)

  def round_fn(server, r):
    res = fl.fedavg_round(server, runner, (c.x, y), valid, extra, seed=cfg.seed,
                          round_idx=round_offset + r, client_weights=weights, num_sampled=k,
                          server_opt=server_opt, stream=stream)
    cost = fl.round_cost(res.counts, res.weights, model_bytes=model_bytes,
                         epochs=epochs or cfg.fl.local_epochs)
    return res.server, dict(res.metrics, **cost)

  server = fl.server_init(params, server_opt)
  server = env.rounds(phase, server, num_rounds, round_fn, lambda s: s.params)
  return server.params


def init_params(task: Task, key=None):
  from fu_jax import models  # local import: models pulls in all architectures
  key = fl.stream_key(task.config.seed, fl.STREAM_INIT) if key is None else key
  return models.init_params(task.model, key, task.input_shape)
