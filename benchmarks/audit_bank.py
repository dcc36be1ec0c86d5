r"""Cost of a vmapped bank of K FedAvg models against one model's run, side by side.

  python benchmarks/audit_bank.py --model=mlp --models=16
  python benchmarks/audit_bank.py --model=cnn --models=16 --rounds=2

The setting is experiments/configs/audit_digits.py (digits, 3 clients, 5 local epochs). One
model's run = fl.fedavg_round with the client runner the experiments would pick
(`fl.choose_runner`); the bank = fu_jax.bank.fedavg_bank over K training seeds. Each is run
twice in this process: the first call includes compilation, the second is the compiled
cost; the ratio of the second calls is the bank's cost in "runs".
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

from experiments import run as run_lib  # noqa: E402
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
  task = run_lib.build_task(c)
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


if __name__ == "__main__":
  app.run(main)
