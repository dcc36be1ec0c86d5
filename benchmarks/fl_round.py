"""Local-training throughput of one FedAvg round, per client runner, next to PyTorch.

  python benchmarks/fl_round.py [--clients 10] [--per_client 640] [--reps 3] [--budget 5]
      [--runners loop,vmap,shard] [--impls xla,canonical,im2col] [--no-default_flags]
      [--no-two_cores]

`--runners loop --impls xla --no-default_flags` times just what `auto` runs on CPU (and the
PyTorch loop, the plain jitted step and the two-core rows) in a minute or two.

The CNN (2 conv 5x5 + dense) on 28x28x1 inputs (Fashion-MNIST when Debian's package is
installed, otherwise seeded noise of the same shape), 10 clients, batch 64, 1 local epoch,
SGD with momentum. Prints images/s of local training for each runner and conv
implementation, a plain jitted step (no runner), and a PyTorch CPU loop training the same
architecture on the same data (the optional `bench` extra: pip install torch==2.13.0), as
ratios to PyTorch, and the share of this machine's matmul GFLOP/s (measured in the same run)
each reaches. Measurements are repeated `--reps` times, interleaved across rows so every row
sees the same machine load, and the median is printed.

XLA reads its flags once per process, so the table is measured twice: in this process with
XLA's own defaults, and in a child process with fu_jax's default flags (fu_jax/xla_flags.py,
what experiments.main uses); both columns come from the same invocation.

A last pair of rows (`--two_cores`, on by default) tries two clients at once on separate
cores instead of one client on both: a third child process simulates 2 host devices with
one intra-op thread each (`xla_flags.per_core_devices(2)`) and runs the loop runner with
`devices=` both of them (client 2k on device 0, 2k+1 on device 1, their jitted steps
dispatched alternately; JAX dispatch is asynchronous, so both devices compute at once);
next to it the same runner one client at a time on one device with that single thread.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fu_jax import data as data_lib  # noqa: E402
from fu_jax import (
  fl,  # noqa: E402
  models,  # noqa: E402
  xla_flags,  # noqa: E402
)

FMNIST = "/usr/share/datasets/fashion-mnist"
TWO_CORE_FLAGS = xla_flags.per_core_devices(2)


def load(num_clients, per_client, seed=0):
  if os.path.isdir(FMNIST):
    ds = data_lib.load_dataset(f"idx:{FMNIST}", seed=seed)
    x, y, src = ds.x_train, ds.y_train, "Fashion-MNIST"
  else:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_clients * per_client, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int32)
    src = "noise"
  parts = data_lib.partition_iid(y[: num_clients * per_client], num_clients, seed)
  return data_lib.stack_clients(x, y, parts), src


def matmul_gflops(n=1024, reps=20):
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def step_flops_per_image(model, params, batch_size):
  opt = optax.sgd(0.05, momentum=0.9)

  def step(p, o, x, y):
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": q}, x), y
    ).mean()
    g = jax.grad(loss)(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  x = jnp.zeros((batch_size, 28, 28, 1))
  y = jnp.zeros((batch_size,), jnp.int32)
  cost = jax.jit(step).lower(params, opt.init(params), x, y).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch_size


def runner_timer(kind, impl, clients, batch_size, budget_s, devices=None):
  """A callable timing one round of `kind`/`impl` local training -> (images, seconds).

  A round on fewer examples per client runs the same compiled step (only the valid mask
  and so the step count change), so slow runner/conv combinations are timed on a prefix of
  each client's data sized to take about `budget_s` seconds, not on all of it.
  """
  model = models.create("cnn", 10, conv_impl=impl)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  program = fl.sgd_program(models.logits_fn(model), optax.sgd(0.05, momentum=0.9))
  runner = fl.ClientRunner(program, kind=kind, epochs=1, batch_size=batch_size, devices=devices)
  x, y, valid = (jnp.asarray(clients.x), jnp.asarray(clients.y), jnp.asarray(clients.valid))
  n = valid.shape[0]
  keys = jax.vmap(lambda c: fl.stream_key(0, fl.STREAM_CLIENT, 0, c))(jnp.arange(n))
  pos = jnp.arange(valid.shape[1])[None, :]

  def timed(steps):
    v = valid & (pos < steps * batch_size)
    t = time.perf_counter()
    jax.block_until_ready(runner.run(params, (x, y), v, None, keys).params)
    return int(v.sum()), time.perf_counter() - t

  timed(1)  # compile
  _, secs = timed(2)
  full_steps = -(-int(clients.count.max()) // batch_size)
  steps = max(2, min(full_steps, int(2 * budget_s / max(secs, 1e-9))))
  return lambda: timed(steps), steps


def cnn_sgd_step():
  """(params, optimizer, jitted step(params, opt_state, x, y)) of the CNN, for the timers."""
  model = models.create("cnn", 10)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  opt = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(p, o, x, y):
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": q}, x), y
    ).mean()
    u, o = opt.update(jax.grad(loss)(p), o, p)
    return optax.apply_updates(p, u), o

  return params, opt, step


def plain_step_timer(clients, batch_size):
  """jit(step) on one client's batches from the host: the step alone, no runner."""
  params, opt, step = cnn_sgd_step()

  count = int(clients.count[0])
  xs = [
    jnp.asarray(clients.x[0, s : s + batch_size])
    for s in range(0, count - batch_size + 1, batch_size)
  ]
  ys = [
    jnp.asarray(clients.y[0, s : s + batch_size])
    for s in range(0, count - batch_size + 1, batch_size)
  ]
  jax.block_until_ready(step(params, opt.init(params), xs[0], ys[0]))

  def timed():
    p, o = params, opt.init(params)
    t = time.perf_counter()
    for xb, yb in zip(xs, ys):
      p, o = step(p, o, xb, yb)
    jax.block_until_ready(p)
    return len(xs) * batch_size, time.perf_counter() - t

  return timed, len(xs)


