"""What a local step costs: retraining's SGD step against FRR's per-example-Fisher step, on
each convolution implementation, side by side in one process.

    PYTHONPATH=. python benchmarks/frr_step.py [--batch=64] [--repeats=7] [--steps=20] [--side=28]

The CNN of experiments/configs/fashion_mnist.py on 28x28x1 inputs (--side=8: digits), batch 64 (random images:
the cost does not depend on the values). Rows: the clients' SGD step (momentum 0.9, what
retrain, finetune and FedAvg run) and FRR's step (per-example gradients vmapped, their mean
and mean square, the quasi-Newton update; frr.frr_program), each with XLA's convolution and
with im2col. Each cell: `--steps` jitted steps in a Python loop (the loop runner's shape),
timed `--repeats` times with the rows interleaved so they share the machine's load; median
and best images/s. Compilation is excluded (one warm-up call per row).
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fu_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.use_defaults()  # before any JAX computation

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from fu_jax import (
  fl,  # pylint: disable=wrong-import-position
  models,  # pylint: disable=wrong-import-position
)
from fu_jax.methods import frr  # pylint: disable=wrong-import-position


def programs(lr: float):
  out = {}
  for impl in ("xla", "im2col"):
    module = models.create("cnn", 10, conv_impl=impl)
    out[f"sgd, {impl} conv"] = (
      module,
      fl.sgd_program(models.logits_fn(module), optax.sgd(lr, momentum=0.9)),
    )
    # conv_impl='model': the per-example gradients through the module's own convolution.
    out[f"frr, {impl} conv"] = (
      module,
      frr.frr_program(module, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-4, conv_impl="model"),
    )
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--side", type=int, default=28, help="image side (digits: 8)")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, args.side, args.side, 1)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, args.batch).astype(np.int32))
  batch = fl.Batch(x, y, jnp.ones((args.batch,), jnp.bool_))
  key = jax.random.key(0)
  rows = {}
  for name, (module, prog) in programs(0.05).items():
    params = module.init(key, x[:1])["params"]
    step = jax.jit(lambda s, b, k, prog=prog: prog.step(s, b, k)[0])
    state = prog.init(params, None, key)
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state, batch, key))
    rows[name] = {"step": step, "state": state, "compile": time.perf_counter() - t0, "times": []}
  for _ in range(args.repeats):
    for r in rows.values():
      s = r["state"]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        s = r["step"](s, batch, key)
      jax.block_until_ready(s)
      r["times"].append(time.perf_counter() - t0)
  imgs = args.steps * args.batch
  print(f"command: python3 benchmarks/frr_step.py {' '.join(sys.argv[1:])}")
  print(
    f"load (uptime) at the end: {os.getloadavg()}; {args.side}x{args.side}x1 images, "
    f"batch {args.batch}, {args.steps} "
    f"steps per call, {args.repeats} interleaved repeats"
  )
  base = imgs / statistics.median(rows["sgd, xla conv"]["times"])
  print("| step | median img/s | best img/s | vs sgd on xla conv (median) | first call s |")
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    med, best = imgs / statistics.median(r["times"]), imgs / min(r["times"])
    print(f"| {name} | {med:.0f} | {best:.0f} | {med / base:.2f}x | {r['compile']:.1f} |")


if __name__ == "__main__":
  main()
