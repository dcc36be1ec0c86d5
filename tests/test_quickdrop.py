"""QuickDrop: the distilling local program, its pieces, and the method end to end on digits."""

import glob
import math
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import caches
from experiments import task as task_lib
from fu_jax import distill, fl, losses, models
from fu_jax.methods import quickdrop as qd
from fu_jax.methods import quickdrop_sets as qsets
from tests import pretrain_cache
from tests.test_experiments import small_config

K = 4


def _tiny():
  model = models.create("mlp", K, hidden=(8,))
  params = models.init_params(model, jax.random.key(0), (3, 3, 1))
  return model, params


def _batch(n=6, classes=(0, 1, 2)):
  x = jax.random.normal(jax.random.key(1), (n, 3, 3, 1))
  y = jnp.asarray([classes[i % len(classes)] for i in range(n)], jnp.int32)
  return fl.Batch(x, y, jnp.ones(n, bool))


def _syn(m=2):
  x = jax.random.normal(jax.random.key(2), (K, m, 3, 3, 1))
  y = jnp.repeat(jnp.arange(K, dtype=jnp.int32)[:, None], m, 1)
  return distill.SyntheticSet(x, y, jnp.ones((K, m), bool))


def _program(**kw):
  model, params = _tiny()
  opt = optax.sgd(0.1)
  img = distill.default_image_optimizer()
  prog = qd.distill_program(model, K, opt, img, **kw)
  syn = _syn()
  state = prog.init(params, (syn, img.init(syn.x)), jax.random.key(3))
  return model, params, prog, state


@pytest.mark.slow
def test_real_mode_takes_the_plain_fedavg_step_and_moves_only_batch_classes():
  model, params, prog, state = _program(model_update="real", distill_every=1)
  batch = _batch()
  new, metrics = jax.jit(prog.step)(state, batch, jax.random.key(4))
  # Independent computation: one SGD step on the masked-mean CE of the batch.
  loss, g = jax.value_and_grad(
    lambda p: losses.masked_ce(model.apply({"params": p}, batch.x), batch.y, batch.mask)
  )(params)
  want = jax.tree.map(lambda p, gg: p - 0.1 * gg, params, g)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
  moved = np.abs(np.asarray(new.syn.x - state.syn.x)).reshape(K, -1).max(1)
  assert (moved[:3] > 0).all() and moved[3] == 0.0  # class 3 is not in the batch
  assert float(metrics["match_loss"]) > 0


def _local_steps(prog, state, n):
  """n local steps as a runner takes them (fl.step_at picks the scheduled step)."""
  states, matches = [state], []
  for i in range(n):
    s, m = jax.jit(fl.step_at(prog, i))(states[-1], _batch(), jax.random.key(i))
    states.append(s)
    matches.append(float(m["match_loss"]))
  return states, matches


@pytest.mark.slow
def test_distill_every_skips_image_steps_but_not_model_steps():
  _, _, prog, state = _program(distill_every=2)
  (s0, s1, s2, s3), matches = _local_steps(prog, state, 3)
  assert not np.array_equal(s1.syn.x, s0.syn.x)
  np.testing.assert_array_equal(s2.syn.x, s1.syn.x)  # step 1: no image step
  assert not np.array_equal(s3.syn.x, s2.syn.x)  # step 2 distills again
  assert matches[1] == 0.0 < min(matches[0], matches[2])
  assert not np.array_equal(jax.tree.leaves(s2.params)[0], jax.tree.leaves(s1.params)[0])


