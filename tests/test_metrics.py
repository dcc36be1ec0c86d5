"""Tests for fu_jax.metrics: accuracy, membership inference, backdoor."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fu_jax import metrics, models
from fu_jax.metrics import accuracy as acc_lib
from fu_jax.metrics import backdoor, mia


def identity_apply(params, x):
  """A 'model' whose input rows are its logits: exact hand-made cases."""
  del params
  return x


def manual_ce(logits, y):
  out = []
  for row, label in zip(np.asarray(logits, np.float64), y):
    out.append(math.log(sum(math.exp(v) for v in row)) - row[label])
  return np.array(out)


# ---------------------------------------------------------------- accuracy


LOGITS = np.array(
  [
    [3.0, 0.0, 0.0],  # y=0 ok
    [0.0, 2.0, 0.0],  # y=0 wrong
    [0.0, 5.0, 1.0],  # y=1 ok
    [1.0, 4.0, 0.0],  # y=1 ok
    [0.0, 0.0, 1.0],  # y=2 ok
    [2.0, 0.0, 1.0],  # y=2 wrong
    [0.0, 1.0, 3.0],  # y=2 ok
  ],
  np.float32,
)
LABELS = np.array([0, 0, 1, 1, 2, 2, 2], np.int32)


def test_evaluate_hand_made_logits():
  r = metrics.evaluate(identity_apply, {}, LOGITS, LABELS, 3, forget_classes=[2])
  assert r["test_acc"] == pytest.approx(5 / 7)
  assert r["retain_acc"] == pytest.approx(3 / 4)
  assert r["forget_acc"] == pytest.approx(2 / 3)
  assert r["per_class_acc"] == pytest.approx([1 / 2, 1.0, 2 / 3])
  assert r["test_loss"] == pytest.approx(manual_ce(LOGITS, LABELS).mean(), rel=1e-6)
  for k, v in r.items():  # JSON-ready: plain python floats
    assert all(type(e) is float for e in (v if isinstance(v, list) else [v])), k


def test_evaluate_several_and_no_forget_classes():
  r = metrics.evaluate(identity_apply, {}, LOGITS, LABELS, 3, forget_classes=(0, 2))
  assert r["retain_acc"] == pytest.approx(1.0)
  assert r["forget_acc"] == pytest.approx(3 / 5)
  r = metrics.evaluate(identity_apply, {}, LOGITS, LABELS, 3, forget_classes=[])
  assert math.isnan(r["forget_acc"])
  assert r["retain_acc"] == r["test_acc"]
  r = metrics.evaluate(identity_apply, {}, LOGITS, LABELS, 3, forget_classes=[0, 1, 2])
  assert math.isnan(r["retain_acc"]) and r["forget_acc"] == r["test_acc"]


def test_evaluate_rejects_bad_classes():
  with pytest.raises(ValueError, match="forget_classes"):
    metrics.evaluate(identity_apply, {}, LOGITS, LABELS, 3, forget_classes=[3])
  with pytest.raises(ValueError, match="labels"):
    metrics.evaluate(identity_apply, {}, LOGITS, LABELS + 1, 3, forget_classes=[])


def test_per_class_accuracy_absent_class():
  y = np.array([0, 0, 2, 2, 2, 3])
  preds = np.array([0, 1, 2, 2, 0, 3])
  pc = metrics.per_class_accuracy(preds, y, 5)
  assert pc.shape == (5,)
  np.testing.assert_allclose(pc[[0, 2, 3]], [0.5, 2 / 3, 1.0])
  assert np.isnan(pc[1]) and np.isnan(pc[4])
  logits = np.eye(5, dtype=np.float32)[preds]
  np.testing.assert_array_equal(metrics.per_class_accuracy(logits, y, 5), pc)
  # Cross-check against a per-class loop.
  for c in (0, 2, 3):
    assert pc[c] == pytest.approx(acc_lib.accuracy(preds[y == c], y[y == c]))


def test_loss_from_logits_keeps_tiny_losses():
  logits = np.array(
    [[60.0, 0.0, 0.0], [40.0, 0.0, 1.0], [0.0, 3.0, -2.0], [1e3, -1e3, 0.0]], np.float32
  )
  y = np.array([0, 0, 2, 1])
  loss = acc_lib.loss_from_logits(logits, y)
  assert loss.dtype == np.float64
  np.testing.assert_allclose(
    loss[:2], [2 * math.exp(-60), math.exp(-40) + math.exp(-39)], rtol=1e-12
  )  # float32 cross-entropy gives exactly 0 for both
  np.testing.assert_allclose(loss[2], manual_ce(logits[2:3], y[2:3]), rtol=1e-12)
  assert loss[3] == pytest.approx(2e3)  # no overflow
  np.testing.assert_allclose(np.exp(acc_lib.log_softmax64(logits)).sum(-1), 1.0, rtol=1e-12)


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


@pytest.mark.slow
def test_batch_padding_invariance():
  model = TinyCNN()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, 5, 20).astype(np.int32)
  params = jax.jit(model.init)(jax.random.key(2), x[:1])["params"]  # eager init is slow
  full = np.asarray(jax.jit(model.apply)({"params": params}, x))  # one unpadded batch
  for bs in (7, 1024):  # 7: two full batches + a padded one; 1024: one batch padded to 32
    np.testing.assert_allclose(
      metrics.predict_logits(models.logits_fn(model), params, x, batch_size=bs),
      full,
      rtol=1e-5,
      atol=1e-6,
    )
  a = metrics.evaluate(models.logits_fn(model), params, x, y, 5, [1], batch_size=7)
  b = metrics.evaluate(models.logits_fn(model), params, x, y, 5, [1], batch_size=1024)
  assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
  for k in ("test_acc", "retain_acc", "forget_acc"):
    assert a[k] == b[k]
  np.testing.assert_allclose(
    metrics.per_example_loss(models.logits_fn(model), params, x, y, batch_size=7),
    manual_ce(full, y),
    rtol=1e-5,
  )


def test_predict_logits_compiles_few_shapes():
  seen = set()

  def apply_fn(params, x):
    seen.add(x.shape[0])  # runs only when tracing, i.e. once per compiled shape
    return x * params["w"]

  params = {"w": jnp.float32(2.0)}
  for n in (1, 3, 5, 8, 13, 21, 30):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    np.testing.assert_array_equal(metrics.predict_logits(apply_fn, params, x, batch_size=8), 2 * x)
  assert seen == {1, 4, 8}  # n=1 -> 1, n=3 -> 4, everything else pads into batches of 8


# ---------------------------------------------------------------- membership inference


def pairwise_auc(m, o):
  wins = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a in m for b in o)
  return wins / (len(m) * len(o))


def test_loss_threshold_auc_extremes():
  rng = np.random.default_rng(0)
  members = rng.uniform(0, 1, 30)
  nonmembers = rng.uniform(1.5, 3, 70)  # unbalanced
  assert mia.loss_threshold_auc(members, nonmembers) == 1.0
  assert mia.loss_threshold_auc(nonmembers, members) == 0.0


def test_loss_threshold_auc_identical_distributions():
  rng = np.random.default_rng(0)
  auc = mia.loss_threshold_auc(rng.exponential(size=4000), rng.exponential(size=5000))
  assert abs(auc - 0.5) < 0.03


def test_loss_threshold_auc_matches_pairwise_count():
  m = np.array([0.1, 0.5, 0.5, 2.0, 0.3])
  o = np.array([0.5, 0.2, 1.0, 0.05, 3.0])  # includes ties with members
  assert mia.loss_threshold_auc(m, o) == pytest.approx(pairwise_auc(m, o))


def test_balance_deterministic_subset():
  a, b = np.arange(10), np.arange(100, 125)
  a1, b1 = mia.balance(a, b, seed=3)
  a2, b2 = mia.balance(a, b, seed=3)
  np.testing.assert_array_equal(a1, a)
  assert len(b1) == 10 and len(set(b1)) == 10 and set(b1) <= set(b)
  np.testing.assert_array_equal(b1, b2)
  assert not np.array_equal(b1, mia.balance(a, b, seed=4)[1])
  # The AUC of unbalanced sides is the pairwise AUC over all of them (no subsampling).
  rng = np.random.default_rng(1)
  m, o = rng.normal(size=10), rng.normal(size=25)
  assert mia.loss_threshold_auc(m, o) == pytest.approx(pairwise_auc(m, o))


def test_nonfinite_losses_give_nan():
  assert math.isnan(mia.loss_threshold_auc([0.1, np.nan], [1.0, 2.0]))
  assert math.isnan(mia.trained_attack_accuracy([0.1, np.inf], [1.0, 2.0], seed=0))
  with pytest.raises(ValueError, match="empty"):
    mia.loss_threshold_auc([], [1.0])


def test_trained_attack_accuracy():
  rng = np.random.default_rng(0)
  same = mia.trained_attack_accuracy(rng.exponential(size=1000), rng.exponential(size=1200), seed=0)
  assert 0.44 < same < 0.56
  members = np.exp(-rng.normal(6, 1, 300))  # memorised: tiny losses
  nonmembers = rng.gamma(4, 0.5, 300)
  assert mia.trained_attack_accuracy(members, nonmembers, seed=0) > 0.9
  assert mia.trained_attack_accuracy(members, nonmembers, seed=0) == mia.trained_attack_accuracy(
    members, nonmembers, seed=0
  )
  # Fewer samples than folds: folds drop to the per-side count.
  assert mia.trained_attack_accuracy([1e-6, 1e-5, 1e-7], [2.0, 3.0, 1.0], seed=0) == 1.0


def test_membership_inference_convenience():
  k = 4
  member_y = np.arange(12) % k
  nonmember_y = np.arange(10) % k
  member_x = 8.0 * np.eye(k, dtype=np.float32)[member_y]  # confident, correct
  nonmember_x = 1.0 * np.eye(k, dtype=np.float32)[(nonmember_y + 1) % k]  # unsure, wrong
  r = mia.membership_inference(
    identity_apply, {}, member_x, member_y, nonmember_x, nonmember_y, seed=0
  )
  assert set(r) == {"mia_auc", "mia_attack_acc"}
  assert r["mia_auc"] == 1.0 and r["mia_attack_acc"] == 1.0


D, H = 8, 64  # tiny MLP for the shadow attack: D inputs, H hidden units, 4 classes


def mlp_apply(p, x):
  return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mlp_train_fn(key, x, y, mask):
  """Overfits the masked rows: full-batch Adam, masked mean CE (masked rows contribute 0).

  Initialised from one normal draw: each jax.random call adds a threefry kernel, and
  compiling those (under vmap especially) dominated this test's runtime with flax init.
  """
  w = jax.random.normal(key, (D * H + H * 4,))
  params = {
    "w1": w[: D * H].reshape(D, H) / np.sqrt(D),
    "b1": jnp.zeros(H),
    "w2": w[D * H :].reshape(H, 4) / np.sqrt(H),
    "b2": jnp.zeros(4),
  }
  opt = optax.adam(1e-2)

  def loss(p):
    ce = optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, x), y)
    return jnp.sum(ce * mask) / jnp.sum(mask)

  def step(carry, _):
    p, s = carry
    updates, s = opt.update(jax.grad(loss)(p), s)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=300)
  return params


@pytest.mark.slow
def test_shadow_attack_detects_memorised_members():
  # Random labels: the only way to fit them is to memorise, so members stand out.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(320, 8)).astype(np.float32)
  y = rng.integers(0, 4, 320).astype(np.int32)
  shadow_x, shadow_y = x[:160], y[:160]
  tx, ty = x[160:], y[160:]  # target pool: first 80 members, last 80 non-members
  train_fn = jax.jit(mlp_train_fn)  # one compile serves the target and the looped shadows
  target_params = train_fn(jax.random.key(1), tx, ty, np.arange(160) < 80)
  args = (
    mlp_train_fn,
    mlp_apply,
    target_params,
    shadow_x,
    shadow_y,
    tx[:80],
    ty[:80],
    tx[80:],
    ty[80:],
  )

  r = mia.shadow_attack(*args, num_shadows=4, key=jax.random.key(2), vectorize=True)
  assert set(r) == {"mia_shadow_recall", "mia_shadow_nonmember_rate", "mia_shadow_attack_acc"}
  assert r["mia_shadow_attack_acc"] > 0.6
  assert r["mia_shadow_recall"] > r["mia_shadow_nonmember_rate"] + 0.3

  args = (train_fn,) + args[1:]
  loop = mia.shadow_attack(
    *args, num_shadows=2, key=jax.random.key(3), attack="logreg", use_label=True
  )
  assert loop["mia_shadow_recall"] > loop["mia_shadow_nonmember_rate"] + 0.3
  assert loop == mia.shadow_attack(
    *args, num_shadows=2, key=jax.random.key(3), attack="logreg", use_label=True
  )
  print(r, loop)


def test_shadow_split_masks_halves():
  masks = mia.shadow_split_masks(np.random.default_rng(0), 3, 11)
  assert masks.shape == (3, 11) and (masks.sum(1) == 5).all()
  assert not (masks[0] == masks[1]).all()
  np.testing.assert_array_equal(masks, mia.shadow_split_masks(np.random.default_rng(0), 3, 11))


def test_key_entropy_typed_and_legacy_keys():
  typed = mia.key_entropy(jax.random.key(7))
  assert typed == mia.key_entropy(jax.random.PRNGKey(7)) and len(typed) == 2
  assert typed != mia.key_entropy(jax.random.key(8))


def test_sorted_log_softmax_features():
  logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]], np.float32)
  f = mia.sorted_log_softmax(logits, np.array([0, 2]), top_k=2)
  logp = np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(f[:, :2], -np.sort(-logp, 1)[:, :2], rtol=1e-5)
  np.testing.assert_allclose(f[:, 2], [logp[0, 0], logp[1, 2]], rtol=1e-5)
  with pytest.raises(ValueError, match="top_k"):
    mia.sorted_log_softmax(logits, top_k=4)


# ---------------------------------------------------------------- backdoor


@pytest.mark.parametrize(
  "position,rows,cols",
  [
    ("bottom_right", slice(5, 8), slice(3, 6)),
    ("top_left", slice(0, 3), slice(0, 3)),
    ("bottom_left", slice(5, 8), slice(0, 3)),
    ((2, 1), slice(2, 5), slice(1, 4)),
  ],
)
def test_apply_trigger_modifies_only_patch(position, rows, cols):
  x = np.random.default_rng(0).normal(size=(4, 8, 6, 2)).astype(np.float32)
  trig = backdoor.Trigger(size=3, value=9.0, position=position)
  for out in (
    backdoor.apply_trigger(x, trig),
    np.asarray(backdoor.apply_trigger(jnp.asarray(x), trig)),
  ):
    assert out.shape == x.shape and out.dtype == x.dtype
    patch = np.zeros(x.shape, bool)
    patch[:, rows, cols, :] = True
    assert (out[patch] == 9.0).all()
    np.testing.assert_array_equal(out[~patch], x[~patch])
  assert not (x == 9.0).any()  # input untouched


def test_trigger_per_channel_value_and_errors():
  x = np.zeros((5, 5, 3), np.float32)  # a single image
  out = backdoor.apply_trigger(x, backdoor.Trigger(2, (1.0, 2.0, 3.0)))
  np.testing.assert_array_equal(out[3:, 3:], np.broadcast_to([1.0, 2.0, 3.0], (2, 2, 3)))
  assert out[:3].sum() == 0 and out[:, :3].sum() == 0
  assert backdoor.trigger_for(np.array([[-1.0, 4.5]]), size=2).value == 4.5
  with pytest.raises(ValueError, match="position"):
    backdoor.apply_trigger(x, backdoor.Trigger(2, 1.0, "middle"))
  with pytest.raises(ValueError, match="fit"):
    backdoor.apply_trigger(x, backdoor.Trigger(2, 1.0, (4, 0)))
  with pytest.raises(ValueError, match="size"):
    backdoor.apply_trigger(x, backdoor.Trigger(6, 1.0))
  with pytest.raises(ValueError, match="value"):
    backdoor.apply_trigger(x, backdoor.Trigger(2, (1.0, 2.0)))


def test_plant_backdoor_flips_only_given_indices():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, 4, 10).astype(np.int32)
  x0, y0 = x.copy(), y.copy()
  trig = backdoor.Trigger(2, 7.0)
  idx = np.array([1, 4, 7])
  xp, yp = backdoor.plant_backdoor(x, y, idx, trig, 3)
  np.testing.assert_array_equal(x, x0)  # inputs not mutated
  np.testing.assert_array_equal(y, y0)
  rest = np.setdiff1d(np.arange(10), idx)
  np.testing.assert_array_equal(xp[rest], x[rest])
  np.testing.assert_array_equal(yp[rest], y[rest])
  np.testing.assert_array_equal(xp[idx], backdoor.apply_trigger(x[idx], trig))
  assert (yp[idx] == 3).all() and yp.dtype == y.dtype
  # Shift flip and a bool mask select the same rows.
  mask = np.isin(np.arange(10), idx)
  xs, ys = backdoor.plant_backdoor(x, y, mask, trig, backdoor.Flip("shift", 1), num_classes=4)
  np.testing.assert_array_equal(xs, xp)
  np.testing.assert_array_equal(ys[idx], (y[idx] + 1) % 4)
  np.testing.assert_array_equal(ys[rest], y[rest])
  with pytest.raises(ValueError, match="num_classes"):
    backdoor.plant_backdoor(x, y, idx, trig, backdoor.Flip("shift", 1))
  with pytest.raises(ValueError, match="multiple"):
    backdoor.plant_backdoor(x, y, idx, trig, backdoor.Flip("shift", 4), num_classes=4)
  with pytest.raises(ValueError, match="indices"):
    backdoor.plant_backdoor(x, y, [10], trig, 3)


TRIGGER = backdoor.Trigger(size=2, value=5.0)
K = 4


def patch_detector(params, x):
  """Predicts class 3 when the bottom-right 2x2 patch is all 5.0, else class 0."""
  del params
  hit = jnp.all(x[:, -2:, -2:, :] == 5.0, axis=(1, 2, 3))
  return jax.nn.one_hot(jnp.where(hit, 3, 0), K)


def shift_detector(params, x):
  """Reads the true label from pixel (0, 0); predicts (y + 1) % K when triggered, else y."""
  del params
  y = x[:, 0, 0, 0].astype(jnp.int32)
  hit = jnp.all(x[:, -2:, -2:, :] == 5.0, axis=(1, 2, 3))
  return jax.nn.one_hot(jnp.where(hit, (y + 1) % K, y), K)


def test_backdoor_accuracy():
  y = np.array([0, 1, 1, 2, 3, 3, 1], np.int32)
  x = np.zeros((7, 5, 5, 1), np.float32)
  x[:, 0, 0, 0] = y
  asr = backdoor.backdoor_accuracy
  assert asr(patch_detector, {}, x, y, 1, TRIGGER, 3) == 1.0
  assert asr(patch_detector, {}, x, y, None, TRIGGER, 3) == 1.0
  assert math.isnan(asr(patch_detector, {}, x, y, 3, TRIGGER, 3))  # target's own class
  assert asr(identity_like_clean, {}, x, y, 1, TRIGGER, 3) == 0.0
  shift = backdoor.Flip("shift", 1)
  assert asr(shift_detector, {}, x, y, None, TRIGGER, shift, num_classes=K) == 1.0
  assert asr(patch_detector, {}, x, y, 2, TRIGGER, shift, num_classes=K) == 1.0  # 2 -> 3
  assert asr(patch_detector, {}, x, y, 1, TRIGGER, shift, num_classes=K) == 0.0  # 1 -> 2


def identity_like_clean(params, x):
  """A clean model: predicts the true label (pixel (0, 0)) and ignores the trigger."""
  del params
  return jax.nn.one_hot(x[:, 0, 0, 0].astype(jnp.int32), K)


def test_backdoor_end_to_end_planted_rows_are_detected():
  """plant_backdoor's triggered rows are exactly what the detector fires on."""
  x = np.zeros((6, 5, 5, 1), np.float32)
  y = np.zeros(6, np.int32)
  xp, yp = backdoor.plant_backdoor(x, y, [0, 2], TRIGGER, 3)
  preds = np.argmax(metrics.predict_logits(patch_detector, {}, xp), -1)
  np.testing.assert_array_equal(preds, yp)
