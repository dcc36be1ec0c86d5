"""FedEraser (fu_jax/methods/federaser.py): the trainer's model and store, the calibration
formula against numpy, the unlearning loop against a numpy replay, refusals, and end-to-end
runs on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import caches, validation
from experiments import env as env_lib
from experiments import run as run_lib
from experiments import task as task_lib
from fu_jax import tree as tu
from fu_jax.methods import federaser
from tests import pretrain_cache
from tests.test_sga import small_config as _small_config


def small_config(method, **overrides):
  return _small_config(method, **{"unlearn.kind": "client", **overrides})


def one_class_per_client(method, **overrides):
  return small_config(
    method,
    **{
      "data.partition": "shards",
      "data.classes_per_client": 1,
      "data.num_clients": 10,
      "unlearn.kind": "class",
      **overrides,
    },
  )


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


@pytest.mark.slow
def test_trainer_equals_fedavg_and_stores_its_rounds(tmp_path):
  cfg = small_config("federaser", **{"federaser.interval": 1})
  task = task_lib.build_task(cfg)
  plain, _ = caches.pretrained(task, str(tmp_path), "fedavg")
  got, _ = caches.pretrained(task, str(tmp_path), "federaser")
  np.testing.assert_array_equal(_flat(got.params), _flat(plain.params))  # bit-identical
  store = got.kept
  np.testing.assert_array_equal(np.asarray(store.rounds), [0, 1, 2, 3])
  assert np.asarray(store.active).all()
  np.testing.assert_array_equal(np.asarray(store.clients), np.tile(np.arange(5), (4, 1)))
  # The stored global models and updates replay the training: M^{t+1} = M^t + mean_k n_k U_k.
  counts = np.asarray(task.clients.count, np.float32)
  nxt = [jax.tree.map(lambda a, t=t: a[t], store.globals) for t in range(1, 4)] + [got.params]
  for t in range(4):
    g = jax.tree.map(lambda a, t=t: a[t], store.globals)
    u = jax.tree.map(lambda a, t=t: a[t], store.updates)
    step = (
      np.einsum(
        "k,kd->d", counts, np.stack([_flat(jax.tree.map(lambda a, i=i: a[i], u)) for i in range(5)])
      )
      / counts.sum()
    )
    np.testing.assert_allclose(_flat(g) + step, _flat(nxt[t]), rtol=1e-5, atol=1e-6)
  # A second call restores the cached store from the checkpoint.
  again, _ = caches.pretrained(task, str(tmp_path), "federaser")
  for a, b in zip(jax.tree.leaves(again.kept), jax.tree.leaves(store)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert federaser.store_bytes(store)["stored_update_bytes"] == 4 * 5 * tu.tree_num_bytes(
    got.params
  )


@pytest.mark.slow
def test_interval_stores_every_kth_round(tmp_path):
  cfg = small_config("federaser", **{"federaser.interval": 3})
  task = task_lib.build_task(cfg)
  got, _ = caches.pretrained(task, str(tmp_path), "federaser")
  np.testing.assert_array_equal(np.asarray(got.kept.rounds), [0, 3])


def test_calibrated_updates_against_numpy():
  rng = np.random.RandomState(0)
  old = {"a": rng.randn(3, 4, 2).astype(np.float32), "b": rng.randn(3, 5).astype(np.float32)}
  cal = {"a": rng.randn(3, 4, 2).astype(np.float32), "b": rng.randn(3, 5).astype(np.float32)}
  cal["b"][1] = 0.0  # a layer whose calibration update vanished
  got = federaser.calibrated_updates(old, cal)
  for k in ("a", "b"):
    for i in range(3):
      o, c = old[k][i].astype(np.float64), cal[k][i].astype(np.float64)
      want = np.zeros_like(c) if not c.any() else np.linalg.norm(o) * c / np.linalg.norm(c)
      np.testing.assert_allclose(np.asarray(got[k][i]), want, rtol=1e-5, atol=1e-7)
  w = jnp.asarray([1.0, 2.0, 5.0])
  mean = federaser.combine_updates(old, cal, w, "mean")
  for k in ("a", "b"):
    mo = np.tensordot(np.asarray(w), old[k], 1) / 8.0
    mc = np.tensordot(np.asarray(w), cal[k], 1) / 8.0
    np.testing.assert_allclose(
      np.asarray(mean[k]), np.linalg.norm(mo) * mc / np.linalg.norm(mc), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
  "epochs, ratio, want",
  [
    (1, 0.5, (1, 0.5)),
    (1, 1.0, (1, 1.0)),
    (4, 0.5, (2, 1.0)),
    (5, 0.5, (3, 5 / 6)),
    (2, 0.25, (1, 0.5)),
  ],
)
def test_calib_schedule(epochs, ratio, want):
  got = federaser.calib_schedule(epochs, ratio)
  assert got[0] == want[0] and got[1] == pytest.approx(want[1])
  assert got[0] * got[1] == pytest.approx(epochs * ratio)


def test_bad_settings_name_the_key():
  c = small_config("federaser", **{"federaser.calib_ratio": 0.0})
  with pytest.raises(ValueError, match=r"federaser.calib_ratio=0.0: must be in \(0, 1\]"):
    federaser.validate(c)
  c = small_config("federaser", **{"federaser.interval": 5})
  with pytest.raises(ValueError, match=r"federaser.interval=5: allowed 1..fl.rounds=4"):
    federaser.validate(c)


def test_refusals_are_one_line(tmp_path):
  # client_class: refused through the method's kinds.
  with pytest.raises(validation.ConfigError, match="cannot serve unlearn.kind='client_class'"):
    validation.validate(small_config("federaser", **{"unlearn.kind": "client_class"}), "federaser")
  # class: IID clients all hold class 0, so no single client can be removed for it.
  with pytest.raises(
    ValueError,
    match=r"exactly one client holds the class, but classes "
    r"\[0\] are held by clients \[0, 1, 2, 3, 4\]",
  ):
    run_lib.run(small_config("federaser", **{"unlearn.kind": "class"}), str(tmp_path))


@pytest.mark.slow
def test_class_in_one_class_per_client_setting(tmp_path):
  runs = {
    m: pretrain_cache.run(one_class_per_client(m), str(tmp_path))
    for m in ("retrain", "fedavg", "federaser")
  }
  fe, noop, ref = runs["federaser"], runs["fedavg"], runs["retrain"]
  assert noop["forget_acc"] >= 0.5
  assert fe["forget_acc"] <= 0.1 and fe["forget_train_acc"] <= 0.1  # beyond the no-op
  assert abs(fe["retain_acc"] - ref["retain_acc"]) <= 0.1  # utility near retrain
  # 4 stored rounds; rounds 1..3 calibrate the 9 remaining clients (download + upload).
  model_bytes = fe["stored_model_bytes"] // 4
  assert fe["rounds"] == 4 and fe["federaser_stored_rounds"] == 4
  assert fe["bytes_up"] == fe["bytes_down"] == 3 * 9 * model_bytes
  assert fe["stored_update_bytes"] == 4 * 10 * model_bytes
  assert fe["federaser_calib_epochs"] == 1 and fe["federaser_calib_fraction"] == 0.5
  assert fe["federaser_removed_examples"] == fe["federaser_forget_examples"]


class _RecordingRunner:
  """A ClientRunner that keeps (start params, data valid mask, result params) of every run."""

  def __init__(self, runner, calls):
    self._runner, self._calls = runner, calls

  def __getattr__(self, name):
    return getattr(self._runner, name)

  def run(self, server_params, data, valid, extra, keys):
    res = self._runner.run(server_params, data, valid, extra, keys)
    self._calls.append((server_params, np.asarray(valid), res.params))
    return res


@pytest.mark.slow
@pytest.mark.parametrize("combine", ["client", "mean"])
def test_unlearning_replays_calibrated_updates(tmp_path, combine):
  # The unlearning loop against a numpy replay of the docstring's formula, from the stored
  # updates U and the method's own calibration results (recorded at its runner):
  #   M~0 = M0;  M~1 = M~0 + lr * mean_k n_k U_k^0  (round 0: exact, no calibration);
  #   j >= 1: calibration from M~j (not the stored Mj), U~_k = theta_k - M~j,
  #   'client': M~j+1 = M~j + lr * mean_k n_k ||U_k^j||_l U~_k / ||U~_k||_l   per leaf l;
  #   'mean':   the same with the means of U and U~ in place of each client's.
  # An uncalibrated replay (M~j+1 = M~j + lr * mean_k n_k U_k^j) reproduces the trained
  # model without client 0's steps and fails here.
  cfg = small_config("federaser", **{"federaser.combine": combine})
  wd = str(tmp_path)
  pretrain_cache.pretrain(cfg, wd)
  task = task_lib.build_task(cfg)
  trained, _ = caches.pretrained(task, wd, "federaser")  # the cached model and store
  env = env_lib.RunEnv(task, str(tmp_path / "unlearn"), {"combine": combine})
  calls = []
  make_runner = env.runner
  env.runner = lambda *a, **kw: _RecordingRunner(make_runner(*a, **kw), calls)
  out = federaser.METHODS["federaser"].unlearn(task, env, trained)
  env.logger.close()

  store = trained.kept
  gone = cfg.unlearn.forget_client
  counts = np.asarray(task.clients.count, np.float64)
  lr = float(cfg.fl.server_lr)
  num_rounds = len(np.asarray(store.rounds))
  assert num_rounds == 4 and len(calls) == num_rounds - 1  # rounds 1..3 calibrate
  leaves = lambda t: [np.asarray(a, np.float64) for a in jax.tree.leaves(t)]
  params = leaves(jax.tree.map(lambda a: a[0], store.globals))
  for j in range(num_rounds):
    clients = np.asarray(store.clients)[j]
    keep = clients != gone
    w = counts[clients[keep]] / counts[clients[keep]].sum()
    old = [u[j][keep] for u in leaves(store.updates)]
    if j == 0:
      new = [np.tensordot(w, o, 1) for o in old]
    else:
      start, valid, theta = calls[j - 1]
      for a, b in zip(leaves(start), params):  # calibration starts from M~j
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      stored = leaves(jax.tree.map(lambda a, j=j: a[j], store.globals))
      assert max(np.abs(a - b).max() for a, b in zip(stored, params)) > 1e-3  # not Mj
      assert valid.shape[0] == keep.sum()  # the remaining clients only
      cal = [t - p[None] for t, p in zip(leaves(theta), params)]
      if combine == "mean":
        old = [np.tensordot(w, o, 1)[None] for o in old]
        cal = [np.tensordot(w, c, 1)[None] for c in cal]
      new = []
      for o, c in zip(old, cal):
        axes = tuple(range(1, o.ndim))
        no = np.sqrt(np.sum(o**2, axis=axes, keepdims=True))
        nc = np.sqrt(np.sum(c**2, axis=axes, keepdims=True))
        assert np.all(nc > 0)
        scaled = no * c / nc
        new.append(scaled[0] if combine == "mean" else np.tensordot(w, scaled, 1))
    params = [p + lr * n for p, n in zip(params, new)]
  got = leaves(out.params)
  for a, b in zip(got, params):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The replay without calibration lands elsewhere: the check above can tell them apart.
  plain = leaves(jax.tree.map(lambda a: a[0], store.globals))
  for j in range(num_rounds):
    clients = np.asarray(store.clients)[j]
    keep = clients != gone
    w = counts[clients[keep]] / counts[clients[keep]].sum()
    plain = [p + lr * np.tensordot(w, u[j][keep], 1) for p, u in zip(plain, leaves(store.updates))]
  assert max(np.abs(a - b).max() for a, b in zip(got, plain)) > 1e-3
