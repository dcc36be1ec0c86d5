"""FedEraser's calibration reads only the calibrating clients' images from the one copy of
the training set (fu_jax/images.py), never the padded block of every client."""

import jax
import numpy as np
import pytest

from experiments import caches
from experiments import env as env_lib
from experiments import task as task_lib
from fu_jax import images
from fu_jax.methods import federaser
from tests import pretrain_cache
from tests.test_experiments import small_config


@pytest.mark.slow
def test_calibration_gathers_per_client_and_equals_the_padded_block(tmp_path, monkeypatch):
  # Two stored rounds are enough to calibrate from both layouts (the property holds per round).
  cfg = small_config(
    method="federaser",
    **{
      "unlearn.kind": "client",
      "unlearn.forget_client": 0,
      "mia.enabled": False,
      "fl.rounds": 2,
    },
  )
  wd = str(tmp_path)
  pretrain_cache.pretrain(cfg, wd)
  task = task_lib.build_task(cfg)
  trained, _ = caches.pretrained(task, wd, "federaser")
  assert isinstance(task.clients.x, images.ClientImages)

  def whole_block(self, dtype=None, copy=None):
    raise AssertionError("every client's images materialised")

  with monkeypatch.context() as m:
    m.setattr(images.ClientImages, "__array__", whole_block)
    got = federaser.METHODS["federaser"].unlearn(
      task, env_lib.RunEnv(task, str(tmp_path / "gathered"), {}), trained
    )
  # The same calibration from the padded float block (the layout before index blocks).
  padded = task._replace(clients=task.clients._replace(x=np.asarray(task.clients.x)))
  want = federaser.METHODS["federaser"].unlearn(
    padded, env_lib.RunEnv(padded, str(tmp_path / "padded"), {}), trained
  )
  assert got.results == want.results
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert got.results["federaser_stored_rounds"] == cfg.fl.rounds  # calibration ran
