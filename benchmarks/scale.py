"""Memory and round time vs the number of clients: one copy of the data vs padded blocks.

  python benchmarks/scale.py [--clients 100,1000,10000] [--partitions client_dirichlet,iid]
      [--layouts index,padded] [--model mlp] [--rounds 3] [--max_padded_gb 6]

Full Fashion-MNIST (`experiments/configs/fashion_mnist.py`), 100 clients sampled per round
(fl.clients_per_round=100), 1 local epoch, batch 64; partitions `client_dirichlet` (alpha 0.1,
size_sigma 1.0, min_size 1) and `iid`. Each (partition, clients, layout) runs in its own
subprocess so peak resident memory (resource.getrusage ru_maxrss) is that configuration's
alone. In it: the task is built as an experiment builds it (`experiments.task.build_task`),
then one warm-up FedAvg round (compilation) and `--rounds` timed rounds through
`fl.fedavg_round`, exactly as `base.fedavg_phase` calls it.

Layouts:
  index   the training set once on the device (uint8 + lookup table), clients as int32
          index blocks (`fu_jax.images`): what experiments use.
  padded  the former layout: every client's images copied into a [clients, max_n, 28, 28, 1]
          float32 block (`data.stack_clients`) on the device. Skipped, with its size printed,
          when the block alone would exceed --max_padded_gb (the machine is shared).

Per row: peak RSS, the padded block's size (what the former layout must hold), seconds per
round (median of the timed rounds), the images trained per round (the cohort's data, which
depends on how much data 100 clients hold, not on the number of clients), and the part of
a round spent outside local training (sampling, selecting the cohort's data, aggregation):
the part that could grow with the number of clients.

  python benchmarks/scale.py --side_by_side --model mlp --cohort 20

instead times the local training of one IID cohort (`--cohort` clients of 600 images) from
the padded block and from the index block, interleaved 3 times in one process: the cost of
gathering and normalising per batch, as a ratio that the shared machine's load affects alike.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one(args):
  """One configuration in this process; prints a JSON line."""
  from fu_jax import xla_flags  # pylint: disable=g-import-not-at-top

  xla_flags.use_defaults()  # as experiments.main: before jax initialises its backend
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from experiments import task as task_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  from fu_jax import fl  # pylint: disable=g-import-not-at-top
  from fu_jax.methods import base  # pylint: disable=g-import-not-at-top

  cfg = fashion_mnist.get_config()
  cfg.method = "fedavg"
  cfg.data.num_clients = args.num_clients
  cfg.data.partition = args.partition
  cfg.data.alpha = 0.1
  cfg.data.size_sigma = 1.0
  cfg.data.min_size = 1
  cfg.fl.clients_per_round = 100
  cfg.model.name = args.model
  t0 = time.perf_counter()
  task = task_lib.build_task(cfg)
  build_s = time.perf_counter() - t0
  c = task.clients
  n_clients, max_n = c.valid.shape
  padded_bytes = n_clients * max_n * int(np.prod(task.input_shape)) * 4
  out = dict(
    partition=args.partition,
    clients=n_clients,
    layout=args.layout,
    model=args.model,
    max_n=int(max_n),
    padded_gb=padded_bytes / 2**30,
    build_s=build_s,
  )
  x = c.x
  if args.layout == "padded":
    if padded_bytes > args.max_padded_gb * 2**30:
      out["skipped"] = f"padded block {padded_bytes / 2**30:.1f} GB > --max_padded_gb"
      print(json.dumps(out), flush=True)
      return
    idx = np.asarray(c.index)
    block = np.where(
      (idx >= 0)[..., None, None, None], task.dataset.x_train[np.maximum(idx, 0)], 0
    ).astype(np.float32)
    x = jnp.asarray(block)  # as the former build_task: numpy blocks, then the device
    del block
  program = fl.sgd_program(task.apply_fn, base.client_optimizer(cfg))
  runner = fl.ClientRunner(
    program, kind=fl.choose_runner(args.model), epochs=1, batch_size=cfg.fl.batch_size
  )
  local = []
  inner = runner.run

  def timed_run(*a, **kw):
    t = time.perf_counter()
    res = inner(*a, **kw)
    jax.block_until_ready(res.params)
    local.append(time.perf_counter() - t)
    return res

  runner.run = timed_run
  server_opt = optax.sgd(cfg.fl.server_lr)
  server = fl.server_init(base.init_params(task), server_opt)
  k = base.num_sampled(cfg)
  weights = np.ones(n_clients, np.float32)
  times, imgs = [], []
  counts = np.asarray(c.count)
  for r in range(1 + args.rounds):
    t = time.perf_counter()
    res = fl.fedavg_round(
      server,
      runner,
      (x, c.y),
      c.valid,
      None,
      seed=cfg.seed,
      round_idx=r,
      client_weights=weights,
      num_sampled=k,
      server_opt=server_opt,
    )
    jax.block_until_ready(res.server.params)
    server = res.server
    if r:  # round 0 compiles
      times.append(time.perf_counter() - t)
      imgs.append(int(counts[res.sampled].sum()))
  outside = [t - l for t, l in zip(times, local[1:])]
  out.update(
    round_s=statistics.median(times),
    images_per_round=statistics.median(imgs),
    outside_s=statistics.median(outside),
    peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    loss=res.metrics["loss"],
  )
  print(json.dumps(out), flush=True)


def side_by_side(args):
  """Local training of one cohort from both layouts, interleaved; prints medians and ratio."""
  from fu_jax import xla_flags  # pylint: disable=g-import-not-at-top

  xla_flags.use_defaults()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from fu_jax import data, fl, images, models  # pylint: disable=g-import-not-at-top

  ds = data.load_dataset("idx:/usr/share/datasets/fashion-mnist")
  parts = data.partition(ds.y_train, 100, kind="iid", seed=0)[: args.cohort]
  old = data.stack_clients(ds.x_train, ds.y_train, parts)
  layouts = {
    "padded": jnp.asarray(old.x),
    "index": images.ClientImages(jnp.asarray(old.index), images.dataset_table(ds)),
  }
  y, valid = jnp.asarray(old.y), jnp.asarray(old.valid)
  model = models.create(args.model, 10)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  kind = fl.choose_runner(args.model)
  runner = fl.ClientRunner(
    fl.sgd_program(model.apply, optax.sgd(0.05)), kind=kind, epochs=1, batch_size=64
  )
  keys = jax.vmap(lambda c: fl.stream_key(0, fl.STREAM_CLIENT, 0, c))(jnp.arange(args.cohort))
  run = lambda x: jax.block_until_ready(runner.run(params, (x, y), valid, None, keys).params)
  for x in layouts.values():
    run(x)  # compile
  times = {k: [] for k in layouts}
  for _ in range(3):
    for k, x in layouts.items():
      t = time.perf_counter()
      run(x)
      times[k].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"# {' '.join(sys.argv)}; load {os.getloadavg()}")
  print(
    f"{args.model} {kind} runner, {args.cohort} clients, {int(old.count.sum())} images: "
    f"padded {med['padded']:.2f} s, index {med['index']:.2f} s, index/padded "
    f"{med['index'] / med['padded']:.2f} (all: {times})"
  )


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clients", default="100,1000,10000")
  p.add_argument("--partitions", default="client_dirichlet,iid")
  p.add_argument("--layouts", default="index,padded")
  p.add_argument("--model", default="mlp")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--max_padded_gb", type=float, default=6.0)
  p.add_argument("--side_by_side", action="store_true")
  p.add_argument("--cohort", type=int, default=20)
  p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--num_clients", type=int, help=argparse.SUPPRESS)
  p.add_argument("--partition", help=argparse.SUPPRESS)
  p.add_argument("--layout", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    one(args)
    return
  if args.side_by_side:
    side_by_side(args)
    return
  print(f"# {' '.join(sys.argv)}\n# load: {os.getloadavg()}", flush=True)
  print(
    "| partition | clients | layout | max_n | peak RSS GB | padded block GB | s / round "
    "| images / round | s outside local training |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for part in args.partitions.split(","):
    for n in [int(v) for v in args.clients.split(",")]:
      for layout in args.layouts.split(","):
        cmd = [
          sys.executable,
          os.path.abspath(__file__),
          "--one",
          f"--num_clients={n}",
          f"--partition={part}",
          f"--layout={layout}",
          f"--model={args.model}",
          f"--rounds={args.rounds}",
          f"--max_padded_gb={args.max_padded_gb}",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode or not lines:
          print(f"| {part} | {n} | {layout} | failed: {proc.stderr.strip()[-300:]} |", flush=True)
          continue
        r = json.loads(lines[-1])
        if "skipped" in r:
          print(
            f"| {part} | {n} | {layout} | {r['max_n']} | not run | {r['padded_gb']:.2f} "
            f"| — | — | — |",
            flush=True,
          )
          continue
        print(
          f"| {part} | {n} | {layout} | {r['max_n']} | {r['peak_rss_gb']:.2f} | "
          f"{r['padded_gb']:.2f} | {r['round_s']:.2f} | {r['images_per_round']} | "
          f"{r['outside_s']:.3f} |",
          flush=True,
        )
  print(f"# load after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
  main()
