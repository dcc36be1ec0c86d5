"""quickdrop_nodistill, the distillation ablation: it reuses the quickdrop trainer's model and
replaces the distilled sets by their real-image initialisation. Both halves of that are
checked here on digits: the model does not depend on the image steps (model_update='real'),
and the method runs the same pipeline on the undistilled sets."""

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import run as run_lib
from fu_jax.methods import quickdrop as qd
from tests import pretrain_cache
from tests.test_quickdrop import _digits


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def test_real_mode_model_does_not_depend_on_the_image_steps(tmp_path):
  # The quickdrop trainer (an image step every local step, the most it can take) against
  # plain FedAvg on the same config: the same model up to float rounding, while the sets
  # did move away from their initialisation.
  cfg = _digits(**{"quickdrop.distill_every": 1, "quickdrop.artifacts": False})
  task = run_lib.build_task(cfg)
  wd = str(tmp_path)
  pretrain_cache.pretrain(cfg, wd, "fedavg")  # the same FedAvg model as test_quickdrop's
  distilled, _ = run_lib.pretrained(task, wd, "quickdrop")
  plain, _ = run_lib.pretrained(task, wd, "fedavg")
  a, b = _flat(distilled.params), _flat(plain.params)
  assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b)))
  init = qd.init_sets(task, qd.settings(cfg))
  moved = np.abs(np.asarray(init.x) - np.asarray(distilled.extra.x))
  assert moved.max() > 1e-2  # the image steps did change the images
  np.testing.assert_array_equal(np.asarray(init.valid), np.asarray(distilled.extra.valid))
  np.testing.assert_array_equal(np.asarray(init.y), np.asarray(distilled.extra.y))


def test_nodistill_runs_the_pipeline_on_the_initial_sets(tmp_path):
  wd = str(tmp_path)
  res = {m: pretrain_cache.run(_digits(method=m), wd) for m in ("quickdrop", "quickdrop_nodistill")}
  q, n = res["quickdrop"], res["quickdrop_nodistill"]
  assert q["synthetic"] == "distilled" and n["synthetic"] == "real_init"
  # One trained model for both (the trainer's cache), the same set sizes and phases.
  assert n["original"] == q["original"]
  for k in ("synthetic_images", "forget_synthetic_images", "retain_synthetic_images", "rounds"):
    assert n[k] == q[k], k
  # The undistilled sets are real images of the forgotten class: SGA on them forgets it.
  assert n["forget_acc"] < 0.25 < n["original"]["forget_acc"] - 0.55
  assert n["retain_acc"] > n["original"]["retain_acc"] - 0.15
  # Different sets, different unlearned model.
  assert (n["forget_acc"], n["retain_acc"]) != (q["forget_acc"], q["retain_acc"])


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