def test_distill_every_zero_distills_on_the_first_step_only():
  _, _, prog, state = _program(distill_every=0)
  states, matches = _local_steps(prog, state, 3)
  assert not np.array_equal(states[1].syn.x, states[0].syn.x)
  np.testing.assert_array_equal(states[3].syn.x, states[1].syn.x)
  assert matches[0] > 0 and matches[1:] == [0.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loop", "vmap"])
def test_runner_takes_the_scheduled_distilling_step_on_each_client_s_first_step(kind):
  # Through the runner: 2 clients x 3 batches, one local epoch; distill_every=0 moves the
  # images once per client (as stepping by hand does), and the model as plain FedAvg does.
  model, params, prog, _ = _program(distill_every=0)
  img = distill.default_image_optimizer()
  n, per = 2, 12
  x = jax.random.normal(jax.random.key(7), (n, per, 3, 3, 1))
  y = jnp.tile(jnp.arange(per, dtype=jnp.int32) % 3, (n, 1))
  valid = jnp.ones((n, per), bool)
  syn = jax.tree.map(lambda a: jnp.stack([a] * n), _syn())
  extra = (syn, jax.vmap(img.init)(syn.x))
  keys = jax.random.split(jax.random.key(8), n)
  res = fl.ClientRunner(prog, kind=kind, epochs=1, batch_size=4).run(
    params, (x, y), valid, extra, keys
  )
  plain = fl.ClientRunner(
    fl.sgd_program(models.logits_fn(model), optax.sgd(0.1)), kind="loop", epochs=1, batch_size=4
  )
  want = plain.run(params, (x, y), valid, None, keys)
  for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  scheduled_step = jax.jit(prog.scheduled_step)  # one compilation for both clients
  for c in range(n):
    order = fl.epoch_order(jax.random.fold_in(keys[c], 0), valid[c])
    first = fl.take_batch((x[c], y[c]), valid[c], order, 0, 4)
    by_hand, _ = scheduled_step(
      prog.init(params, jax.tree.map(lambda a: a[c], extra), None), first, None
    )
    np.testing.assert_allclose(res.state.syn.x[c], by_hand.syn.x, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_used_chunks_runner_equals_the_uncut_run():
  # 3 clients whose sets use 1, 3 and all 6 of C = 6 one-image chunks (bucket width 2): the
  # grouped, cut run must give the uncut run's models, sets, momenta and metrics.
  model, params, prog, _ = _program(distill_every=0)
  img = distill.default_image_optimizer()
  n, per, c = 3, 12, 6
  x = jax.random.normal(jax.random.key(7), (n, per, 3, 3, 1))
  y = jnp.tile(jnp.arange(per, dtype=jnp.int32) % K, (n, 1))
  valid = jnp.ones((n, per), bool)
  used = np.array([1, 3, 6])
  sx = jax.random.normal(jax.random.key(9), (n, c, 1, 3, 3, 1))
  cls = jnp.tile(jnp.arange(c, dtype=jnp.int32) % K, (n, 1))[..., None]
  ok = jnp.asarray(np.arange(c)[None, :, None] < used[:, None, None])
  syn = distill.SyntheticSet(
    jnp.where(ok[..., None, None, None], sx, 0.0), jnp.where(ok, cls, 0), ok
  )  # empty chunks: class 0, as init_synthetic
  extra = (syn, jax.vmap(img.init)(syn.x))
  keys = jax.random.split(jax.random.key(8), n)
  inner = fl.ClientRunner(prog, kind="loop", epochs=1, batch_size=4)
  seen = []

  class Spy:  # records the set shapes the inner runner is given
    def run(self, server_params, data, valid, extra, keys):
      seen.append(extra[0].x.shape[:2])
      return inner.run(server_params, data, valid, extra, keys)

  cut = qsets.UsedChunksRunner(Spy())
  np.testing.assert_array_equal(qsets.chunks_in_use(syn), used)
  np.testing.assert_array_equal(cut.widths(syn), [2, 4, 6])
  want = inner.run(params, (x, y), valid, extra, keys)
  got = cut.run(params, (x, y), valid, extra, keys)
  assert sorted(seen) == [(1, 2), (1, 4), (1, 6)]
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = np.abs(np.asarray(got.state.syn.x - syn.x)).reshape(n, c, -1).max(-1) > 0
  assert moved[2].any() and not moved[0, 1:].any() and not moved[1, 3:].any()


@pytest.mark.slow
def test_synthetic_mode_steps_on_the_synthetic_set():
  model, params, prog, state = _program(model_update="synthetic")
  new, _ = jax.jit(prog.step)(state, _batch(), jax.random.key(0))
  sx, sy, sv = distill.flatten(new.syn)  # the set after this step's image update
  g = jax.grad(lambda p: losses.masked_ce(model.apply({"params": p}, sx), sy, sv))(params)
  want = jax.tree.map(lambda p, gg: p - 0.1 * gg, params, g)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_synthetic_masks_select_classes_and_client():
  # 3 clients x 4 chunks of 2; chunk classes differ per client, class 2 spans two chunks.
  n, m = 3, 2
  cls = np.array([[0, 2, 2, 3], [1, 2, 3, 3], [2, 2, 0, 1]])
  y = np.repeat(cls[..., None], m, -1)
  valid = np.ones((n, 4, m), bool)
  valid[1, 1, 1] = False
  syn = distill.SyntheticSet(
    jnp.zeros((n, 4, m, 3, 3, 1)), jnp.asarray(y, jnp.int32), jnp.asarray(valid)
  )
  got = np.asarray(qd.synthetic_masks(syn, (2, 3)))
  np.testing.assert_array_equal(got, valid & np.isin(y, (2, 3)))
  got = np.asarray(qd.synthetic_masks(syn, (2,), client=1))
  want = np.zeros_like(valid)
  want[1] = valid[1] & (y[1] == 2)
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_normalized_sga_moves_by_exactly_lr_and_ascends():
  model, params = _tiny()
  batch = _batch()
  loss_of = lambda p: float(
    losses.masked_ce(model.apply({"params": p}, batch.x), batch.y, batch.mask)
  )
  for normalize, lr in ((True, 0.3), (False, 0.5)):
    prog = fl.sgd_program(
      models.logits_fn(model), qd.sga_optimizer({"unlearn_normalize": normalize, "unlearn_lr": lr})
    )
    new, m = prog.step(prog.init(params, None, None), batch, None)
    assert loss_of(new.params) > loss_of(params) == pytest.approx(float(m["loss"]), rel=1e-5)
    step = np.sqrt(
      sum(
        float(np.sum((a - b) ** 2))
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params))
      )
    )
    g = jax.grad(loss_of_jax(model, batch))(params)
    gnorm = np.sqrt(sum(float(np.sum(x**2)) for x in jax.tree.leaves(g)))
    assert step == pytest.approx(lr if normalize else lr * gnorm, rel=1e-4)


