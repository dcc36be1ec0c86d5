"""The same FedAvg task with Flower's simulation engine (PyTorch clients) and with fu_jax.

  python benchmarks/flower_fedavg.py [--rounds 3] [--train_size 0] [--frameworks flower,fu_jax]

Task (both frameworks): Fashion-MNIST (Debian's dataset-fashion-mnist), normalised as
fu_jax.data does; the CNN (2 conv 5x5 SAME + ReLU + max pool 2, dense); 10 IID clients (one
seeded partition, the same rows for both); every client trains every round for 1 local epoch,
batch 64, SGD lr 0.05 momentum 0.9 (momentum restarts each round); FedAvg weighted by the
clients' example counts; test accuracy of the global model on the 10,000 test images after
each round.

Flower (the optional `bench` extra: pip install "fu_jax[bench]"): the current Message API,
`flwr.simulation.run_simulation` with a ServerApp running `flwr.serverapp.strategy.FedAvg`
and a ClientApp training a `torch.nn.Module` on CPU; Ray runs the clients, with
`--flower_client_cpus` CPUs per client (1: as many clients at once as cores, each PyTorch with
one thread; Flower's default is 2). The server evaluates centrally through `evaluate_fn`.
fu_jax: `fl.fedavg_round` with the runner `auto` picks on this backend and fu_jax's default
XLA flags, evaluation with the jitted model; `fu_jax_per_core` is the same with one
single-threaded host device per core and the loop runner training one client on each at
once (`xla_flags.per_core_devices`, `fl.ClientRunner(devices=...)`).

Each framework runs in its own child process, one after the other (never both at once), so
they see the same machine and their memory is measured apart: peak memory is the largest
sum of resident set sizes over the child's process tree (Ray's raylet, GCS and worker
processes included), sampled every 0.1 s. Round seconds exclude the central evaluation;
round 1 (Ray's actor start-up, XLA compilation) is printed apart from the mean of the rest.
A fu_jax round is also split into its client steps (the runner's `fl.ClientClock`: each
client's init, steps and finish, waited for) and everything else (sampling, gathering the
sampled clients' rows, aggregation, the server update, the metrics).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FMNIST = "/usr/share/datasets/fashion-mnist"
FRAMEWORKS = ("flower", "fu_jax", "fu_jax_per_core")


# ---------------------------------------------------------------------------------------
# Shared data: one .npz the children read (Ray workers memory-map it).


def write_data(path, num_clients, train_size, seed):
  import numpy as np  # pylint: disable=import-outside-toplevel

  from fu_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  ds = data_lib.load_dataset(f"idx:{FMNIST}", seed=seed)
  x, y = ds.x_train, ds.y_train
  if train_size:
    x, y = x[:train_size], y[:train_size]
  parts = data_lib.partition_iid(y, num_clients, seed)
  order = np.concatenate(parts)
  bounds = np.cumsum([0] + [len(p) for p in parts])
  np.savez(
    path,
    x=x[order],
    y=y[order].astype(np.int64),
    bounds=bounds,
    x_test=ds.x_test,
    y_test=ds.y_test.astype(np.int64),
  )


# ---------------------------------------------------------------------------------------
# Flower + PyTorch.


def torch_net():
  import torch  # pylint: disable=import-outside-toplevel

  nn = torch.nn
  return nn.Sequential(
    nn.Conv2d(1, 32, 5, padding=2),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 5, padding=2),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(7 * 7 * 64, 10),
  )


def torch_accuracy(net, x, y):
  import torch  # pylint: disable=import-outside-toplevel

  net.eval()
  correct = 0
  with torch.no_grad():
    for s in range(0, len(x), 1000):
      xb = torch.from_numpy(x[s : s + 1000].transpose(0, 3, 1, 2).copy())
      correct += int((net(xb).argmax(1).numpy() == y[s : s + 1000]).sum())
  return correct / len(x)


def run_flower(args, data_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # pylint: disable=import-outside-toplevel
  from flwr.clientapp import ClientApp  # pylint: disable=import-outside-toplevel
  from flwr.serverapp import Grid, ServerApp  # pylint: disable=import-outside-toplevel
  from flwr.serverapp.strategy import FedAvg  # pylint: disable=import-outside-toplevel
  from flwr.simulation import run_simulation  # pylint: disable=import-outside-toplevel

  client_app = ClientApp()

  @client_app.train()
  def train(msg: Message, context: Context):
    d = np.load(data_path, mmap_mode="r")
    k = int(context.node_config["partition-id"])
    lo, hi = int(d["bounds"][k]), int(d["bounds"][k + 1])
    x = torch.from_numpy(np.ascontiguousarray(d["x"][lo:hi].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(np.asarray(d["y"][lo:hi]))
    net = torch_net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    total = 0.0
    perm = torch.randperm(len(x))
    for s in range(0, len(x), args.batch_size):
      b = perm[s : s + args.batch_size]
      opt.zero_grad()
      loss = torch.nn.functional.cross_entropy(net(x[b]), y[b])
      loss.backward()
      opt.step()
      total += float(loss) * len(b)
    content = RecordDict(
      {
        "arrays": ArrayRecord(net.state_dict()),
        "metrics": MetricRecord({"train_loss": total / len(x), "num-examples": len(x)}),
      }
    )
    return Message(content=content, reply_to=msg)

  stamps, log = [], []  # evaluate_fn runs before round 1 and after every round
  test = np.load(data_path)
  x_test, y_test = test["x_test"], test["y_test"]

  def evaluate(server_round, arrays):
    t0 = time.perf_counter()
    net = torch_net()
    net.load_state_dict(arrays.to_torch_state_dict())
    acc = torch_accuracy(net, x_test, y_test)
    stamps.append((t0, time.perf_counter()))
    log.append(acc)
    return MetricRecord({"accuracy": acc})

  server_app = ServerApp()

  @server_app.main()
  def main(grid: Grid, context: Context):
    del context
    torch.manual_seed(args.seed)
    strategy = FedAvg(
      fraction_train=1.0,
      fraction_evaluate=0.0,
      min_train_nodes=args.clients,
      min_available_nodes=args.clients,
    )
    strategy.start(
      grid=grid,
      initial_arrays=ArrayRecord(torch_net().state_dict()),
      num_rounds=args.rounds,
      evaluate_fn=evaluate,
    )

  torch.set_num_threads(os.cpu_count() or 1)  # the server's evaluation
  t = time.perf_counter()
  run_simulation(
    server_app=server_app,
    client_app=client_app,
    num_supernodes=args.clients,
    backend_config={"client_resources": {"num_cpus": args.flower_client_cpus, "num_gpus": 0.0}},
  )
  total = time.perf_counter() - t
  # round r runs from the end of evaluation r-1 to the start of evaluation r
  rounds = [stamps[r][0] - stamps[r - 1][1] for r in range(1, len(stamps))]
  return {
    "round_seconds": rounds,
    "accuracy": log[1:],
    "total_seconds": total,
    "setup": f"flwr, {args.flower_client_cpus} CPU(s) per client",
  }


# ---------------------------------------------------------------------------------------
# fu_jax.


def run_fu_jax(args, data_path, per_core=False):
  from fu_jax import xla_flags  # pylint: disable=import-outside-toplevel

  if per_core:  # one single-threaded device per core, one client on each (fl.ClientRunner)
    os.environ["XLA_FLAGS"] = xla_flags.with_defaults(
      os.environ.get("XLA_FLAGS", ""),
      (*xla_flags.per_core_devices(os.cpu_count() or 1).split(), *xla_flags.DEFAULT_FLAGS),
    )
  xla_flags.use_defaults()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from fu_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from fu_jax import (
    fl,  # pylint: disable=import-outside-toplevel
    models,  # pylint: disable=import-outside-toplevel
  )

  t_total = time.perf_counter()
  d = np.load(data_path)
  bounds = d["bounds"]
  parts = [np.arange(bounds[k], bounds[k + 1]) for k in range(args.clients)]
  clients = data_lib.stack_clients(d["x"], d["y"].astype(np.int32), parts)
  x_test, y_test = jnp.asarray(d["x_test"]), np.asarray(d["y_test"])
  model = models.create("cnn", 10)
  apply_fn = models.logits_fn(model)
  params = models.init_params(model, jax.random.key(args.seed), x_test.shape[1:])
  kind = fl.choose_runner("cnn")
  devices = jax.local_devices() if per_core else None
  clock = fl.ClientClock()  # the loop runner's per-client seconds: the round's client steps
  runner = fl.ClientRunner(
    fl.sgd_program(apply_fn, optax.sgd(args.lr, momentum=args.momentum)),
    kind=kind,
    epochs=1,
    batch_size=args.batch_size,
    devices=devices,
    clock=clock,
  )
  server_opt = optax.sgd(1.0)
  server = fl.server_init(params, server_opt)
  data = (jnp.asarray(clients.x), jnp.asarray(clients.y))
  valid = jnp.asarray(clients.valid)
  counts = np.asarray(clients.count, np.float32)

  @jax.jit
  def predict(p, x):
    return jnp.argmax(apply_fn(p, x), -1)

  def accuracy(p):
    hits = sum(
      int((np.asarray(predict(p, x_test[s : s + 1000])) == y_test[s : s + 1000]).sum())
      for s in range(0, len(y_test), 1000)
    )
    return hits / len(y_test)

  rounds, client_seconds, log = [], [], []
  for r in range(args.rounds):
    t, before = time.perf_counter(), clock.serial
    res = fl.fedavg_round(
      server,
      runner,
      data,
      valid,
      None,
      seed=args.seed,
      round_idx=r,
      client_weights=counts > 0,
      num_sampled=args.clients,
      server_opt=server_opt,
    )
    server = jax.block_until_ready(res.server)
    rounds.append(time.perf_counter() - t)
    client_seconds.append(clock.serial - before)
    log.append(accuracy(server.params))
  return {
    "round_seconds": rounds,
    "client_seconds": client_seconds,
    "accuracy": log,
    "total_seconds": time.perf_counter() - t_total,
    "setup": f"fu_jax, runner {kind}"
    + (f" over {len(devices)} 1-thread devices" if per_core else ""),
  }


# ---------------------------------------------------------------------------------------
# Driver.


def tree_rss(pid):
  import psutil  # pylint: disable=import-outside-toplevel

  try:
    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
  except psutil.NoSuchProcess:
    return 0
  total = 0
  for p in procs:
    try:
      total += p.memory_info().rss
    except psutil.NoSuchProcess:
      pass
  return total


def run_child(framework, args, data_path):
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--child",
    framework,
    "--data_path",
    data_path,
    *sys.argv[1:],
  ]
  child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
  peak, done = [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], tree_rss(child.pid))
      time.sleep(0.1)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  out, _ = child.communicate()
  done.set()
  sampler.join()
  if child.returncode:
    raise SystemExit(f"{framework} child failed (exit {child.returncode})")
  res = json.loads(out.strip().splitlines()[-1])
  res["peak_rss_mb"] = peak[0] / 2**20
  return res


def round_split(res):
  """'client steps X s, everything else Y s (Z%)' of a fu_jax round (rounds after the first,
  or the first if it is the only one): the runner's ClientClock times each client (init,
  steps, finish; waited for), the rest of the round is sampling, gathering the sampled
  clients' rows, aggregation, the server update and the metrics."""
  rounds, clients = res["round_seconds"], res["client_seconds"]
  if len(rounds) > 1:
    rounds, clients = rounds[1:], clients[1:]
  total, steps = sum(rounds) / len(rounds), sum(clients) / len(clients)
  return (
    f"per round: client steps {steps:.2f} s, everything else {total - steps:.2f} s "
    f"({(total - steps) / total:.1%} of the round)"
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--clients", type=int, default=10)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--train_size", type=int, default=0, help="first N training images only (0: all 60,000)"
  )
  p.add_argument(
    "--frameworks",
    default=",".join(FRAMEWORKS),
    help="fu_jax_per_core: the loop runner over one 1-thread device per core",
  )
  p.add_argument(
    "--flower_client_cpus",
    type=float,
    default=1.0,
    help="Ray CPUs per Flower client (1: one client per core at a time)",
  )
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--data_path", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    run = {
      "flower": run_flower,
      "fu_jax": run_fu_jax,
      "fu_jax_per_core": lambda a, d: run_fu_jax(a, d, per_core=True),
    }[args.child]
    print(json.dumps(run(args, args.data_path)), flush=True)
    return
  if not os.path.isdir(FMNIST):
    raise SystemExit(f"{FMNIST}: not found (apt-get install dataset-fashion-mnist)")
  frameworks = [f for f in args.frameworks.split(",") if f]
  bad = [f for f in frameworks if f not in FRAMEWORKS]
  if bad:
    raise SystemExit(f"--frameworks: {bad[0]!r} is not one of {', '.join(FRAMEWORKS)}")
  with tempfile.TemporaryDirectory() as tmp:
    data_path = os.path.join(tmp, "fmnist_clients.npz")
    write_data(data_path, args.clients, args.train_size, args.seed)
    results = {}
    for f in frameworks:
      load = os.getloadavg()[0]
      results[f] = run_child(f, args, data_path)
      results[f]["load"] = (load, os.getloadavg()[0])
  print(
    f"Fashion-MNIST {args.train_size or 60000} train images, {args.clients} IID clients, "
    f"CNN, 1 local epoch, batch {args.batch_size}, SGD lr {args.lr} momentum "
    f"{args.momentum}, {args.rounds} rounds; {os.cpu_count()} cores"
  )
  print(
    f"{'framework':44s} {'round 1 s':>9s} {'later s/round':>13s} {'test acc':>9s} "
    f"{'peak MB':>8s} {'total s':>8s}  load"
  )
  for f, r in results.items():
    later = r["round_seconds"][1:]
    later_s = f"{sum(later) / len(later):13.1f}" if later else f"{'-':>13s}"
    print(
      f"{r['setup']:44s} {r['round_seconds'][0]:9.1f} {later_s} "
      f"{r['accuracy'][-1]:9.2%} {r['peak_rss_mb']:8.0f} {r['total_seconds']:8.1f}  "
      f"{r['load'][0]:.1f}-{r['load'][1]:.1f}"
    )
    print(f"{'':44s} accuracy per round: " + ", ".join(f"{a:.2%}" for a in r["accuracy"]))
    if "client_seconds" in r:
      print(f"{'':44s} {round_split(r)}")
  per = lambda r: (
    sum(r["round_seconds"][1:] or r["round_seconds"])
    / len(r["round_seconds"][1:] or r["round_seconds"])
  )
  for name in ("fu_jax", "fu_jax_per_core"):
    if "flower" in results and name in results:
      fw, fj = results["flower"], results[name]
      print(
        f"{name} / Flower speed per round (rounds after the first): "
        f"{per(fw) / per(fj):.2f}x; accuracy difference "
        f"{(fj['accuracy'][-1] - fw['accuracy'][-1]) * 100:+.1f} points"
      )


if __name__ == "__main__":
  main()
