"""Train-step throughput (images/s) of the conv implementations under each client-runner shape.

    python -m benchmarks.conv_impl                      # cnn, 28x28x1, batch 64, all modes
    python -m benchmarks.conv_impl --modes=jit,scan --impls=xla,im2col --budget=5

One SGD step = forward + backward + params -= lr * grad on a batch (cross-entropy). Modes:
  jit        jit(step) called from a Python loop (one dispatch per step)
  vmap       jit(vmap(step)) over --clients clients with separate params (one step each)
  scan       jit(lax.scan(step)) over --steps steps
  scan_u2    the same with unroll=2
  scan_full  the same with unroll=--steps (no loop left)
  vmap_scan  vmap over --round_clients clients of scan over --round_steps steps (a whole round
             in one dispatch, what a `vmap` runner does)
  map_scan   lax.map (sequential) over the same clients of the same scan (one dispatch, clients
             one after another)
Each cell: images per call / wall time of a call, after compilation (compile time printed
separately), as best (fastest call) and median. No assertion: on a shared machine other jobs
only ever slow a call down, so `best` is the more faithful number; read both with the load
average printed next to them.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax import losses, models, xla_flags

xla_flags.use_defaults()  # before any JAX computation

MODES = ("jit", "vmap", "scan", "scan_u2", "scan_full", "vmap_scan", "map_scan")


def make_step(module, lr):
  def loss_fn(params, x, y):
    return jnp.mean(losses.cross_entropy(module.apply({"params": params}, x), y))

  def step(params, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)

  return step


def scan_steps(step, unroll=1):
  def run(params, xs, ys):
    return jax.lax.scan(lambda p, b: (step(p, *b), None), params, (xs, ys), unroll=unroll)[0]

  return run


def stack(tree, n):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape).copy(), tree)


def build(mode, step, params, x, y, a):
  """(function, args, images per call) for a mode."""
  if mode == "jit":
    return step, (params, x, y), x.shape[0]
  if mode == "vmap":
    c = a.clients
    return jax.vmap(step), (stack(params, c), stack(x, c), stack(y, c)), c * x.shape[0]
  if mode.startswith("scan"):
    s = a.steps
    unroll = {"scan": 1, "scan_u2": 2, "scan_full": s}[mode]
    return scan_steps(step, unroll), (params, stack(x, s), stack(y, s)), s * x.shape[0]
  c, s = a.round_clients, a.round_steps
  run = scan_steps(step)
  xs, ys = stack(stack(x, s), c), stack(stack(y, s), c)
  if mode == "vmap_scan":
    fn = jax.vmap(run)
  else:
    fn = lambda p, xs, ys: jax.lax.map(lambda c: run(*c), (p, xs, ys))
  return fn, (stack(params, c), xs, ys), c * s * x.shape[0]


def measure(fn, args, budget):
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t
  times = []
  end = time.perf_counter() + budget
  while len(times) < 2 or (time.perf_counter() < end and len(times) < 50):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  # The first call can include one-time allocation; drop it when there are enough calls.
  times = times[1:] if len(times) > 2 else times
  return min(times), statistics.median(times), compile_s


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="cnn")
  p.add_argument("--input", default="28,28,1", help="H,W,C")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--clients", type=int, default=10, help="clients for vmap")
  p.add_argument("--steps", type=int, default=8, help="steps for scan*")
  p.add_argument("--round_clients", type=int, default=4, help="clients for vmap_scan/map_scan")
  p.add_argument("--round_steps", type=int, default=4, help="steps for vmap_scan/map_scan")
  p.add_argument("--impls", default=",".join(models.CONV_IMPLS))
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per cell")
  p.add_argument("--lr", type=float, default=0.05)
  a = p.parse_args()
  shape = tuple(int(v) for v in a.input.split(","))
  impls, modes = a.impls.split(","), a.modes.split(",")
  for m in modes:
    if m not in MODES:
      raise ValueError(f"unknown mode {m!r}; allowed: {MODES}")

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((a.batch,) + shape, dtype=np.float32))
  y = jnp.asarray(rng.integers(0, a.classes, a.batch, dtype=np.int32))
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
    f"load avg {os.getloadavg()[0]:.1f}; {a.model} {shape} batch {a.batch}, "
    f"vmap {a.clients} clients, scan {a.steps} steps, "
    f"round {a.round_clients} clients x {a.round_steps} steps",
    flush=True,
  )
  results = {}
  for impl in impls:
    module = models.create(a.model, a.classes, conv_impl=impl)
    params = models.init_params(module, jax.random.PRNGKey(0), shape)
    step = make_step(module, a.lr)
    for mode in modes:
      fn, args, images = build(mode, step, params, x, y, a)
      best, median, compile_s = measure(fn, args, a.budget)
      results[mode, impl] = (images / best, images / median)
      print(
        f"  {mode:10s} {impl:10s} best {images / best:6.0f} img/s, median "
        f"{images / median:6.0f} img/s ({median * 1e3:8.1f} ms/call, "
        f"compile {compile_s:5.1f} s, load {os.getloadavg()[0]:.1f})",
        flush=True,
      )

  print(f"\nimages/s, best (median); higher is better; load avg at end {os.getloadavg()[0]:.1f}")
  print(f"{'mode':10s}" + "".join(f"{i:>16s}" for i in impls))
  for mode in modes:
    print(f"{mode:10s}" + "".join(f"{'%.0f (%.0f)' % results[mode, i]:>16s}" for i in impls))


if __name__ == "__main__":
  main()
