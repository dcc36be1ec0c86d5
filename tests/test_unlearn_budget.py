"""The unlearning budget in steps (fedaf.min_steps, sga.min_steps): every target client takes
at least min_steps optimizer steps whatever its number of forget samples (steps counted
exactly by a program whose state counts the non-empty batches it steps on)."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from experiments import task as task_lib
from fu_jax import fl
from fu_jax.methods import base, fedaf
from fu_jax.methods import sga as sga_lib
from tests import pretrain_cache
from tests.test_fedaf import APPLY, MODULE, K, _clients, small_config


def _counting_program():
  """State: the number of steps on a batch holding at least one valid row."""
  return fl.LocalProgram(
    lambda p, extra, key: jnp.zeros((), jnp.int32),
    lambda s, batch, key: (s + (jnp.sum(batch.mask) > 0), {}),
    lambda s: s,
  )


def _fake_task(counts, max_n):
  forget = np.zeros((len(counts), max_n), bool)
  for c, n in enumerate(counts):
    forget[c, :n] = True
  return types.SimpleNamespace(forget=forget)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loop", "vmap"])
@pytest.mark.parametrize(
  "counts,batch,epochs,min_steps,want_epochs",
  [
    ([40, 41, 100], 64, 1, 24, 24),  # 1 step an epoch for the smallest client
    ([130, 200], 64, 1, 24, 8),  # 3 steps an epoch -> ceil(24 / 3)
    ([1500], 64, 1, 24, 1),  # 24 steps in one epoch: epochs as given
    ([13, 0, 20], 16, 2, 0, 2),  # min_steps 0: epochs as given
    ([5, 9], 4, 3, 5, 3),  # epochs already give >= min_steps
  ],
)
def test_every_target_client_takes_at_least_min_steps(
  kind, counts, batch, epochs, min_steps, want_epochs
):
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


@pytest.mark.slow
def test_fedaf_end_to_end_uses_the_step_budget(tmp_path):
  # digits, 5 clients, class-wide: ~27 images of class 0 per client at batch 16 -> 2 steps
  # an epoch; the default min_steps (10) needs 5 epochs (at lr 0.005 on this MLP).
  cfg = small_config("fedaf", **{"unlearn.kind": "class"})
  assert cfg.fedaf.epochs == 1 and cfg.fedaf.min_steps == 10
  res = pretrain_cache.run(cfg, str(tmp_path))
  task = task_lib.build_task(cfg)
  counts = np.asarray(task.forget).sum(axis=1)
  s_min = math.ceil(int(counts[counts > 0].min()) / cfg.fl.batch_size)
  assert res["fedaf_min_epochs"] == math.ceil(10 / s_min) > 1
  # The forgetting rule may add epochs past the floor, up to max_steps (200) of s_min each.
  assert res["fedaf_epochs"] == math.ceil(200 / s_min)
  assert res["fedaf_min_epochs"] <= res["fedaf_epochs_run"] <= res["fedaf_epochs"]
  assert res["forget_acc"] <= 0.1


# ---------------------------------------------------------------------------------------
# fedaf's forgetting rule (fedaf.max_steps, fedaf.stop_acc).


def _rule_reference(params, x, y_new, y_old, lr, min_epochs, acc, epochs, counted=None):
  """Full-batch epochs of Eq. 13 without EWC, written out: per epoch, count the rows whose
  argmax is the old label (before the step; only the `counted` rows when given), step, and
  stop after the first epoch >= min_epochs whose count is <= acc * n. Returns (params,
  epochs stepped, whether it stopped)."""
  counted = np.ones(x.shape[0], bool) if counted is None else np.asarray(counted)

  def loss(p):
    logp = jax.nn.log_softmax(MODULE.apply({"params": p}, x))
    return jnp.mean(-jnp.sum(y_new * logp, -1)) + jnp.mean(
      jnp.take_along_axis(logp, y_old[:, None], 1)
    )

  p = params
  for e in range(1, epochs + 1):
    hit = np.argmax(MODULE.apply({"params": p}, x), -1) == np.asarray(y_old)
    kept = int(np.sum(hit & counted))
    p = jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss)(p))
    if e >= min_epochs and kept <= acc * x.shape[0]:
      return p, e, True
  return p, epochs, False


@pytest.mark.slow
@pytest.mark.parametrize("min_epochs,acc", [(1, 0.5), (2, 0.3), (1, 0.0)])
def test_stop_rule_stops_after_the_first_forgotten_epoch(min_epochs, acc):
  params, x, y, valid, keys = _clients()
  y_new = jax.nn.softmax(jnp.asarray(np.random.RandomState(4).randn(2, 9, K), jnp.float32))
  lr, epochs = 2.0, 12
  prog = fedaf.unlearn_program(
    APPLY, optax.sgd(lr), ewc_kind=None, lam=0.0, width=1, stop=fedaf.StopRule(min_epochs, acc)
  )
  counts = jnp.sum(valid, axis=1).astype(jnp.float32)
  runner = fl.ClientRunner(prog, kind="loop", epochs=epochs, batch_size=9)  # 1 step an epoch
  res = runner.run(params, (x, (y_new, y)), valid, (None, counts, None), keys)
  stopped_at = []
  for c in range(2):
    n = int(counts[c])
    want, e, fired = _rule_reference(
      params, x[c, :n], y_new[c, :n], y[c, :n], lr, min_epochs, acc, epochs
    )
    got = jax.tree.map(lambda a: a[c], res.params)
    np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(want)[0], rtol=1e-5, atol=1e-6)
    assert bool(res.state.stopped[c]) == fired
    stopped_at.append(e)
  if acc == 0.5:  # the setting is informative: the rule fires before the last epoch
    assert min(stopped_at) < epochs


@pytest.mark.slow
def test_stop_rule_counts_only_the_counted_samples():
  # (y_new, y_old, counted): an all-to-one backdoor's records of the target class keep
  # their label under retraining, so the rule leaves them out of its count.
  params, x, y, valid, keys = _clients()
  y_new = jax.nn.softmax(jnp.asarray(np.random.RandomState(4).randn(2, 9, K), jnp.float32))
  # client 0 counts nothing (its rule fires at the floor), client 1 two rows in three
  counted = np.stack([np.zeros(9, bool), np.arange(9) % 3 != 0])
  lr, epochs, acc = 2.0, 12, 0.0
  prog = fedaf.unlearn_program(
    APPLY, optax.sgd(lr), ewc_kind=None, lam=0.0, width=1, stop=fedaf.StopRule(1, acc)
  )
  counts = jnp.sum(valid, axis=1).astype(jnp.float32)
  runner = fl.ClientRunner(prog, kind="loop", epochs=epochs, batch_size=9)
  res = runner.run(params, (x, (y_new, y, jnp.asarray(counted))), valid, (None, counts, None), keys)
  differs = False
  for c in range(2):
    n = int(counts[c])
    args = (params, x[c, :n], y_new[c, :n], y[c, :n], lr, 1, acc, epochs)
    want, e, fired = _rule_reference(*args, counted=counted[c, :n])
    got = jax.tree.map(lambda a: a[c], res.params)
    np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(want)[0], rtol=1e-5, atol=1e-6)
    assert bool(res.state.stopped[c]) == fired
    differs |= e != _rule_reference(*args)[1]
  assert differs  # informative: counting every row would stop at another epoch


@pytest.mark.slow
def test_run_until_forgotten_resumes_and_ends_when_every_client_stopped():
  params, x, y, valid, keys = _clients()
  y_new = jax.nn.softmax(jnp.asarray(np.random.RandomState(4).randn(2, 9, K), jnp.float32))
  counts = np.asarray(jnp.sum(valid, axis=1), np.float32)
  calls = []

  class Env:
    def runner(self, program, epochs, batch_size):
      r = fl.ClientRunner(program, kind="loop", epochs=epochs, batch_size=batch_size)
      run = r.run
      r.run = lambda *a: calls.append(epochs) or run(*a)
      return r

  task = types.SimpleNamespace(forget=valid, clients=types.SimpleNamespace(x=x))
  prog = fedaf.unlearn_program(
    APPLY, optax.sgd(2.0), ewc_kind=None, lam=0.0, width=1, stop=fedaf.StopRule(1, 0.5)
  )
  kw = dict(
    y=(y_new, y), targets=np.array([0, 1]), counts=counts, curv=None, keys=keys, batch_size=9
  )
  _, _, done = fedaf.run_until_forgotten(
    task, Env(), prog, params, chunk_epochs=2, max_epochs=40, **kw
  )
  assert calls == [2] * len(calls) and done == 2 * len(calls) < 40  # ended early
  # Without a rule every chunk runs; resumed chunks continue the same trajectory as one
  # call would (plain SGD, full batches: the epoch order does not matter).
  nostop = fedaf.unlearn_program(APPLY, optax.sgd(0.5), ewc_kind=None, lam=0.0, width=1)
  calls.clear()
  chunked, _, done = fedaf.run_until_forgotten(
    task, Env(), nostop, params, chunk_epochs=2, max_epochs=6, **kw
  )
  assert calls == [2, 2, 2] and done == 6
  whole, _, _ = fedaf.run_until_forgotten(
    task, Env(), nostop, params, chunk_epochs=6, max_epochs=6, **kw
  )
  np.testing.assert_allclose(ravel_pytree(chunked)[0], ravel_pytree(whole)[0], rtol=1e-5, atol=1e-6)
