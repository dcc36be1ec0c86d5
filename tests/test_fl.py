"""FedAvg, runners and sampling against independent computations."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fu_jax import fl, losses, models


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _setup(num_clients=4, max_n=23, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, max_n, 4, 4, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=(num_clients, max_n)).astype(np.int32)
  counts = rng.integers(5, max_n + 1, size=num_clients)
  valid = np.arange(max_n)[None] < counts[:, None]
  x[~valid] = 0
  model = TinyMLP()
  params = model.init(jax.random.key(1), x[0, :1])["params"]
  return model, params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid)


def _runner(model, kind, batch_size=5, epochs=2, lr=0.1, **kw):
  program = fl.sgd_program(models.logits_fn(model), optax.sgd(lr))
  return fl.ClientRunner(program, kind=kind, epochs=epochs, batch_size=batch_size, **kw)


def _keys(n):
  return jax.vmap(lambda c: fl.stream_key(0, fl.STREAM_CLIENT, 0, c))(jnp.arange(n))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vmap", "shard"])
def test_runners_agree_with_loop(kind):
  if kind == "shard":
    assert jax.device_count() == 2  # conftest simulates two CPU devices
  model, params, x, y, valid = _setup()
  ref = _runner(model, "loop").run(params, (x, y), valid, None, _keys(4))
  out = _runner(model, kind, chunk_size=3).run(params, (x, y), valid, None, _keys(4))
  chex.assert_trees_all_close(out.params, ref.params, atol=1e-5)
  np.testing.assert_allclose(out.metrics["loss"], ref.metrics["loss"], rtol=1e-5)


@pytest.mark.slow
def test_loop_over_devices_equals_one_client_at_a_time():
  # 5 clients over 2 devices: groups (0, 1), (2, 3), (4,) with unequal step counts.
  assert jax.device_count() == 2  # conftest simulates two CPU devices
  model, params, x, y, valid = _setup(num_clients=5)
  ref = _runner(model, "loop").run(params, (x, y), valid, None, _keys(5))
  clock = fl.ClientClock()
  out = _runner(model, "loop", devices=jax.devices(), clock=clock).run(
    params, (x, y), valid, None, _keys(5)
  )
  chex.assert_trees_all_close(out.params, ref.params, atol=1e-6)
  np.testing.assert_allclose(out.metrics["loss"], ref.metrics["loss"], rtol=1e-6)
  assert out.params["Dense_0"]["kernel"].shape[0] == 5
  serial, critical = clock.totals()  # one entry per group of clients trained at once
  assert 0 < critical <= serial


def test_devices_are_for_the_loop_runner():
  model = TinyMLP()
  with pytest.raises(ValueError, match="loop runner"):
    _runner(model, "vmap", devices=jax.devices())
  with pytest.raises(ValueError, match="at least one device"):
    _runner(model, "loop", devices=[])


@pytest.mark.slow
def test_padding_never_changes_a_result():
  model, params, x, y, valid = _setup()
  pad = lambda a: jnp.concatenate([a, jnp.zeros((a.shape[0], 9) + a.shape[2:], a.dtype)], 1)
  for kind in ["loop", "vmap"]:
    a = _runner(model, kind).run(params, (x, y), valid, None, _keys(4))
    b = _runner(model, kind).run(params, (pad(x), pad(y)), pad(valid), None, _keys(4))
    chex.assert_trees_all_equal(a.params, b.params)


@pytest.mark.slow
def test_one_client_fedavg_equals_centralized_sgd():
  """One client, full participation, server sgd(1): the round equals plain SGD."""
  model, params, x, y, valid = _setup(num_clients=1)
  runner = _runner(model, "loop", batch_size=4, epochs=1)
  server = fl.server_init(params, optax.sgd(1.0))
  res = fl.fedavg_round(
    server,
    runner,
    (x, y),
    valid,
    None,
    seed=0,
    round_idx=0,
    client_weights=np.ones(1),
    num_sampled=1,
    server_opt=optax.sgd(1.0),
  )
  # Independent reference: the same batches in a Python loop with optax.sgd.
  key = fl.stream_key(0, fl.STREAM_CLIENT, 0, 0)
  order = np.asarray(fl.epoch_order(jax.random.fold_in(key, 0), valid[0]))
  n = int(valid[0].sum())
  p, opt = params, optax.sgd(0.1)
  st = opt.init(p)
  for s in range(0, n, 4):
    idx = order[s : min(s + 4, n)]
    loss = lambda q: losses.cross_entropy(model.apply({"params": q}, x[0, idx]), y[0, idx]).mean()
    g = jax.grad(loss)(p)
    u, st = opt.update(g, st)
    p = optax.apply_updates(p, u)
  chex.assert_trees_all_close(res.server.params, p, atol=1e-6)


def test_weighted_aggregation_matches_numpy():
  rng = np.random.default_rng(0)
  server = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  clients = {"w": rng.normal(size=(4, 3, 2)).astype(np.float32)}
  w = np.array([3.0, 0.0, 1.0, 6.0], np.float32)
  got = fl.aggregate(server, clients, w)
  ref = sum(w[k] * (clients["w"][k] - server["w"]) for k in range(4)) / w.sum()
  np.testing.assert_allclose(got["w"], ref, rtol=1e-6, atol=1e-6)
  zero = fl.aggregate(server, clients, np.zeros(4, np.float32))
  np.testing.assert_array_equal(zero["w"], 0.0)


@pytest.mark.slow
def test_sampling_is_deterministic_and_respects_weights():
  w = np.ones(10)
  a, _ = fl.sample_clients(3, 7, w, 4)
  b, _ = fl.sample_clients(3, 7, w, 4)
  c, _ = fl.sample_clients(4, 7, w, 4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) or not np.array_equal(a, fl.sample_clients(3, 8, w, 4)[0])
  assert len(set(np.asarray(a).tolist())) == 4
  w[[1, 2, 3]] = 0
  for r in range(20):
    idx, active = fl.sample_clients(0, r, w, 7)
    assert set(np.asarray(idx).tolist()).isdisjoint({1, 2, 3})
    assert bool(active.all())
  idx, active = fl.sample_clients(0, 0, w, 9)
  assert int(active.sum()) == 7
  assert fl.num_sampled_clients(0.25, 10) == 2
  with pytest.raises(ValueError, match="clients_per_round"):
    fl.num_sampled_clients(11, 10)


@pytest.mark.slow
def test_removing_a_client_does_not_retrace():
  model, params, x, y, valid = _setup()
  program = fl.sgd_program(models.logits_fn(model), optax.sgd(0.1))
  program = program._replace(step=chex.assert_max_traces(program.step, n=1))
  runner = fl.ClientRunner(program, kind="vmap", epochs=1, batch_size=5)
  server = fl.server_init(params, optax.sgd(1.0))
  weights = np.ones(4)
  for r in range(3):
    if r == 2:
      weights[1] = 0.0  # forget client 1: a weight change
    res = fl.fedavg_round(
      server,
      runner,
      (x, y),
      valid,
      None,
      seed=0,
      round_idx=r,
      client_weights=weights,
      num_sampled=3,
      server_opt=optax.sgd(1.0),
    )
    server = res.server
  assert 1 not in np.asarray(res.sampled)


@pytest.mark.slow
def test_same_seed_identical_different_seed_different():
  model, params, x, y, valid = _setup()

  def run(seed):
    server = fl.server_init(params, optax.sgd(1.0))
    for r in range(2):
      server = fl.fedavg_round(
        server,
        _runner(model, "vmap"),
        (x, y),
        valid,
        None,
        seed=seed,
        round_idx=r,
        client_weights=np.ones(4),
        num_sampled=2,
        server_opt=optax.sgd(1.0),
      ).server
    return server.params

  chex.assert_trees_all_equal(run(0), run(0))
  assert not np.allclose(jax.tree.leaves(run(0))[0], jax.tree.leaves(run(1))[0])


def test_divergence_is_detected():
  with pytest.raises(fl.DivergenceError, match="NaN"):
    fl.check_finite({"w": jnp.array([1.0, jnp.nan])}, "round 3")


def test_runner_rejects_a_scheduled_step_without_its_schedule():
  prog = fl.sgd_program(lambda v, x: x, optax.sgd(0.1))
  with pytest.raises(ValueError, match="got only scheduled_step"):
    fl.ClientRunner(prog._replace(scheduled_step=prog.step), kind="loop", epochs=1, batch_size=2)
  with pytest.raises(ValueError, match="got only schedule"):
    fl.ClientRunner(prog._replace(schedule=lambda i: True), kind="loop", epochs=1, batch_size=2)


def test_auto_runner_per_backend():
  from fu_jax import models

  assert fl.choose_runner("cnn", "cpu") == "loop"
  assert fl.choose_runner("mlp", "cpu") == "vmap"
  for backend in ("gpu", "tpu", "some_new_accelerator"):  # vmap split over every device
    for name in models.MODEL_NAMES:
      assert fl.choose_runner(name, backend) == "shard"
  for name in models.MODEL_NAMES:
    assert fl.choose_runner(name, "cpu") == ("vmap" if name == "mlp" else "loop")
  assert all(r in fl.RUNNERS[1:] for b in fl.AUTO_RUNNER.values() for r in b.values())
  assert fl.choose_runner("cnn") == fl.choose_runner("cnn", jax.default_backend())


@pytest.mark.slow
def test_round_loop_calls_on_round_once_per_round_and_equals_fedavg_rounds():
  # fedavg_rounds over a state that wraps the server: play sees round_offset + r, on_round
  # sees r once, in order, and the parameters equal fedavg_round called round by round.
  model, params, x, y, valid = _setup()
  runner = _runner(model, "vmap")
  server_opt = fl.server_optimizer(1.0)
  kw = dict(seed=0, client_weights=np.ones(4), num_sampled=2, server_opt=server_opt)
  play = fl.fedavg_play(runner, (x, y), valid, server_of=lambda st: st[0], **kw)
  seen = []

  def on_round(state, r, res):
    seen.append((r, state[1]))
    return (res.server, state[1] + 1)

  server, count = fl.fedavg_rounds(
    play, (fl.server_init(params, server_opt), 0), 3, round_offset=5, on_round=on_round
  )
  assert seen == [(0, 0), (1, 1), (2, 2)] and count == 3
  ref = fl.server_init(params, server_opt)
  for r in range(3):
    ref = fl.fedavg_round(ref, runner, (x, y), valid, None, round_idx=5 + r, **kw).server
  chex.assert_trees_all_equal(server.params, ref.params)


def test_round_fn_adds_the_round_cost_to_the_metrics():
  model, params, x, y, valid = _setup()
  server_opt = fl.server_optimizer(1.0)
  play = fl.fedavg_play(
    _runner(model, "vmap"),
    (x, y),
    valid,
    seed=0,
    client_weights=np.ones(4),
    num_sampled=2,
    server_opt=server_opt,
  )
  round_fn = fl.fedavg_round_fn(play, model_bytes=100, epochs=2)
  _, m = round_fn(fl.server_init(params, server_opt), 0)
  res = play(fl.server_init(params, server_opt), 0)
  assert m == dict(res.metrics, bytes_up=200, bytes_down=200, examples=2 * int(res.counts.sum()))


def test_server_optimizer_is_one_cached_object():
  # One object per lr: the jitted server update takes it as a static argument, compared by
  # identity, so a second phase with the same lr compiles nothing new.
  assert fl.server_optimizer(0.5) is fl.server_optimizer(0.5)
  assert fl.server_optimizer(0.5) is not fl.server_optimizer(0.25)
  model, params, x, y, valid = _setup()
  runner = _runner(model, "vmap")

  def phase():
    server_opt = fl.server_optimizer(0.5)
    play = fl.fedavg_play(
      runner,
      (x, y),
      valid,
      seed=0,
      client_weights=np.ones(4),
      num_sampled=2,
      server_opt=server_opt,
    )
    return fl.fedavg_rounds(play, fl.server_init(params, server_opt), 1)

  phase()
  compiled = fl.aggregate_apply._cache_size()
  phase()
  assert fl.aggregate_apply._cache_size() == compiled
