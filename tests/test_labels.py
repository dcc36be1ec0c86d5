"""Tests for fu_jax.labels (FedAF memory generator)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fu_jax import labels, models

K = 5


class TinyMLP(nn.Module):
  num_classes: int = K
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


_debias = jax.jit(labels.debias, static_argnames="scope")


def _data(b=6, d=4, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(b, d).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _teachers(q=3, seed=0):
  # Cached: compiling Flax init dominates this file's runtime on a loaded CPU.
  module = TinyMLP()
  return module, labels.init_teachers(module, jax.random.PRNGKey(seed), (4,), q)


def _softmax_np(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_init_teachers_shapes_determinism_and_distinct():
  module, tp = _teachers(q=3)
  shapes = jax.tree.map(lambda a: a.shape, tp)
  assert shapes == {
    "Dense_0": {"kernel": (3, 4, 8), "bias": (3, 8)},
    "Dense_1": {"kernel": (3, 8, K), "bias": (3, K)},
  }
  tp2 = labels.init_teachers(module, jax.random.PRNGKey(0), (4,), 3)
  for a, b in zip(jax.tree.leaves(tp), jax.tree.leaves(tp2)):
    np.testing.assert_array_equal(a, b)
  k = tp["Dense_0"]["kernel"]
  assert not np.allclose(k[0], k[1])
  # Biases keep Flax's zero init.
  np.testing.assert_array_equal(tp["Dense_0"]["bias"], 0.0)


def test_glorot_reinit_follows_xavier_uniform():
  # Conv kernel [3, 3, 16, 32]: fan_in = 9 * 16, fan_out = 9 * 32 (PyTorch/Flax convention).
  params = {
    "conv": {"kernel": jnp.zeros((3, 3, 16, 32)), "bias": jnp.ones((32,))},
    "dense": {"kernel": jnp.zeros((64, 48))},
  }
  new = jax.jit(labels.glorot_reinit)(params, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(new["conv"]["bias"], 1.0)
  for k, (fi, fo) in [(new["conv"]["kernel"], (144, 288)), (new["dense"]["kernel"], (64, 48))]:
    a = np.sqrt(6.0 / (fi + fo))
    k = np.asarray(k)
    assert np.abs(k).max() <= a + 1e-7
    assert np.abs(k).max() > 0.95 * a  # uniform fills the interval
    np.testing.assert_allclose(k.var(), a * a / 3.0, rtol=0.1)


@pytest.mark.parametrize("variant", labels.VARIANTS)
def test_rows_are_probability_vectors(variant):
  module, tp = _teachers()
  x = _data()
  y = labels.teacher_labels(
    models.logits_fn(module),
    tp,
    x,
    variant=variant,
    target_class=2,
    num_classes=K,
    key=jax.random.PRNGKey(3),
  )
  assert y.shape == (6, K)
  assert np.all(np.asarray(y) >= 0)
  np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, rtol=1e-6)


def test_uniform_and_random():
  y = labels.teacher_labels(None, None, _data(), variant="uniform", num_classes=K)
  np.testing.assert_array_equal(y, np.float32(1.0 / K))
  key = jax.random.PRNGKey(0)
  r1 = labels.teacher_labels(None, None, _data(6), variant="random", num_classes=K, key=key)
  r2 = labels.teacher_labels(None, None, _data(9), variant="random", num_classes=K, key=key)
  r3 = labels.teacher_labels(
    None, None, _data(6), variant="random", num_classes=K, key=jax.random.PRNGKey(1)
  )
  # Padding rows appended at the end leave the first rows' labels unchanged.
  np.testing.assert_array_equal(r1, r2[:6])
  assert not np.allclose(r1, r3)
  assert len({tuple(np.round(r, 6)) for r in np.asarray(r1)}) == 6
  # Dirichlet(1,...,1): each component has mean 1/K.
  big = jax.jit(labels.random_labels, static_argnums=(1, 2))(key, 4000, K)
  np.testing.assert_allclose(np.asarray(big).mean(0), 1.0 / K, atol=0.01)


def test_teacher_vmap_equals_loop_over_teachers():
  module, tp = _teachers(q=3)
  x = _data()
  got = labels.teacher_labels(models.logits_fn(module), tp, x, variant="teacher", num_classes=K)
  want = np.zeros((6, K))
  for q in range(3):
    p = jax.tree.map(lambda a: a[q], tp)
    want += _softmax_np(np.asarray(module.apply({"params": p}, x), np.float64))
  np.testing.assert_allclose(got, want / 3, rtol=1e-5, atol=1e-7)


def _biased_teachers(target):
  """Teachers whose output bias strongly favours `target`."""
  module, tp = _teachers(q=3)
  bias = tp["Dense_1"]["bias"].at[:, target].set(2.0)
  tp = {**tp, "Dense_1": {**tp["Dense_1"], "bias": bias}}
  return module, tp


def test_debias_replaces_target_weight_with_average_weight():
  target = 3
  module, tp = _biased_teachers(target)
  x = _data(8)
  p = np.asarray(
    labels.teacher_labels(models.logits_fn(module), tp, x, variant="teacher", num_classes=K),
    np.float64,
  )
  assert np.all(p[:, target] > 1.0 / K)  # the teachers favour the target class
  q = np.asarray(
    labels.teacher_labels(
      models.logits_fn(module), tp, x, variant="debias", target_class=target, num_classes=K
    ),
    np.float64,
  )
  # Eq. (4) with w = p_t / mean_k p_k (= K p_t): target -> p_t / w = 1/K, others unchanged,
  # then L1 renormalisation.
  want = p.copy()
  want[:, target] = p[:, target] / (p[:, target] / p.mean(-1))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(q, want, rtol=1e-5)
  z = 1.0 - p[:, target] + 1.0 / K
  np.testing.assert_allclose(q[:, target] * z, 1.0 / K, rtol=1e-5)
  others = [k for k in range(K) if k != target]
  np.testing.assert_allclose(q[:, others] * z[:, None], p[:, others], rtol=1e-5)
  assert np.all(q[:, target] < p[:, target])
  # Ratios among non-target classes are preserved; argmax moves away from the target.
  np.testing.assert_allclose(q[:, 0] / q[:, 1], p[:, 0] / p[:, 1], rtol=1e-5)


@pytest.mark.slow
def test_debias_per_example_targets_and_batch_scope():
  module, tp = _biased_teachers(1)
  x = _data(6)
  p = jax.jit(labels.teacher_probs, static_argnums=0)(models.logits_fn(module), tp, x)
  targets = jnp.array([0, 1, 2, 3, 4, 1])
  got = _debias(p, targets)
  for i, t in enumerate(np.asarray(targets)):
    np.testing.assert_allclose(got[i], _debias(p[i : i + 1], int(t))[0], rtol=1e-6)
  # Batch scope: one w = K * masked mean of p_target; the masked row does not count.
  mask = jnp.array([True] * 5 + [False])
  pn = np.asarray(p, np.float64)
  w = K * pn[:5, 1].mean()
  want = pn.copy()
  want[:, 1] /= w
  want /= want.sum(-1, keepdims=True)
  got_b = _debias(p, 1, scope="batch", mask=mask)
  np.testing.assert_allclose(got_b, want, rtol=1e-5)
  # So the batch mean of the pre-normalisation target weight equals 1/K exactly.
  np.testing.assert_allclose((pn[:5, 1] / w).mean(), 1.0 / K, rtol=1e-12)
  padded = _debias(
    jnp.concatenate([p[:5], jnp.full((3, K), 0.9)]),
    1,
    scope="batch",
    mask=jnp.array([True] * 5 + [False] * 3),
  )
  np.testing.assert_allclose(padded[:5], got_b[:5], rtol=1e-6)


def test_bad_inputs():
  module, tp = _teachers()
  x = _data()
  with pytest.raises(ValueError, match="uniform, random, teacher, debias"):
    labels.teacher_labels(models.logits_fn(module), tp, x, variant="soft", num_classes=K)
  with pytest.raises(ValueError, match="key"):
    labels.teacher_labels(None, None, x, variant="random", num_classes=K)
  with pytest.raises(ValueError, match="num_classes"):
    labels.teacher_labels(None, None, x, variant="uniform")
  with pytest.raises(ValueError, match="target_class"):
    labels.teacher_labels(models.logits_fn(module), tp, x, variant="debias", num_classes=K)
  with pytest.raises(ValueError, match="num_classes=7"):
    labels.teacher_labels(models.logits_fn(module), tp, x, variant="teacher", num_classes=7)
  with pytest.raises(ValueError, match="sample, batch"):
    _debias(jnp.full((2, K), 0.2), 0, scope="global")
  with pytest.raises(ValueError, match="num_teachers"):
    labels.init_teachers(TinyMLP(), jax.random.PRNGKey(0), (4,), 0)


def test_forgetting_loss_matches_numpy_and_ignores_padding():
  rng = np.random.RandomState(0)
  logits = rng.randn(5, K).astype(np.float32)
  y_new = _softmax_np(rng.randn(5, K)).astype(np.float32)
  y_true = np.array([0, 1, 2, 3, 4], np.int32)
  mask = np.array([1, 1, 1, 0, 1], bool)
  logp = np.log(_softmax_np(logits.astype(np.float64)))
  ce_new = -(y_new * logp).sum(-1)
  ce_true = -logp[np.arange(5), y_true]
  want = ce_new[mask].mean() - 0.5 * ce_true[mask].mean()
  got = labels.forgetting_loss(
    jnp.asarray(logits), jnp.asarray(y_new), jnp.asarray(y_true), jnp.asarray(mask), true_weight=0.5
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got1 = labels.forgetting_loss(
    jnp.asarray(logits[mask]),
    jnp.asarray(y_new[mask]),
    jnp.asarray(y_true[mask]),
    jnp.ones(4, bool),
    true_weight=0.5,
  )
  np.testing.assert_allclose(got1, got, rtol=1e-6)
