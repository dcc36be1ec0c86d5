"""Relearn time: how fast fine-tuning on the forgotten data brings its accuracy back.

A standard test of whether forgetting is only shallow (the knowledge hidden, not removed):
fine-tune a copy of the unlearned model on the forgotten samples and count the SGD steps
until their accuracy reaches a target (here: half the original model's). A model that never
learned the data (retrain) needs many steps; one that only suppresses it recovers in a few.

    steps = min{s in [0, max_steps] : acc(theta_s; x, y) >= target}

theta_0 the unlearned model, theta_{s+1} one SGD step (optax.sgd(lr, momentum)) on the
s-th mini-batch of `batch_size` rows, in epochs of a fresh random order each (fl.epoch_order
of fold_in(key, epoch)); accuracy on all of (x, y) after every step, or on the rows marked
by `score` only. Never reaching the target returns steps = max_steps with reached = False
(the cap).

Why `score`: when the forgotten samples share one label (a class request), a single step
on them teaches any model to predict that label, retrain's included, so the count is 1 for
every model that forgot. Mixing retained samples into the fine-tuning data (scored on the
forgotten rows only) means the class has to be told apart again rather than predicted
everywhere: the count then depends on what the model still knows (Golatkar et al., CVPR 2020,
relearn on the whole training set).

Not for samples requests (unlearn.kind=samples: experiments.validation refuses eval.relearn_steps > 0
with one line before any training). Relearn time measures how fast knowledge that retraining
would not have comes back. A random subset of a class-balanced training set carries no such
knowledge: retrained models generalise to it (on the audit's digits setting they classify
97% of the forgotten samples, the trained model 100%), so every model starts above the
target of half the original accuracy and scores 0 steps, retrain included. A loss target
(steps until the samples' mean loss falls to the original model's) was the alternative; we
do not adopt it: it counts how fast fine-tuning on the n samples themselves re-memorises
them, which a model that never saw them must do too, so its count mostly reflects how
confident a method leaves the samples to start with, a single number without retrain's
spread to read it against. The per-example audit (experiments.audit: U-LiRA and the
NeurIPS'23 forget score of the samples' confidence against a bank of retrained models, with
intervals and retrain's own row as the null) measures that confidence directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import fl
from fu_jax.metrics import accuracy as acc_lib


class Relearn(NamedTuple):
  steps: int  # steps until acc >= target (max_steps when not reached)
  reached: bool
  target: float
  start_acc: float  # accuracy of the unlearned model before fine-tuning
  final_acc: float  # accuracy after the last step taken


def relearn_steps(
  apply_fn: Callable,
  params: Any,
  x,
  y,
  *,
  target: float,
  max_steps: int,
  lr: float,
  momentum: float,
  batch_size: int,
  key,
  score=None,
) -> Relearn:
  """Central fine-tuning steps on (x, y) until accuracy on (x, y)[score] reaches `target`.

  Args:
    apply_fn: `apply_fn(params, x) -> logits` (e.g. `models.logits_fn(module)`; keep an
      equal object across calls: it keys the jit caches).
    params: the starting (unlearned) model; not modified.
    x, y: the forgotten samples and the labels they were trained with, [n, ...] and [n].
    target: accuracy to reach, in [0, 1].
    max_steps: budget (>= 0).
    lr, momentum: SGD step size and momentum (0 = none), as the clients trained.
    batch_size: rows per step (the last batch of an epoch may be short).
    key: PRNG key for the batch orders.
    score: optional bool [n]: the rows whose accuracy is measured (the forgotten ones when
      retained samples are mixed in); None = all rows.
  """
  if max_steps < 0 or batch_size < 1:
    raise ValueError(f"max_steps={max_steps} must be >= 0 and batch_size={batch_size} >= 1")
  x, y = jnp.asarray(x), jnp.asarray(y)
  n = int(x.shape[0])
  if n == 0:
    raise ValueError("relearn_steps got no forgotten samples (0 rows)")
  rows = np.ones(n, bool) if score is None else np.asarray(score, bool)
  if rows.shape != (n,) or not rows.any():
    raise ValueError(
      f"score: a bool mask of shape ({n},) marking at least one row; got "
      f"shape {rows.shape} with {int(rows.sum())} rows marked"
    )
  program = fl.sgd_program(apply_fn, optax.sgd(lr, momentum=momentum or None))
  step = _step_fn(program, batch_size)
  x_score, y_score = (x, np.asarray(y)) if score is None else (x[rows], np.asarray(y)[rows])
  acc = lambda p: acc_lib.accuracy(acc_lib.predict_logits(apply_fn, p, x_score), y_score)
  valid = jnp.ones((n,), jnp.bool_)
  per_epoch = fl.steps_per_epoch(n, batch_size)
  state = program.init(params, None, None)
  a = acc(params)
  start = a
  s = 0
  while a < target and s < max_steps:
    epoch, i = divmod(s, per_epoch)
    if i == 0:
      ekey = jax.random.fold_in(key, epoch)
      order = fl.epoch_order(ekey, valid)
    state = step(state, x, y, valid, order, i, ekey)
    s += 1
    a = acc(state.params)
  return Relearn(int(s), bool(a >= target), float(target), float(start), float(a))


def _step_fn(program: fl.LocalProgram, batch_size: int):
  @jax.jit
  def step(state, x, y, valid, order, i, ekey):
    batch = fl.take_batch((x, y), valid, order, i, batch_size)
    return program.step(state, batch, jax.random.fold_in(ekey, i))[0]

  return step