def two_core_timers(clients, batch_size, budget_s):
  """[(name, timer, steps)]: the loop runner one client at a time on one single-threaded
  device, and over both devices, two clients at once (`devices=`, see the module doc)."""
  devs = jax.devices()[:2]
  return [
    ("loop, 1 device x 1 thread",)
    + runner_timer("loop", "xla", clients, batch_size, budget_s, devices=devs[:1]),
    ("loop, 2 devices x 1 thread",)
    + runner_timer("loop", "xla", clients, batch_size, budget_s, devices=devs),
  ]


def jax_rows(clients, batch_size, budget_s, reps, kinds=("loop", "vmap", "shard"), impls=None):
  """[(name, median images/s, steps timed per client)] for every runner x conv impl."""
  timers = [("jit step, no runner",) + plain_step_timer(clients, batch_size)]
  for kind in kinds:
    for impl in impls or models.CONV_IMPLS:
      timers.append((f"{kind} / {impl}",) + runner_timer(kind, impl, clients, batch_size, budget_s))
  rates = {name: [] for name, _, _ in timers}
  for _ in range(reps):  # interleaved: each row sees the same load
    for name, timed, _ in timers:
      images, secs = timed()
      rates[name].append(images / secs)
  return [(name, statistics.median(rates[name]), steps) for name, _, steps in timers]


