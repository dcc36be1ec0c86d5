"""quickdrop_nodistill, the distillation ablation: it reuses the quickdrop trainer's model and
replaces the distilled sets by their real-image initialisation. Both halves of that are
checked here on digits: the model does not depend on the image steps (model_update='real'),
and the method runs the same pipeline on the undistilled sets."""

import math

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import caches
from experiments import run as run_lib
from experiments import task as task_lib
from fu_jax.methods import quickdrop as qd
from tests import pretrain_cache
from tests.test_quickdrop import _digits


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


@pytest.mark.slow
def test_real_mode_model_does_not_depend_on_the_image_steps(tmp_path):
  # The quickdrop trainer (an image step every local step, the most it can take) against
  # plain FedAvg on the same config: the same model up to float rounding, while the sets
  # did move away from their initialisation.
  cfg = _digits(**{"quickdrop.distill_every": 1, "quickdrop.artifacts": False})
  task = task_lib.build_task(cfg)
  wd = str(tmp_path)
  pretrain_cache.pretrain(cfg, wd, "fedavg")  # the same FedAvg model as test_quickdrop's
  distilled, _ = caches.pretrained(task, wd, "quickdrop")
  plain, _ = caches.pretrained(task, wd, "fedavg")
  a, b = _flat(distilled.params), _flat(plain.params)
  assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b)))
  init = qd.init_sets(task, qd.settings(cfg))
  moved = np.abs(np.asarray(init.x) - np.asarray(distilled.kept.x))
  assert moved.max() > 1e-2  # the image steps did change the images
  np.testing.assert_array_equal(np.asarray(init.valid), np.asarray(distilled.kept.valid))
  np.testing.assert_array_equal(np.asarray(init.y), np.asarray(distilled.kept.y))


def _assert_real_subset(task, syn, scale):
  """Every client's valid synthetic images of class c are ceil(scale * n_kc) distinct real
  images of class c from that client's own data, bit for bit."""
  x_real, y_real, v_real = (
    np.asarray(a) for a in (task.clients.x, task.clients.y, task.clients.valid)
  )
  x_syn, y_syn, v_syn = (np.asarray(a) for a in syn)
  for k in range(v_real.shape[0]):
    for c in range(task.num_classes):
      real = x_real[k][v_real[k] & (y_real[k] == c)].reshape(-1, x_real[0, 0].size)
      mine = x_syn[k][v_syn[k] & (y_syn[k] == c)].reshape(-1, x_real[0, 0].size)
      assert len(mine) == math.ceil(scale * len(real)), (k, c)
      match = (mine[:, None, :] == real[None, :, :]).all(-1)  # [synthetic, real]
      assert match.any(1).all(), (k, c)  # each one is a real image of the class ...
      assert len(set(match.argmax(1).tolist())) == len(mine), (k, c)  # ... a distinct one


@pytest.mark.slow
def test_nodistill_runs_the_pipeline_on_the_initial_sets(tmp_path, monkeypatch):
  wd = str(tmp_path)
  cfg = _digits(method="quickdrop_nodistill")
  q = pretrain_cache.run(_digits(method="quickdrop"), wd)
  # The pipeline (qd._unlearn: SGA, recovery) is the one quickdrop runs; record its sets.
  seen = []
  pipeline = qd._unlearn

  def spy(task, env, trained):
    seen.append(trained.kept)
    return pipeline(task, env, trained)

  monkeypatch.setattr(qd, "_unlearn", spy)
  n = pretrain_cache.run(cfg, wd)
  assert q["synthetic"] == "distilled" and n["synthetic"] == "real_init"
  assert len(seen) == 1
  # The sets it ran on: the trainer's initialisation, rebuilt from the seed, bit for bit ...
  task = task_lib.build_task(cfg)
  s = qd.settings(cfg)
  for a, b in zip(seen[0], qd.init_sets(task, s)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... i.e. a random subset of each client's real images of each class ...
  assert not s["images_per_class"]
  _assert_real_subset(task, seen[0], s["scale"])
  # ... and not the distilled sets the trainer kept (same layout, other pixels).
  distilled = caches.pretrained(task, wd, "quickdrop")[0].kept
  np.testing.assert_array_equal(np.asarray(seen[0].valid), np.asarray(distilled.valid))
  assert np.abs(np.asarray(seen[0].x) - np.asarray(distilled.x)).max() > 1e-2
  # One trained model for both (the trainer's cache), the same set sizes and phases.
  assert n["original"] == q["original"]
  for k in ("synthetic_images", "forget_synthetic_images", "retain_synthetic_images", "rounds"):
    assert n[k] == q[k], k
  # The undistilled sets are real images of the forgotten class: SGA on them forgets it.
  assert n["forget_acc"] < 0.25 < n["original"]["forget_acc"] - 0.55
  assert n["retain_acc"] > n["original"]["retain_acc"] - 0.15


@pytest.mark.slow
def test_nodistill_refuses_the_synthetic_model_update(tmp_path):
  cfg = _digits(
    **{
      "method": "quickdrop_nodistill",
      "quickdrop.model_update": "synthetic",
      "fl.rounds": 1,
      "fl.client_lr": 0.01,
      "fl.client_momentum": 0.0,
      "quickdrop.artifacts": False,
    }
  )
  with pytest.raises(ValueError, match="quickdrop.model_update='real'"):
    run_lib.run(cfg, str(tmp_path))