@pytest.mark.slow
def test_synthetic_phases_clamp_the_batch_without_changing_the_step():
  """A phase over tiny synthetic sets runs with the batch clamped to the largest client's
  count (multiple of 8); each client still takes one step over all its images, so the
  clients' models equal those of the configured batch."""
  model, params = _tiny()
  cfg = small_config()
  cfg.fl.batch_size = 64
  task = types.SimpleNamespace(apply_fn=models.logits_fn(model), config=cfg)
  env = types.SimpleNamespace(
    runner=lambda p, e, b: fl.ClientRunner(p, kind="loop", epochs=e, batch_size=b)
  )
  phases = qd.unlearning_phases(task, env, qd.settings(cfg))
  assert phases.runner("sga", 6).batch_size == 8
  assert phases.runner("recovery", 13).batch_size == 16
  assert phases.runner("recovery", 100).batch_size == 64
  assert phases.runner("sga", 5) is phases.runner("sga", 8)  # built once per batch size
  n, m = 3, 24  # 3 clients, 24 slots each, 5-7 valid images scattered among them
  x = jax.random.normal(jax.random.key(5), (n, m, 3, 3, 1))
  y = jax.random.randint(jax.random.key(6), (n, m), 0, K)
  valid = np.zeros((n, m), bool)
  for c, rows in enumerate(([0, 5, 9, 17, 23], [1, 2, 3, 12, 13, 20], [4, 6, 8, 10, 14, 16, 22])):
    valid[c, rows] = True
  keys = jax.random.split(jax.random.key(7), n)
  for name in ("sga", "recovery"):
    full = env.runner(phases.program(name), 1, 64)
    want = full.run(params, (x, y), jnp.asarray(valid), None, keys).params
    got = phases.runner(name, 7).run(params, (x, y), jnp.asarray(valid), None, keys).params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params))
    )
    assert moved > 1e-4  # the clients did step


