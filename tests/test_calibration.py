"""Calibrated unlearning (fu_jax/calibration.py, sga.stop='calibrated'): the targets, the
gated rule against a hand-written loop, where it stops against the loss threshold, the
calibration split, and one end-to-end run on digits."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import caches, frontier, validation
from experiments import task as task_lib
from experiments.configs import digits
from fu_jax import calibration, data, fl, models
from fu_jax import methods as methods_lib
from fu_jax.methods import base, sga
from tests import pretrain_cache

K, D, N = 3, 4, 6


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(K)(x.reshape(x.shape[0], -1))


MODULE = Linear()
APPLY = models.logits_fn(MODULE)


def _np_phi(z, y):
  zy = z[np.arange(len(y)), y]
  others = z.copy()
  others[np.arange(len(y)), y] = -np.inf
  m = others.max(1)
  return zy - (m + np.log(np.exp(others - m[:, None]).sum(1)))


def _hand_loop(w, b, x, y, t, lr, steps, band=None):
  """Full-batch gated descent of phi on logits = x w + b, in float64 numpy: each step
  w -= lr/n sum_i s_i x_i (e_y - q_i)^T, q_i the softmax over the classes other than y_i,
  s_i = 1 while phi_i > t_i, -1 while phi_i < t_i - band (with a band), else 0.
  Returns (w, b, the number of steps that moved the model)."""
  w, b = w.astype(np.float64), b.astype(np.float64)
  moved = 0
  for _ in range(steps):
    z = x @ w + b
    phi = _np_phi(z, y)
    sign = (phi > t).astype(np.float64)
    if band is not None:
      sign -= phi < t - band
    if not sign.any():
      continue
    moved += 1
    others = np.where(np.eye(K, dtype=bool)[y], -np.inf, z)
    q = np.exp(others - others.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    dz = (np.eye(K)[y] - q) * sign[:, None] / len(y)  # d mean-hinge / dz
    w, b = w - lr * x.T @ dz, b - lr * dz.sum(0)
  return w, b, moved


def _setup(seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(N, D).astype(np.float32)
  y = rng.randint(0, K, N).astype(np.int32)
  w = (rng.randn(D, K) * 0.3).astype(np.float32)
  b = np.zeros(K, np.float32)
  # Make the model confident on its samples (as a trained model is on its training data).
  for _ in range(200):
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(K)[y]) / N
    w -= 2.0 * x.T @ g
    b -= 2.0 * g.sum(0)
  return x, y, w.astype(np.float32), b.astype(np.float32)


def _params(w, b):
  return {"Dense_0": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}


def _run(program, params, x, y, epochs, extra=None):
  """One client, full batch (one step an epoch): (params, metrics) of the runner."""
  res = fl.ClientRunner(program, kind="loop", epochs=epochs, batch_size=N).run(
    params,
    (jnp.asarray(x)[None], jax.tree.map(lambda a: jnp.asarray(a)[None], y)),
    jnp.ones((1, N), bool),
    extra,
    jnp.stack([jax.random.key(0)]),
  )
  return jax.tree.map(lambda a: np.asarray(a[0]), res.params), res.metrics


def test_rank_matched_targets_by_hand():
  phi_cal = np.array([1.0, 2.0, 3.0, 4.0, 9.0, 5.0, 7.0])
  y_cal = np.array([0, 0, 0, 0, 0, 1, 1])
  phi = np.array([12.0, 8.0, 3.0, 10.0, 6.0])
  y = np.array([0, 0, 0, 1, 2])  # class 2 has no calibration example: pooled
  t = calibration.rank_matched_targets(phi, y, phi_cal, y_cal)
  # class 0 sorted [1, 2, 3, 4, 9]; ranks of (12, 8, 3) = (2, 1, 0) -> q = 5/6, 1/2, 1/6;
  # position q * 4 interpolated; class 1 [5, 7] one sample q = 1/2 -> 6; class 2 pooled median.
  np.testing.assert_allclose(t, [4 + (10 / 3 - 3) * 5, 3.0, 1 + 2 / 3, 6.0, 4.0], rtol=1e-6)
  # easy samples keep the higher targets: the targets are ordered as the phis are
  assert t[0] > t[1] > t[2]
  with pytest.raises(ValueError, match="empty"):
    calibration.rank_matched_targets(phi, y, np.zeros(0), np.zeros(0, int))


def test_quantile_transfer_by_hand():
  seen = np.array([14.0, 8.0, 12.0, 10.0])  # positions 1/8, 3/8, 5/8, 7/8 once sorted
  unseen = np.array([2.0, 6.0])  # positions 1/4, 3/4
  t = calibration.quantile_transfer(np.array([7.0, 9.0, 11.0, 13.0, 15.0]), seen, unseen)
  # F = 1/8 (clamped), 1/4, 1/2, 3/4, 7/8 (clamped) -> Q = 2, 2, 4, 6, 6
  np.testing.assert_allclose(t, [2.0, 2.0, 4.0, 6.0, 6.0])
  x = np.random.RandomState(0).randn(30)
  np.testing.assert_allclose(calibration.quantile_transfer(x, x, x), x, atol=1e-6)  # identity
  # unseen data less confident: every target lower, order kept
  t = calibration.quantile_transfer(x, x, x - 1.0)
  np.testing.assert_allclose(t, x - 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="non-empty"):
    calibration.quantile_transfer(x, x, np.zeros(0))


@pytest.mark.slow
def test_margin_and_hinge():
  z = np.random.RandomState(1).randn(5, K).astype(np.float32) * 3
  y = np.array([0, 1, 2, 0, 1])
  np.testing.assert_allclose(calibration.margin(z, y), _np_phi(z.astype(np.float64), y), atol=1e-5)
  # d(-CE)/dz is (1 - p_y) times dphi/dz: same direction, CE's scaled down by 1 - p_y.
  g_phi = jax.vmap(jax.grad(lambda zi, yi: calibration.margin(zi[None], yi[None])[0]))(z, y)
  g_ce = jax.vmap(jax.grad(lambda zi, yi: jax.nn.log_softmax(zi)[yi]))(z, y)
  p_y = jax.nn.softmax(z)[np.arange(5), y]
  np.testing.assert_allclose(g_ce, (1 - p_y)[:, None] * g_phi, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
  "drop, band, lr, epochs",
  [(0.5, None, 0.5, 40), (2.0, None, 0.5, 40), (30.0, None, 0.5, 40), (2.0, 0.3, 0.1, 200)],
)
def test_program_equals_hand_written_loop(drop, band, lr, epochs):
  # drop: how far below its starting phi each target lies (30 = never reached in the cap).
  x, y, w, b = _setup()
  phi0 = _np_phi(x.astype(np.float64) @ w + b, y)
  t = (phi0 - drop).astype(np.float32)
  prog = sga.calibrated_program(APPLY, lr, band=band)
  got, metrics = _run(prog, _params(w, b), x, (y, t), epochs)
  w_ref, b_ref, moved = _hand_loop(w, b, x, y, t, lr, epochs, band)
  np.testing.assert_allclose(got["Dense_0"]["kernel"], w_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["Dense_0"]["bias"], b_ref, rtol=1e-4, atol=1e-5)
  assert round(float(metrics["moved"][0]) * epochs) == moved  # same stop step
  phi = _np_phi(x @ w_ref + b_ref, y)
  if band is not None:  # stopped with every sample in its band [t - band, t]
    assert 0 < moved < epochs and np.all(phi <= t) and np.all(phi >= t - band)
  elif drop < 30:
    assert 0 < moved < epochs and np.all(phi <= t)  # stopped by itself, every sample at target
  else:
    assert moved == epochs and np.any(phi > t)  # a sample still above target: never stopped


def _sga_steps(x, y, w, b, lr, max_loss, epochs):
  """sga_program (the loss threshold) on the same client: params, steps taken."""
  got, metrics = _run(sga.sga_program(APPLY, lr, max_loss=max_loss), _params(w, b), x, y, epochs)
  return got, round((1 - float(metrics["stopped"][0])) * epochs)


def test_stops_earlier_than_the_loss_threshold_when_the_target_is_confident():
  # Retrained models would still classify these samples (targets phi = 2 > 0): the
  # calibrated rule stops there, the loss threshold (log K) ascends on to misclassification.
  x, y, w, b = _setup()
  t = np.full(N, 2.0, np.float32)
  epochs = 60
  cal, metrics = _run(sga.calibrated_program(APPLY, 0.5), _params(w, b), x, (y, t), epochs)
  cal_steps = round(float(metrics["moved"][0]) * epochs)
  ref, sga_steps = _sga_steps(x, y, w, b, 5.0, math.log(K), epochs)
  phi_cal = _np_phi(x @ cal["Dense_0"]["kernel"] + cal["Dense_0"]["bias"], y)
  phi_sga = _np_phi(x @ ref["Dense_0"]["kernel"] + ref["Dense_0"]["bias"], y)
  assert 0 < cal_steps < sga_steps < epochs
  assert np.all(phi_cal > 0) and np.all(phi_cal <= t)  # still right, no more confident
  # the loss rule misclassifies samples a retrained model would still get right (and,
  # CE ascent being uneven, leaves another more confident than its target)
  assert np.sum(phi_sga < 0) >= 2 and np.any(phi_sga > t)


def test_continues_where_the_loss_threshold_stops():
  # One sample is already misclassified (a large CE), so the batch loss exceeds log K
  # before the first step and the loss rule never moves; the other samples are still far
  # above their targets, and the calibrated rule brings them down.
  x, y, w, b = _setup()
  y_bad = y.copy()
  y_bad[0] = (y[0] + 1) % K
  phi0 = _np_phi(x.astype(np.float64) @ w + b, y_bad)
  assert -np.mean(np.log(1 / (1 + np.exp(-phi0)))) > math.log(K) > 0  # loss over threshold
  t = np.where(np.arange(N) == 0, phi0 - 1, phi0 - 1.5).astype(np.float32)
  epochs = 40
  _, sga_steps = _sga_steps(x, y_bad, w, b, 0.5, math.log(K), epochs)
  cal, metrics = _run(sga.calibrated_program(APPLY, 0.5), _params(w, b), x, (y_bad, t), epochs)
  cal_steps = round(float(metrics["moved"][0]) * epochs)
  phi = _np_phi(x @ cal["Dense_0"]["kernel"] + cal["Dense_0"]["bias"], y_bad)
  assert sga_steps == 0 < cal_steps < epochs
  assert np.all(phi <= t) and np.all(phi[1:] > t[1:] - 1.0)  # at their targets, not far past


def test_projection_keeps_the_ball():
  x, y, w, b = _setup()
  t = np.full(N, -20.0, np.float32)  # never reached: only the ball bounds the descent
  got, _ = _run(
    sga.calibrated_program(APPLY, 1.0, project=True),
    _params(w, b),
    x,
    (y, t),
    20,
    extra=jnp.full((1,), 0.7, jnp.float32),
  )
  delta = np.concatenate(
    [(got["Dense_0"]["kernel"] - w).ravel(), (got["Dense_0"]["bias"] - b).ravel()]
  )
  assert np.linalg.norm(delta) == pytest.approx(0.7, rel=1e-4)


def test_calibration_split_lies_outside_the_training_data():
  ds = data.load_dataset("digits", seed=0)
  sub, (xc, yc) = data.split_calibration(ds, 600, 100, seed=0)
  plain = data.subsample_train(ds, 600, seed=0)
  np.testing.assert_array_equal(sub.x_train, plain.x_train)  # training data unchanged
  np.testing.assert_array_equal(sub.y_train, plain.y_train)
  assert len(yc) == 100 and np.bincount(yc, minlength=10).min() >= 9  # stratified
  flat = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}
  assert not flat(xc) & flat(sub.x_train) and not flat(xc) & flat(ds.x_test)
  # the whole training split: carved off it, the clients hold the rest
  whole, (xw, yw) = data.split_calibration(ds, 0, 100, seed=0)
  assert len(whole.y_train) == len(ds.y_train) - 100 and len(yw) == 100
  assert not flat(xw) & flat(whole.x_train)
  assert data.split_calibration(ds, 600, 0, seed=0)[1] is None
  with pytest.raises(ValueError, match="outside"):
    data.split_calibration(ds, 600, len(ds.y_train), seed=0)


def test_calibration_size_enters_the_cache_key_only_when_carved():
  c = digits.get_config()
  c.data.train_size = 600
  key = lambda cfg: caches.config_hash(caches.training_config(cfg, "fedavg"))
  a = key(c)
  c.unlearn.calibration_size = 100
  assert key(c) == a  # drawn outside the subsample: the trained model is the same
  c.data.train_size = 0
  b = key(c)
  c.unlearn.calibration_size = 0
  assert key(c) != b  # carved off the training data: another model


def test_calibrated_stop_needs_a_calibration_split():
  c = digits.get_config()
  c.sga.stop = "calibrated"
  with pytest.raises(ValueError, match="calibration_size"):
    sga.validate(c)
  c.sga.stop = "threshold"
  with pytest.raises(ValueError, match="sga.stop='threshold'"):
    sga.validate(c)


def test_frontier_writes_a_png(tmp_path):
  rows = [
    dict(
      method="retrain",
      ulira_auc=0.54,
      ulira_auc_ci=(0.5, 0.58),
      speedup=1.0,
      test_acc=0.96,
      null_ci=(0.5, 0.58),
    ),
    dict(
      method="sga", ulira_auc=0.72, ulira_auc_ci=None, speedup=30.0, test_acc=0.95, null_ci=None
    ),
  ]
  path = os.path.join(tmp_path, "frontier.png")
  frontier.write_frontier(rows, path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="speed-up"):
    frontier.write_frontier([dict(rows[1], speedup=0.0)], path)


@pytest.mark.slow
def test_sga_calibrated_end_to_end(tmp_path):
  c = digits.get_config()
  c.fl.rounds, c.data.num_clients, c.checkpoint_every, c.eval_every = 4, 3, 100, 100
  c.data.train_size = 600
  c.model.name = "mlp"
  c.mia.enabled = False
  c.method = "sga"
  c.unlearn.kind, c.unlearn.forget_client, c.unlearn.forget_fraction = "samples", 0, 0.1
  c.unlearn.calibration_size = 100
  c.sga.stop = "calibrated"
  res = pretrain_cache.run(c, str(tmp_path))
  assert res["sga_max_loss"] is None and res["sga_target_clients"] == [0]
  assert res["test_acc"] >= res["original"]["test_acc"] - 0.03
  # the targets are held-out confidences of a model at ~95% test accuracy, so the
  # forgotten samples stay mostly classified (zero accuracy is not the goal)
  assert res["forget_train_acc"] >= 0.6
  # The method sga_calibrated is this run under its own name: the same numbers.
  c.method = "sga_calibrated"
  named = pretrain_cache.run(c, str(tmp_path))
  for k in ("test_acc", "forget_train_acc", "forget_train_loss", "sga_mean_target"):
    assert named[k] == res[k], k
  # Without a calibration split it is refused with the reason (and --method=all skips it).
  c.unlearn.calibration_size = 0
  c.sga.stop = "loss"  # sga's own setting: the method itself takes the calibrated rule
  with pytest.raises(base.Unservable, match="unlearn.calibration_size > 0"):
    methods_lib.get("sga_calibrated").check(task_lib.build_task(c))


def test_calibration_size_is_validated_against_the_pool():
  c = digits.get_config()
  c.method = "sga"
  c.data.train_size = 600
  c.unlearn.calibration_size = 800  # digits: 1,347 training images, 747 outside the subsample
  with pytest.raises(ValueError, match=r"calibration_size=800: allowed 0..747"):
    validation.validate(c, "sga", 10, num_train=1347)
  c.unlearn.calibration_size = 747
  validation.validate(c, "sga", 10, num_train=1347)
  c.unlearn.calibration_size = -1
  with pytest.raises(ValueError, match="calibration_size=-1"):
    validation.validate(c, "sga", 10, num_train=1347)
