"""The unlearning budget in steps (fedaf.min_steps, sga.min_steps): every target client takes
at least min_steps optimizer steps whatever its number of forget samples (steps counted
exactly by a program whose state counts the non-empty batches it steps on)."""
import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import run as run_lib
from fu_jax import fl
from fu_jax.methods import base
from fu_jax.methods import sga as sga_lib
from tests import pretrain_cache
from tests.test_fedaf import small_config


def _counting_program():
  """State: the number of steps on a batch holding at least one valid row."""
  return fl.LocalProgram(lambda p, extra, key: jnp.zeros((), jnp.int32),
                         lambda s, batch, key: (s + (jnp.sum(batch.mask) > 0), {}),
                         lambda s: s)


def _fake_task(counts, max_n):
  forget = np.zeros((len(counts), max_n), bool)
  for c, n in enumerate(counts):
    forget[c, :n] = True
  return types.SimpleNamespace(forget=forget)


@pytest.mark.parametrize("kind", ["loop", "vmap"])
@pytest.mark.parametrize("counts,batch,epochs,min_steps,want_epochs", [
    ([40, 41, 100], 64, 1, 24, 24),   # 1 step an epoch for the smallest client
    ([130, 200], 64, 1, 24, 8),       # 3 steps an epoch -> ceil(24 / 3)
    ([1500], 64, 1, 24, 1),           # 24 steps in one epoch: epochs as given
    ([13, 0, 20], 16, 2, 0, 2),       # min_steps 0: epochs as given
    ([5, 9], 4, 3, 5, 3),             # epochs already give >= min_steps
])
def test_every_target_client_takes_at_least_min_steps(kind, counts, batch, epochs, min_steps,
                                                      want_epochs):
  task = _fake_task(counts, max(counts) + 3)
  clients = np.flatnonzero(task.forget.any(axis=1))
  got = base.budget_epochs(task, clients, epochs, min_steps, batch)
  assert got == want_epochs
  valid = task.forget[clients]
  x = jnp.zeros(valid.shape + (1,))
  runner = fl.ClientRunner(_counting_program(), kind=kind, epochs=got, batch_size=batch)
  keys = base.client_keys(0, 99, 0, clients)
  res = runner.run(jnp.zeros(()), (x, jnp.zeros(valid.shape, jnp.int32)), valid, None, keys)
  steps = np.asarray(res.params)
  # Client k steps on ceil(n_k / batch) non-empty batches an epoch, exactly.
  want = [got * math.ceil(counts[c] / batch) for c in clients]
  np.testing.assert_array_equal(steps, want)
  assert steps.min() >= min_steps


def test_min_steps_rejects_negative_values():
  c = small_config("fedaf")
  c.fedaf.min_steps = -1
  from fu_jax.methods import fedaf  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="fedaf.min_steps=-1"):
    fedaf.validate(c)
  c = small_config("sga")
  c.sga.min_steps = -2
  with pytest.raises(ValueError, match="sga.min_steps=-2"):
    sga_lib.validate(c)


def test_fedaf_end_to_end_uses_the_step_budget(tmp_path):
  # digits, 5 clients, class-wide: ~27 images of class 0 per client at batch 16 -> 2 steps
  # an epoch; the default min_steps (10) needs 5 epochs (at lr 0.005 on this MLP).
  cfg = small_config("fedaf", **{"unlearn.kind": "class"})
  assert cfg.fedaf.epochs == 1 and cfg.fedaf.min_steps == 10
  res = pretrain_cache.run(cfg, str(tmp_path))
  task = run_lib.build_task(cfg)
  counts = np.asarray(task.forget).sum(axis=1)
  s_min = math.ceil(int(counts[counts > 0].min()) / cfg.fl.batch_size)
  assert res["fedaf_epochs"] == math.ceil(10 / s_min) > 1
  assert res["forget_acc"] <= 0.1
