r"""Cost of a vmapped bank of K FedAvg models against one model's run, side by side.

  python benchmarks/audit_bank.py --model=mlp --models=16
  python benchmarks/audit_bank.py --model=cnn --models=16 --rounds=2

The setting is experiments/configs/audit_digits.py (digits, 3 clients, 5 local epochs). One
model's run = fl.fedavg_round with the client runner the experiments would pick
(`fl.choose_runner`); the bank = fu_jax.bank.fedavg_bank over K training seeds. Each is run
twice in this process: the first call includes compilation, the second is the compiled
cost; the ratio of the second calls is the bank's cost in "runs".

To tell dispatch-bound from arithmetic-bound it also prints each side's achieved GFLOP/s
(XLA's cost analysis of one SGD step on a batch, times the batches both sides compute:
rounds x epochs x ceil(n_k / batch) per client and model) next to a dense 1024 x 1024
matmul's GFLOP/s in the same process.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import (
  app,  # noqa: E402
  flags,  # noqa: E402
)

from fu_jax import xla_flags  # noqa: E402

xla_flags.use_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import task as task_lib  # noqa: E402
from experiments.configs import audit_digits  # noqa: E402
from fu_jax import (
  bank,  # noqa: E402
  fl,  # noqa: E402
)
from fu_jax.methods import base  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "mlp", "mlp | cnn")
flags.DEFINE_integer("models", 16, "K, models in the bank")
flags.DEFINE_integer("rounds", 0, "FedAvg rounds (0 = the config's)")
flags.DEFINE_string("runner", "auto", "one run's client runner: auto | vmap | loop")


def main(argv):
  del argv
  c = audit_digits.get_config()
  c.model.name = FLAGS.model
  if FLAGS.rounds:
    c.fl.rounds = FLAGS.rounds
  task = task_lib.build_task(c)
  cl = task.clients
  program = fl.sgd_program(task.apply_fn, base.client_optimizer(c))
  kind = fl.choose_runner(c.model.name) if FLAGS.runner == "auto" else FLAGS.runner
  runner = fl.ClientRunner(program, kind=kind, epochs=c.fl.local_epochs, batch_size=c.fl.batch_size)
  server_opt = optax.sgd(c.fl.server_lr)
  weights = np.ones(c.data.num_clients, np.float32)
  k_sampled = base.num_sampled(c)

  def one_run():
    server = fl.server_init(base.init_params(task), server_opt)
    for r in range(c.fl.rounds):
      server = fl.fedavg_round(
        server,
        runner,
        (cl.x, cl.y),
        cl.valid,
        None,
        seed=c.seed,
        round_idx=r,
        client_weights=weights,
        num_sampled=k_sampled,
        server_opt=server_opt,
      ).server
    return jax.block_until_ready(server.params)

  seeds = list(range(FLAGS.models))
  init = jax.tree.map(
    lambda *a: jnp.stack(a),
    *[base.init_params(task, fl.stream_key(s, fl.STREAM_INIT)) for s in seeds],
  )
  brunner = bank.BankRunner(program, c.fl.batch_size)

  def bank_run():
    p = bank.fedavg_bank(
      brunner,
      init,
      (cl.x, cl.y),
      cl.valid,
      seeds=seeds,
      num_rounds=c.fl.rounds,
      epochs=c.fl.local_epochs,
      client_weights=weights,
      num_sampled=k_sampled,
      server_lr=c.fl.server_lr,
    )
    return jax.block_until_ready(p)

  def step_flops():
    """XLA's FLOP count of one SGD step (forward, backward, update) on one batch."""
    x = cl.x[0, : c.fl.batch_size]
    y = cl.y[0, : c.fl.batch_size]
    state = program.init(base.init_params(task), None, None)
    batch = fl.Batch(x, y, jnp.ones(y.shape, bool))
    compiled = jax.jit(lambda s, b: program.step(s, b, None)).lower(state, batch).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  def dense_gflops(n=1024, reps=10):
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    t0 = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(mm(a))
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9

  times = {}
  for name, fn in (("one", one_run), ("bank", bank_run)):
    t = []
    for _ in range(2):
      t0 = time.perf_counter()
      fn()
      t.append(time.perf_counter() - t0)
    times[name] = t
  print(
    f"model={c.model.name} clients={c.data.num_clients} rounds={c.fl.rounds} local_epochs="
    f"{c.fl.local_epochs} one-run runner={kind}"
  )
  print(f"one model:      first call {times['one'][0]:.2f} s, compiled {times['one'][1]:.2f} s")
  print(
    f"bank of {FLAGS.models:3d}:    first call {times['bank'][0]:.2f} s, compiled "
    f"{times['bank'][1]:.2f} s"
  )
  print(
    f"bank / one run (compiled): {times['bank'][1] / times['one'][1]:.2f}x for "
    f"{FLAGS.models} models ({times['bank'][1] / times['one'][1] / FLAGS.models:.3f}x per "
    f"model); with compilation: {times['bank'][0] / times['one'][0]:.2f}x"
  )
  counts = np.asarray(cl.valid).sum(axis=1)
  batches = c.fl.rounds * c.fl.local_epochs * int(np.sum(-(-counts // c.fl.batch_size)))
  flops = step_flops() * batches
  print(
    f"achieved: one model {flops / times['one'][1] / 1e9:.1f} GFLOP/s, bank "
    f"{FLAGS.models * flops / times['bank'][1] / 1e9:.1f} GFLOP/s ({batches} batches of "
    f"{c.fl.batch_size} a model); dense 1024x1024 matmul {dense_gflops():.1f} GFLOP/s"
  )


if __name__ == "__main__":
  app.run(main)
