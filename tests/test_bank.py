"""fu_jax.bank: K FedAvg runs as one vmapped program equal K separate runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fu_jax import bank, fl, models
from fu_jax import data as data_lib


@pytest.mark.slow
@pytest.mark.parametrize("num_sampled,weights", [(2, [1, 1, 1, 1]), (4, [1, 0, 1, 1])])
def test_bank_equals_separate_runs(num_sampled, weights):
  ds = data_lib.load_dataset("digits", seed=0)
  parts = data_lib.partition(ds.y_train[:200], 4, kind="iid", seed=0)
  c = data_lib.stack_clients(ds.x_train[:200], ds.y_train[:200], parts)
  data, valid = (jnp.asarray(c.x), jnp.asarray(c.y)), jnp.asarray(c.valid)
  model = models.create("mlp", 10, hidden=(32,))
  opt = optax.sgd(0.05, momentum=0.9)
  program = fl.sgd_program(models.logits_fn(model), opt)
  seeds = [3, 1234567, 99]
  shape = tuple(ds.x_train.shape[1:])
  init = [models.init_params(model, fl.stream_key(s, fl.STREAM_INIT), shape) for s in seeds]
  server_opt = optax.sgd(1.0)
  expect = []
  runner = fl.ClientRunner(program, kind="vmap", epochs=2, batch_size=16)
  for s, p in zip(seeds, init):
    server = fl.server_init(p, server_opt)
    for r in range(3):
      server = fl.fedavg_round(
        server,
        runner,
        data,
        valid,
        None,
        seed=s,
        round_idx=5 + r,
        client_weights=np.asarray(weights, np.float32),
        num_sampled=num_sampled,
        server_opt=server_opt,
      ).server
    expect.append(server.params)
  got = bank.fedavg_bank(
    bank.BankRunner(program, 16),
    jax.tree.map(lambda *a: jnp.stack(a), *init),
    data,
    valid,
    seeds=seeds,
    num_rounds=3,
    epochs=2,
    client_weights=weights,
    num_sampled=num_sampled,
    server_lr=1.0,
    round_offset=5,
  )
  for k in range(len(seeds)):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[k], b, atol=2e-5, rtol=1e-4), got, expect[k]
    )
  # The models differ from one another (their seeds drive init, sampling and batches).
  leaf = jax.tree.leaves(got)[0]
  assert not np.allclose(leaf[0], leaf[1])
