"""SGA baseline (fu_jax/methods/sga.py): the ascent program against fu_jax.ascent, and
end-to-end runs on digits."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments.configs import digits
from fu_jax import ascent, fl, models
from fu_jax.methods import sga
from tests import pretrain_cache

K = 3


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(K)(jnp.tanh(nn.Dense(4)(x)))


MODULE = TinyMLP()
APPLY = models.logits_fn(MODULE)  # (params, x) -> logits


@functools.lru_cache(maxsize=None)
def _setup():
  rng = np.random.RandomState(0)
  x = rng.randn(2, 8, 2).astype(np.float32)
  y = rng.randint(0, K, (2, 8)).astype(np.int32)
  valid = np.array([[True] * 6 + [False] * 2, [True] * 4 + [False] * 4])
  x[~valid] = 30.0
  params = jax.jit(MODULE.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
  keys = jnp.stack([jax.random.key(1), jax.random.key(2)])
  return params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid), keys


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("radius, max_loss", [(None, None), (0.3, 1.3)])
def test_program_equals_ascent_sga_epoch_full_batch(radius, max_loss):
  # With one batch per epoch the batch order does not matter: 4 epochs of the runner-driven
  # program must equal 4 calls of ascent.sga_epoch (its lax.scan implementation).
  params, x, y, valid, keys = _setup()
  lr = 0.5
  prog = sga.sga_program(APPLY, lr, project=radius is not None, max_loss=max_loss)
  extra = None if radius is None else jnp.full((2,), radius, jnp.float32)
  got = (
    fl.ClientRunner(prog, kind="vmap", epochs=4, batch_size=8)
    .run(params, (x, y), valid, extra, keys)
    .params
  )
  step = jax.jit(functools.partial(ascent.sga_epoch, APPLY, lr=lr, batch_size=8, max_loss=max_loss))
  for c in range(2):
    p = params
    for e in range(4):
      kw = {} if radius is None else {"ref_params": params, "radius": radius}
      p_next = step(p, x[c], y[c], valid[c], key=jax.random.key(e), **kw)
      if max_loss is not None:  # sga_epoch's stop lasts one call; the program's for good
        logits = MODULE.apply({"params": p}, x[c])
        loss = -jnp.mean(
          jnp.take_along_axis(jax.nn.log_softmax(logits), y[c][:, None], 1)[valid[c]]
        )
        if loss > max_loss:
          break
      p = p_next
    np.testing.assert_allclose(
      _flat(jax.tree.map(lambda a: a[c], got)), _flat(p), rtol=1e-5, atol=1e-6
    )
    if radius is not None:
      dist = np.linalg.norm(_flat(jax.tree.map(lambda a: a[c], got)) - _flat(params))
      assert dist <= radius + 1e-5


@pytest.mark.slow
def test_program_ascends_the_loss():
  params, x, y, valid, keys = _setup()
  got = (
    fl.ClientRunner(sga.sga_program(APPLY, 0.2), kind="loop", epochs=2, batch_size=3)
    .run(params, (x, y), valid, None, keys)
    .params
  )

  def loss(p, c):
    logp = jax.nn.log_softmax(MODULE.apply({"params": p}, x[c]))
    return -float(jnp.mean(jnp.take_along_axis(logp, y[c][:, None], 1)[valid[c]]))

  for c in range(2):
    assert loss(jax.tree.map(lambda a: a[c], got), c) > loss(params, c) + 0.05


def test_bad_settings_name_the_key():
  c = digits.get_config()
  c.sga.lr = 0.0
  with pytest.raises(ValueError, match="sga.lr"):
    sga.validate(c)
  c = digits.get_config()
  c.sga.old_labels = "clean"
  with pytest.raises(ValueError, match="sga.old_labels='clean'"):
    sga.validate(c)


def small_config(method, **overrides):
  c = digits.get_config()
  c.fl.rounds, c.data.num_clients, c.checkpoint_every, c.eval_every = 4, 5, 100, 100
  c.model.name = "mlp"
  c.mia.enabled = False
  c.method = method
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.slow
def test_sga_client_class_with_backdoor(tmp_path):
  res = pretrain_cache.run(
    small_config("sga", **{"unlearn.kind": "client_class", "backdoor.enabled": True}), str(tmp_path)
  )
  # The ascent on client 0's triggered class-0 samples (flipped labels) breaks the backdoor:
  # those samples (scored as trained: trigger, flipped label) no longer get the flipped label.
  assert res["original"]["forget_train_acc"] >= 0.8
  assert res["forget_train_acc"] <= 0.2
  assert res["bd_acc"] <= 0.1 < 0.8 <= res["bd_acc_before"]
  assert abs(res["test_acc"] - res["original"]["test_acc"]) <= 0.05
  assert res["rounds"] == 1 + small_config("sga").sga.recovery_rounds
  assert res["sga_stop"] == "loss"  # stop='auto' keeps the loss rule but for a class request
  assert res["sga_target_clients"] == [0]
  assert res["sga_max_loss"] == pytest.approx(math.log(10))


@pytest.mark.slow
def test_sga_class_wide_lowers_forget_accuracy(tmp_path):
  res = pretrain_cache.run(small_config("sga", **{"unlearn.kind": "class"}), str(tmp_path))
  assert res["sga_stop"] == "normalized" and res["sga_max_loss"] == 5.0
  assert res["sga_target_clients"] == [0, 1, 2, 3, 4]
  assert res["original"]["forget_train_acc"] >= 0.9
  assert res["forget_train_acc"] <= 0.2
  assert res["forget_acc"] <= 0.2
  assert res["retain_acc"] >= res["original"]["retain_acc"] - 0.1


def test_normalized_program_takes_steps_of_length_lr():
  # normalize: theta + lr g / ||g|| with g the batch gradient; one full-batch epoch is one
  # step, so each client's model moves by exactly lr (L2) along its own gradient.
  params, x, y, valid, keys = _setup()
  lr = 0.05
  prog = sga.sga_program(APPLY, lr, normalize=True)
  got = fl.ClientRunner(prog, kind="loop", epochs=1, batch_size=8).run(
    params, (x, y), valid, None, keys
  )
  for c in range(2):

    def loss(p, c=c):
      logp = jax.nn.log_softmax(MODULE.apply({"params": p}, x[c]))
      return -jnp.mean(jnp.take_along_axis(logp, y[c][:, None], 1)[valid[c]])

    g = _flat(jax.grad(loss)(params))
    moved = _flat(jax.tree.map(lambda a: a[c], got.params)) - _flat(params)
    np.testing.assert_allclose(np.linalg.norm(moved), lr, rtol=1e-5)
    np.testing.assert_allclose(moved, lr * g / np.linalg.norm(g), rtol=1e-4, atol=1e-7)
