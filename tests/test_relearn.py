"""Relearn time (fu_jax/metrics/relearn.py): exact step counts against a numpy loop on a
tiny softmax regression, the cap, and retrain vs a shallow unlearner on digits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import caches, validation
from experiments import evaluation as eval_lib
from experiments import run as run_lib
from experiments import task as task_lib
from fu_jax import models
from fu_jax.metrics import accuracy as acc_lib
from fu_jax.metrics import relearn
from tests import pretrain_cache
from tests.test_sga import small_config as _small_config

LR, MOMENTUM = 0.2, 0.5


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(x)


MODULE = Linear()
APPLY = models.logits_fn(MODULE)  # (params, x) -> logits


def _problem():
  # 8 points, label = sign of the first coordinate; the starting model predicts class 0
  # everywhere (bias) and leans the wrong way, so accuracy climbs 0.5 -> 1 in several steps.
  x = np.array(
    [
      [-2.0, 1.0],
      [-1.5, -1.0],
      [-1.0, 0.5],
      [-0.6, -0.5],
      [0.3, 0.5],
      [0.8, -0.5],
      [1.5, 1.0],
      [2.5, -1.0],
    ],
    np.float32,
  )
  y = (x[:, 0] > 0).astype(np.int32)
  params = {
    "Dense_0": {
      "kernel": np.array([[0.5, -0.5], [0.0, 0.0]], np.float32),
      "bias": np.array([1.0, -1.0], np.float32),
    }
  }
  return x, y, jax.tree.map(jnp.asarray, params)


def _numpy_steps(x, y, params, target, budget, score=None):
  """Full-batch SGD with momentum (optax.sgd's trace: t = g + mu t; w -= lr t) in numpy;
  accuracy on the rows marked by score (all when None)."""
  score = np.ones(len(y), bool) if score is None else score
  w = np.array(params["Dense_0"]["kernel"], np.float64)
  b = np.array(params["Dense_0"]["bias"], np.float64)
  tw, tb = np.zeros_like(w), np.zeros_like(b)
  onehot = np.eye(2)[y]
  accs = []
  for s in range(budget + 1):
    logits = x @ w + b
    accs.append(float(np.mean((np.argmax(logits, 1) == y)[score])))
    if accs[-1] >= target:
      return s, accs
    if s == budget:
      break
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gw, gb = x.T @ (p - onehot) / len(y), np.mean(p - onehot, 0)
    tw, tb = gw + MOMENTUM * tw, gb + MOMENTUM * tb
    w, b = w - LR * tw, b - LR * tb
  return budget, accs


def _relearn(target, budget):
  x, y, params = _problem()
  return relearn.relearn_steps(
    APPLY,
    params,
    x,
    y,
    target=target,
    max_steps=budget,
    lr=LR,
    momentum=MOMENTUM,
    batch_size=8,
    key=jax.random.key(0),
  )


@pytest.mark.slow
def test_step_count_matches_numpy_loop():
  x, y, params = _problem()
  want, accs = _numpy_steps(x, y, params, 1.0, 100)
  assert accs[0] == 0.5 and 5 <= want < 100  # a case that takes several graded steps
  assert len(set(accs)) >= 4
  got = _relearn(1.0, 100)
  assert (got.steps, got.reached) == (want, True)
  assert got.start_acc == 0.5 and got.final_acc == 1.0
  for target in sorted(set(accs)):  # every intermediate target: the first step reaching it
    assert _relearn(target, 100).steps == next(s for s, a in enumerate(accs) if a >= target)


def test_monotone_in_target_and_capped_at_budget():
  x, y, params = _problem()
  full, _ = _numpy_steps(x, y, params, 1.0, 100)
  steps = [_relearn(t, 100).steps for t in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
  assert steps[:2] == [0, 0] and steps == sorted(steps) and steps[-1] == full
  assert len(set(steps)) >= 4
  capped = _relearn(1.0, full - 1)
  assert (capped.steps, capped.reached) == (full - 1, False)
  never = _relearn(1.01, 7)  # unreachable target: the budget, flagged
  assert (never.steps, never.reached) == (7, False)
  zero = _relearn(0.6, 0)  # no budget: the start model is all there is
  assert (zero.steps, zero.reached, zero.final_acc) == (0, False, 0.5)


def test_minibatches_cycle_through_epochs():
  # batch 3 over 8 rows: 3 steps an epoch (the last short); still reaches the target and the
  # result is deterministic in the key.
  x, y, params = _problem()
  a = relearn.relearn_steps(
    APPLY,
    params,
    x,
    y,
    target=1.0,
    max_steps=200,
    lr=LR,
    momentum=MOMENTUM,
    batch_size=3,
    key=jax.random.key(3),
  )
  b = relearn.relearn_steps(
    APPLY,
    params,
    x,
    y,
    target=1.0,
    max_steps=200,
    lr=LR,
    momentum=MOMENTUM,
    batch_size=3,
    key=jax.random.key(3),
  )
  assert a.reached and a.steps > 3 and a == b


def test_score_mask_trains_on_all_rows_and_scores_the_marked_ones():
  # Train on all 8 rows, measure the 4 positive ones only (the "forgotten" rows of a mixed
  # relearning set): each intermediate target's step count equals the numpy loop's.
  x, y, params = _problem()
  score = y == 1
  _, accs = _numpy_steps(x, y, params, 1.01, 60, score)
  _, accs_all = _numpy_steps(x, y, params, 1.01, 60)
  assert accs != accs_all and len(set(accs)) >= 3  # the mask changes what is measured
  for target in sorted(set(accs)):
    got = relearn.relearn_steps(
      APPLY,
      params,
      x,
      y,
      target=target,
      max_steps=60,
      lr=LR,
      momentum=MOMENTUM,
      batch_size=8,
      key=jax.random.key(0),
      score=score,
    )
    assert (got.steps, got.reached) == (next(s for s, a in enumerate(accs) if a >= target), True)
    assert got.start_acc == accs[0]


def test_bad_arguments():
  x, y, params = _problem()
  with pytest.raises(ValueError, match="max_steps"):
    relearn.relearn_steps(
      APPLY,
      params,
      x,
      y,
      target=1.0,
      max_steps=-1,
      lr=LR,
      momentum=0.0,
      batch_size=8,
      key=jax.random.key(0),
    )
  with pytest.raises(ValueError, match="no forgotten samples"):
    relearn.relearn_steps(
      APPLY,
      params,
      x[:0],
      y[:0],
      target=1.0,
      max_steps=1,
      lr=LR,
      momentum=0.0,
      batch_size=8,
      key=jax.random.key(0),
    )
  for bad in (np.zeros(8, bool), np.ones(7, bool)):
    with pytest.raises(ValueError, match="score: a bool mask of shape"):
      relearn.relearn_steps(
        APPLY,
        params,
        x,
        y,
        target=1.0,
        max_steps=1,
        lr=LR,
        momentum=0.0,
        batch_size=8,
        key=jax.random.key(0),
        score=bad,
      )


def _config(method, **overrides):
  return _small_config(method, **{"unlearn.kind": "class", "eval.relearn_steps": 50, **overrides})


def _suppressed(task, params, classes):
  """A shallow unlearner: the trained model with the output biases of `classes` lowered just
  enough that no forgotten sample is predicted as its label; every weight that recognises
  the classes is kept."""
  x, y, _ = eval_lib.forgotten_records(task)
  logits = np.asarray(acc_lib.predict_logits(task.apply_fn, params, x))
  others = logits.copy()
  others[:, list(classes)] = -np.inf
  shift = float(np.max(logits[np.arange(len(y)), y] - others.max(1))) + 0.01
  last = sorted(params)[-1]  # the MLP's output layer
  out = {k: dict(v) for k, v in params.items()}
  out[last]["bias"] = out[last]["bias"].at[jnp.asarray(classes)].add(-shift)
  return out


@pytest.mark.slow
def test_retrain_relearns_slower_than_a_shallow_unlearner(tmp_path):
  # Both models start at 0 accuracy on the forgotten class; the one that only hides it behind
  # its output bias must get it back in fewer steps than retrain, which never learned it
  # (measured: 2 and 5 steps). Retained samples are mixed in 9:1 so that the class has to be
  # told apart again: on the forgotten samples alone one step teaches any model their label.
  cfg = _config("retrain", **{"eval.relearn_retained": 9.0})
  ref = pretrain_cache.run(cfg, str(tmp_path))
  task = task_lib.build_task(cfg)
  trained, _ = caches.pretrained(task, str(tmp_path), "fedavg")  # the cached model
  original = ref["original"]["forget_train_acc"]
  assert original >= 0.9
  shallow = eval_lib.relearn_fields(task, original, _suppressed(task, trained.params, (0,)))
  for r in (ref, shallow):
    assert r["relearn_start_acc"] == 0.0 and not r["relearn_capped"]
    assert r["relearn_target_acc"] == pytest.approx(0.5 * original)
  assert 0 < shallow["relearn_steps_to_recover"] < ref["relearn_steps_to_recover"]


def test_bad_budget_is_one_line():
  c = _config("fedavg")
  c.eval.relearn_steps = -2
  with pytest.raises(validation.ConfigError, match=r"eval.relearn_steps=-2: must be an int >= 0"):
    validation.validate(c, "fedavg")


@pytest.mark.slow
def test_retained_mix_on_a_class_request(tmp_path):
  # Forgotten samples alone (one label): retrain relearns in very few steps. With 9 retained
  # samples per forgotten one it must tell the class apart again: more steps. The
  # forgotten-only count is the unmixed run's, exactly (same key).
  alone = run_lib.run(_config("retrain"), str(tmp_path / "alone"))
  mixed = run_lib.run(_config("retrain", **{"eval.relearn_retained": 9.0}), str(tmp_path / "mixed"))
  assert "relearn_forgotten_only_steps" not in alone
  assert mixed["relearn_forgotten_only_steps"] == alone["relearn_steps_to_recover"]
  assert mixed["relearn_forgotten_only_capped"] == alone["relearn_capped"]
  assert mixed["relearn_target_acc"] == alone["relearn_target_acc"]
  assert mixed["relearn_start_acc"] == alone["relearn_start_acc"] == 0.0
  assert mixed["relearn_steps_to_recover"] > alone["relearn_steps_to_recover"]


def test_bad_retained_ratio_is_one_line():
  c = _config("fedavg", **{"eval.relearn_retained": -1.0})
  with pytest.raises(validation.ConfigError, match=r"eval.relearn_retained=-1.0: must be a number"):
    validation.validate(c, "fedavg")