def torch_timer(clients, batch_size):
  """A PyTorch CPU loop: each client copies the global model and runs one local epoch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 2)
  torch.manual_seed(0)

  def net():
    return torch.nn.Sequential(
      torch.nn.Conv2d(1, 32, 5, padding=2),
      torch.nn.ReLU(),
      torch.nn.MaxPool2d(2),
      torch.nn.Conv2d(32, 64, 5, padding=2),
      torch.nn.ReLU(),
      torch.nn.MaxPool2d(2),
      torch.nn.Flatten(),
      torch.nn.Linear(7 * 7 * 64, 10),
    )

  xs = [
    torch.from_numpy(np.asarray(clients.x[k, :c]).transpose(0, 3, 1, 2).copy())
    for k, c in enumerate(np.asarray(clients.count))
  ]
  ys = [
    torch.from_numpy(np.asarray(clients.y[k, :c]).astype(np.int64))
    for k, c in enumerate(np.asarray(clients.count))
  ]
  global_model = net()

  def one_round():
    for xk, yk in zip(xs, ys):  # each client: copy of the global model, one local epoch
      m = net()
      m.load_state_dict(global_model.state_dict())
      opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
      perm = torch.randperm(len(xk))
      for s in range(0, len(xk), batch_size):
        idx = perm[s : s + batch_size]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(xk[idx]), yk[idx]).backward()
        opt.step()

  one_round()  # warm-up
  images = int(clients.count.sum())

  def timed():
    t = time.perf_counter()
    one_round()
    return images, time.perf_counter() - t

  return timed


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clients", type=int, default=10)
  p.add_argument("--per_client", type=int, default=640)
  p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument(
    "--budget",
    type=float,
    default=5.0,
    help="seconds per timed round at most (slow runners see a data prefix)",
  )
  p.add_argument(
    "--two_cores",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also time two clients at once on two single-threaded devices",
  )
  p.add_argument(
    "--runners",
    default="loop,vmap,shard",
    help="runner rows to time (the default prints all three, e.g. for GPU/TPU)",
  )
  p.add_argument(
    "--impls",
    default=",".join(models.CONV_IMPLS),
    help="conv implementations to time for each runner",
  )
  p.add_argument(
    "--default_flags",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also time every row with XLA's default flags (the left column)",
  )
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--two_core_child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  kinds = tuple(k for k in args.runners.split(",") if k)
  bad = [k for k in kinds if k not in fl.RUNNERS[1:]]
  if bad:
    raise SystemExit(f"--runners: {bad[0]!r} is not one of {', '.join(fl.RUNNERS[1:])}")
  impls = tuple(i for i in args.impls.split(",") if i)
  bad = [i for i in impls if i not in models.CONV_IMPLS]
  if bad:
    raise SystemExit(f"--impls: {bad[0]!r} is not one of {', '.join(models.CONV_IMPLS)}")
  clients, src = load(args.clients, args.per_client)
  if args.child:  # fu_jax's flags are in XLA_FLAGS: print this process's rows only
    print(json.dumps(jax_rows(clients, args.batch_size, args.budget, args.reps, kinds, impls)))
    return
  if args.two_core_child:
    timers = two_core_timers(clients, args.batch_size, args.budget)
    rates = {name: [] for name, _, _ in timers}
    for _ in range(args.reps):
      for name, timed, _ in timers:
        images, secs = timed()
        rates[name].append(images / secs)
    print(json.dumps([(name, statistics.median(rates[name]), steps) for name, _, steps in timers]))
    return

  def child_rows(flag, extra_flags=""):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra_flags}".strip()
    xla_flags.use_defaults(env)
    child = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), flag, *sys.argv[1:]],
      env=env,
      stdout=subprocess.PIPE,
      text=True,
    )
    child.wait()  # alone: two processes must not share the cores
    return json.loads(child.stdout.read().strip().splitlines()[-1])

  fu_rows = child_rows("--child")
  two_rows = child_rows("--two_core_child", TWO_CORE_FLAGS) if args.two_cores else []
  print(
    f"data: {src}, {args.clients} clients x {args.per_client} images, batch "
    f"{args.batch_size}; jax {jax.__version__} on {jax.default_backend()} "
    f"({jax.device_count()} devices), {os.cpu_count()} cores, load average "
    f"{os.getloadavg()[0]:.1f}"
  )
  gflops = matmul_gflops()
  model = models.create("cnn", 10)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  flops = step_flops_per_image(model, params, args.batch_size)
  print(f"matmul: {gflops:.1f} GFLOP/s; train step: {flops / 1e6:.1f} MFLOP per image (XLA)")
  torch_timed = torch_timer(clients, args.batch_size)
  torch_ips = None
  if torch_timed is not None:
    torch_ips = statistics.median(i / s for i, s in (torch_timed() for _ in range(args.reps)))
  if args.default_flags:
    xla_rows = jax_rows(clients, args.batch_size, args.budget, args.reps, kinds, impls)
  else:
    xla_rows = [(name, None, steps) for name, _, steps in fu_rows]
  full_steps = -(-args.per_client // args.batch_size)

  def cols(ips):
    if ips is None:
      return f"{'-':>9s} {'-':>7s} {'-':>6s}"
    g = ips * flops / 1e9
    ratio = f"{ips / torch_ips:.2f}x" if torch_ips else "-"
    return f"{ips:9.0f} {ratio:>7s} {g / gflops:6.0%}"

  print(f"{'':26s} {'XLA default flags':^24s}   {'fu_jax flags':^24s}")
  print(
    f"{'runner / conv':26s} {'img/s':>9s} {'/torch':>7s} {'matmul':>6s}   "
    f"{'img/s':>9s} {'/torch':>7s} {'matmul':>6s}  steps/client"
  )
  print(f"{'pytorch loop':26s} {cols(torch_ips)}   {'':24s}  {full_steps}/{full_steps}")
  for (name, ips, steps), (_, fu_ips, fu_steps) in zip(xla_rows, fu_rows):
    print(f"{name:26s} {cols(ips)}   {cols(fu_ips)}  {fu_steps}/{full_steps}")
  auto = f"{fl.choose_runner('cnn')} / {models.create('cnn', 10).conv_impl}"
  runners = [r for r in fu_rows if "/" in r[0]]
  best = max(runners, key=lambda r: r[1])
  auto_ips = dict((r[0], r[1]) for r in runners).get(auto, float("nan"))
  for name, ips, steps in two_rows:
    print(f"{name:26s} {'':24s}   {cols(ips)}  {steps}/{full_steps}")
  if two_rows:
    print(
      f"  (the last {len(two_rows)} rows: a child with XLA_FLAGS={TWO_CORE_FLAGS} and "
      "fu_jax's flags)"
    )
  print(
    f"auto = {auto}; best fixed (fu_jax flags) = {best[0]}; auto / best = "
    f"{auto_ips / best[1]:.2f}"
    + (f"; auto / torch = {auto_ips / torch_ips:.2f}" if torch_ips else "")
  )


if __name__ == "__main__":
  main()