def loss_of_jax(model, batch):
  return lambda p: losses.masked_ce(model.apply({"params": p}, batch.x), batch.y, batch.mask)


@pytest.mark.parametrize(
  "key, value, expect",
  [
    ("model_update", "both", "quickdrop.model_update"),
    ("scale", 0.0, "quickdrop.scale"),
    ("metric", "l1", "quickdrop.metric"),
    ("unlearn_epochs", 0, "quickdrop.unlearn_epochs"),
    ("recovery_rounds", -1, "quickdrop.recovery_rounds"),
    ("sequence", (1, 1), "quickdrop.sequence"),
    ("distill_every", -1, "quickdrop.distill_every"),
  ],
)
def test_settings_reject_bad_values(key, value, expect):
  c = small_config()
  c.quickdrop[key] = value
  with pytest.raises(ValueError, match=expect):
    qd.settings(c)


# Tolerances of QuickDrop against retrain on this small digits setup (points / 100).
QD_FORGET_MARGIN, QD_RETAIN_MARGIN = 0.2, 0.1


def _digits(**overrides):
  # Smaller than test_experiments' small config: a 32-unit MLP keeps compilation short.
  base = {
    "method": "quickdrop",
    "mia.enabled": False,
    "model.hidden": (32,),
    "fl.rounds": 4,
    "fl.batch_size": 32,
    "checkpoint_every": 2,
    "eval_every": 4,
    "quickdrop.recovery_rounds": 3,
  }
  base.update(overrides)
  c = small_config()
  c.update_from_flattened_dict(base)
  return c


