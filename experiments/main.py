r"""Runs one federated-unlearning experiment.

  python -m experiments.main --method=<name> --config=experiments/configs/<name>.py[:variant] \
      --workdir=<dir> [--config.<key>=<value> ...]

Only parses flags and calls experiments.run.run(config, workdir).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fu_jax import xla_flags

xla_flags.use_defaults()  # before any JAX computation: XLA reads its flags once

from fu_jax import methods  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("method", "fedavg", f"Unlearning method: one of {sorted(methods.REGISTRY)}, "
                    "or 'all' (every method that serves the request, then a comparison).")
flags.DEFINE_list("seeds", [], "Run each of these seeds into <workdir>/seed_<s>/ (overrides "
                  "config.seed), then compare mean and spread.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.",
                    required=True)
config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).",
                                lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from experiments import run  # heavy imports after flag parsing: --help stays fast
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/configs/digits.py")
  try:
    names = run.methods_for(FLAGS.method, config.unlearn.kind)
    seeds = [int(s) for s in FLAGS.seeds] or [None]
    for seed in seeds:
      workdir = FLAGS.workdir if seed is None else os.path.join(FLAGS.workdir, f"seed_{seed}")
      for name in names:
        with config.unlocked():
          config.method = name
          if seed is not None:
            config.seed = seed
        try:
          run.run(config, workdir)
        except run.base.Unservable as e:
          if FLAGS.method != "all":
            raise
          print(f"--method=all: {name} skipped: {e}", flush=True)
    if len(names) > 1 or len(seeds) > 1:
      from experiments import compare
      compare.compare(FLAGS.workdir)
      print(open(os.path.join(FLAGS.workdir, "comparison.md")).read())
  except (ValueError, OSError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
