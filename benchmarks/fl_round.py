"""Local-training throughput of one FedAvg round, per client runner, next to PyTorch.

  python benchmarks/fl_round.py [--clients 10] [--per_client 640] [--rounds 3]

The CNN (2 conv 5x5 + dense) on 28x28x1 inputs (Fashion-MNIST when Debian's package is
installed, otherwise seeded noise of the same shape), 10 clients, batch 64, 1 local epoch,
SGD with momentum. Prints images/s of local training for each runner (and conv
implementation), a PyTorch CPU loop training the same architecture on the same data (the
optional `bench` extra: pip install torch==2.13.0), ratios to PyTorch, and the share of this
machine's matmul GFLOP/s (measured in the same run) each reaches. All in one process, side by
side, because these machines are shared and noisy.
"""
import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fu_jax import data as data_lib  # noqa: E402
from fu_jax import fl  # noqa: E402
from fu_jax import models  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


def load(num_clients, per_client, seed=0):
  if os.path.isdir(FMNIST):
    ds = data_lib.load_dataset(f"idx:{FMNIST}", seed=seed)
    x, y, src = ds.x_train, ds.y_train, "Fashion-MNIST"
  else:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_clients * per_client, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int32)
    src = "noise"
  parts = data_lib.partition_iid(y[:num_clients * per_client], num_clients, seed)
  return data_lib.stack_clients(x, y, parts), src


def matmul_gflops(n=1024, reps=20):
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def step_flops_per_image(model, params, batch_size):
  opt = optax.sgd(0.05, momentum=0.9)

  def step(p, o, x, y):
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": q}, x), y).mean()
    g = jax.grad(loss)(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  x = jnp.zeros((batch_size, 28, 28, 1))
  y = jnp.zeros((batch_size,), jnp.int32)
  cost = jax.jit(step).lower(params, opt.init(params), x, y).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch_size


def bench_runner(kind, impl, clients, rounds, batch_size):
  model = models.create("cnn", 10, conv_impl=impl)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  program = fl.sgd_program(model.apply, optax.sgd(0.05, momentum=0.9))
  runner = fl.ClientRunner(program, kind=kind, epochs=1, batch_size=batch_size)
  x, y, valid = (jnp.asarray(clients.x), jnp.asarray(clients.y), jnp.asarray(clients.valid))
  n = valid.shape[0]
  keys = jax.vmap(lambda c: fl.stream_key(0, fl.STREAM_CLIENT, 0, c))(jnp.arange(n))
  jax.block_until_ready(runner.run(params, (x, y), valid, None, keys).params)  # compile
  t = time.perf_counter()
  for _ in range(rounds):
    out = runner.run(params, (x, y), valid, None, keys)
  jax.block_until_ready(out.params)
  return rounds * int(clients.count.sum()) / (time.perf_counter() - t)


def bench_torch(clients, rounds, batch_size):
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 2)
  torch.manual_seed(0)

  def net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(7 * 7 * 64, 10))

  xs = [torch.from_numpy(np.asarray(clients.x[k, :c]).transpose(0, 3, 1, 2).copy())
        for k, c in enumerate(np.asarray(clients.count))]
  ys = [torch.from_numpy(np.asarray(clients.y[k, :c]).astype(np.int64))
        for k, c in enumerate(np.asarray(clients.count))]
  global_model = net()

  def one_round():
    for xk, yk in zip(xs, ys):  # each client: copy of the global model, one local epoch
      m = net()
      m.load_state_dict(global_model.state_dict())
      opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
      perm = torch.randperm(len(xk))
      for s in range(0, len(xk), batch_size):
        idx = perm[s:s + batch_size]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(xk[idx]), yk[idx]).backward()
        opt.step()

  one_round()  # warm-up
  t = time.perf_counter()
  for _ in range(rounds):
    one_round()
  return rounds * int(clients.count.sum()) / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clients", type=int, default=10)
  p.add_argument("--per_client", type=int, default=640)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args()
  clients, src = load(args.clients, args.per_client)
  print(f"data: {src}, {args.clients} clients x {args.per_client} images, batch "
        f"{args.batch_size}; jax {jax.__version__} on {jax.default_backend()} "
        f"({jax.device_count()} devices), {os.cpu_count()} cores")
  gflops = matmul_gflops()
  model = models.create("cnn", 10)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  flops = step_flops_per_image(model, params, args.batch_size)
  print(f"matmul: {gflops:.1f} GFLOP/s; train step: {flops / 1e6:.1f} MFLOP per image (XLA)")
  torch_ips = bench_torch(clients, args.rounds, args.batch_size)
  rows = [("pytorch loop", torch_ips)]
  for kind in ("loop", "vmap", "shard"):
    for impl in ("xla", "canonical", "im2col"):
      rows.append((f"{kind} / {impl}", bench_runner(kind, impl, clients, args.rounds,
                                                     args.batch_size)))
  auto = fl.choose_runner("cnn")
  auto_impl = models.create("cnn", 10).conv_impl
  rows.append((f"auto (= {auto} / {auto_impl})", dict(rows)[f"{auto} / {auto_impl}"]))
  print(f"{'runner / conv':28s} {'images/s':>10s} {'vs torch':>9s} {'GFLOP/s':>8s} "
        f"{'of matmul':>9s}")
  for name, ips in rows:
    if ips is None:
      print(f"{name:28s} {'(torch not installed)':>10s}")
      continue
    ratio = f"{ips / torch_ips:.2f}x" if torch_ips else "-"
    g = ips * flops / 1e9
    print(f"{name:28s} {ips:10.0f} {ratio:>9s} {g:8.1f} {g / gflops:9.0%}")


if __name__ == "__main__":
  main()