@pytest.mark.slow
def test_quickdrop_end_to_end_real_mode_artifacts_resume_and_parallel(tmp_path):
  wd = str(tmp_path)
  ref = pretrain_cache.run(_digits(method="retrain"), wd)
  cfg = _digits()
  res = pretrain_cache.run(cfg, wd)
  orig = res["original"]
  assert orig["forget_acc"] > 0.8
  # Against retrain on the same data: the class is forgotten, the others kept.
  assert res["forget_acc"] <= ref["forget_acc"] + QD_FORGET_MARGIN < orig["forget_acc"] - 0.55
  assert res["retain_acc"] >= ref["retain_acc"] - QD_RETAIN_MARGIN
  assert res["retain_acc"] > orig["retain_acc"] - 0.1
  assert res["speedup_vs_retrain"] == pytest.approx(ref["unlearn_seconds"] / res["unlearn_seconds"])
  # The distilling trainer's time against FedAvg's (retrain's run trained it here).
  assert res["train_overhead_vs_fedavg"] == pytest.approx(
    res["train_seconds"] / ref["train_seconds"]
  )
  # One SGA round and recovery_rounds rounds, all on synthetic data.
  assert res["rounds"] == 1 + cfg.quickdrop.recovery_rounds
  assert res["bytes_up"] > 0 and 0 < res["examples"] < 1347
  # 5 IID clients with ~27 images per class and scale 0.01: one image per class each.
  assert res["synthetic_images"] == 5 * 10 and res["forget_synthetic_images"] == 5
  assert res["retain_synthetic_images"] == 45

  # Artifacts: one npz and one png per client, holding the sets the trainer returned.
  (pre,) = glob.glob(os.path.join(wd, "pretrain", "quickdrop-*"))
  npz = sorted(glob.glob(os.path.join(pre, "synthetic", "client_*.npz")))
  png = sorted(glob.glob(os.path.join(pre, "synthetic", "client_*.png")))
  assert len(npz) == len(png) == 5
  task = task_lib.build_task(cfg)
  trained, _ = caches.pretrained(task, wd, "quickdrop")  # restored from the checkpoint
  for k, path in enumerate(npz):
    with np.load(os.path.join(pre, "synthetic", f"client_{k}.npz")) as f:
      one = jax.tree.map(lambda a, k=k: np.asarray(a[k]), trained.kept)
      np.testing.assert_array_equal(f["x"], one.x[one.valid])  # chunks are in class order
      np.testing.assert_array_equal(f["y"], one.y[one.valid])
      np.testing.assert_array_equal(f["sizes"], np.ones(10))
  # The sets were trained: no longer the real images they started from.
  init = qd.init_sets(task, qd.settings(cfg))
  assert not np.allclose(np.asarray(init.x), np.asarray(trained.kept.x))
  np.testing.assert_array_equal(np.asarray(init.valid), np.asarray(trained.kept.valid))

  # Parallel request (classes 0 and 1 at once) reuses the cached model: unlearning keys
  # are not part of the training key.
  shutil.rmtree(os.path.join(wd, "quickdrop"))
  res2 = pretrain_cache.run(_digits(**{"unlearn.also_classes": (1,)}), wd)
  assert len(glob.glob(os.path.join(wd, "pretrain", "*"))) == 2  # retrain's fedavg + this one
  assert res2["original"]["forget_acc"] > 0.8
  # Two classes share one normalised ascent step: less forgetting per class than above.
  assert res2["forget_acc"] < 0.5 * res2["original"]["forget_acc"]
  assert res2["retain_acc"] > orig["retain_acc"] - 0.15
  assert res2["forget_synthetic_images"] == 10 and res2["request"]["classes"] == [0, 1]

  # Sequential requests: class 0, then class 1; the curve has a start point plus 2 steps.
  shutil.rmtree(os.path.join(wd, "quickdrop"))
  res3 = pretrain_cache.run(
    _digits(**{"quickdrop.sequence": (0, 1), "quickdrop.recovery_rounds": 1}), wd
  )
  seq = res3["sequence"]
  assert [s["forgotten"] for s in seq] == [[], [0], [0, 1]]
  # Class 1, forgotten before the end, is not counted as retained in the final metrics.
  assert res3["forgotten_classes"] == [0, 1]
  assert res3["retain_acc"] == pytest.approx(seq[2]["retain_acc"])
  assert res3["forget_acc"] == pytest.approx(seq[2]["forget_acc"])
  assert seq[0]["forget_acc"] is None and seq[0]["retain_acc"] > 0.8
  assert seq[1]["forget_acc"] < 0.5 and seq[2]["forget_acc"] < 0.5
  assert seq[2]["retain_acc"] > 0.6
  assert res3["rounds"] == 2 * (1 + 1)


@pytest.mark.slow
def test_quickdrop_synthetic_model_update_runs(tmp_path):
  cfg = _digits(
    **{
      "quickdrop.model_update": "synthetic",
      "fl.rounds": 2,
      "fl.client_lr": 0.01,
      "fl.client_momentum": 0.0,
      "quickdrop.artifacts": False,
      "quickdrop.recovery_rounds": 1,
    }
  )
  res = pretrain_cache.run(cfg, str(tmp_path))
  assert res["model_update"] == "synthetic"
  assert math.isfinite(res["test_acc"]) and res["rounds"] == 2
  # Two rounds on the sets train a weak model (test ~20%, class 0 ~40%); SGA on the
  # distilled class-0 images still removes what it knew of the class, and only that.
  orig = res["original"]
  assert res["forget_acc"] <= orig["forget_acc"] - 0.2
  assert res["retain_acc"] >= orig["retain_acc"] - 0.1
  assert not glob.glob(os.path.join(str(tmp_path), "pretrain", "*", "synthetic"))
