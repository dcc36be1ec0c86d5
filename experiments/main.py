r"""Runs one federated-unlearning experiment.

  python -m experiments.main --method=<name> --config=experiments/configs/<name>.py[:variant] \
      --workdir=<dir> [--config.<key>=<value> ...]

Only parses flags and calls experiments.run.run(config, workdir). A finished run (its
results.json written with the same config) is not recomputed unless --rerun is given; an
interrupted one (Ctrl-C, kill) resumes from its last checkpoint when the command is rerun.
Bad input (an unknown flag or config key, a value out of range) exits with one line on
stderr and status 2; Ctrl-C with one line and status 130.

Several processes, one run: start the same command once per process, adding
  --coordinator_address=<host:port of process 0> --num_processes=<n> --process_id=<i>
(i = 0..n-1). The `shard` runner (what fl.runner=auto picks then) splits each round's
clients over every device of every process; process 0 alone writes results.json,
TensorBoard events and comparisons; checkpoints are written by all together (orbax), so
rerunning the same n commands resumes. The workdir must be on a filesystem every process
sees. See README.md, "Several processes".
"""

import difflib
import os
import signal
import sys

if __name__ == "__main__":
  # A command that finished already is answered from its marker before anything heavy
  # (JAX, Flax, TFDS) is imported: experiments/finished.py.
  from experiments import finished as _finished

  _lines = _finished.answer(sys.argv[1:])
  if _lines is not None:
    print("\n".join(_lines), flush=True)
    sys.exit(0)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags

from fu_jax import compilation_cache, multihost, xla_flags  # noqa: E402

xla_flags.use_defaults()  # before any JAX computation: XLA reads its flags once

from fu_jax import methods  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "method",
  "fedavg",
  f"Unlearning method: one of {sorted(methods.REGISTRY)}, "
  "or 'all' (every method that serves the request, then a comparison).",
)
flags.DEFINE_list(
  "seeds",
  [],
  "Run each of these seeds into <workdir>/seed_<s>/ (overrides "
  "config.seed), then compare mean and spread.",
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.", required=True)
config_flags.DEFINE_config_file(
  "config", None, "Config file (a get_config() module).", lock_config=True
)
flags.DEFINE_string(
  "compilation_cache_dir",
  None,
  "Persistent XLA compilation cache, shared by every run of this user "
  f"(default: ${compilation_cache.ENV_VAR} when set, else "
  f"{compilation_cache.default_dir()}); '' turns it off.",
)
flags.DEFINE_bool(
  "rerun",
  False,
  "Recompute runs that already finished (by default a finished "
  "run is left as it is and only its results path is printed).",
)
flags.DEFINE_bool(
  "compilation_cache",
  True,
  "Use the persistent compilation cache "
  "(--nocompilation_cache: compile everything in this process).",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "Several processes, one run: host:port of "
  "process 0, the same for every process (absent: one process).",
)
flags.DEFINE_integer("num_processes", None, "Several processes: how many run this command.")
flags.DEFINE_integer(
  "process_id",
  None,
  "Several processes: this process's index, 0..num_processes-1 (0 writes the results).",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  try:  # before the first JAX computation
    multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  cache_dir = compilation_cache.enable(
    compilation_cache.resolve_dir(FLAGS.compilation_cache_dir, FLAGS.compilation_cache)
  )
  cache_stats = compilation_cache.stats()
  # Heavy imports after flag parsing: --help stays fast.
  from experiments import clock as clock_lib
  from experiments import run as run_lib
  from experiments import validation
  from fu_jax.methods import base

  clock = clock_lib.compile_clock()  # from here on: the process's whole compile time
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/configs/digits.py")
  # What a rerun of this command prints once it has finished, and the files that rests on
  # (experiments/finished.py).
  lines, files = [], []
  try:
    names = validation.methods_for(FLAGS.method, config.unlearn.kind)
    seeds = [int(s) for s in FLAGS.seeds] or [None]
    for seed in seeds:
      workdir = FLAGS.workdir if seed is None else os.path.join(FLAGS.workdir, f"seed_{seed}")
      for name in names:
        with config.unlocked():
          config.method = name
          if seed is not None:
            config.seed = seed
        try:
          run_lib.run(config, workdir, rerun=FLAGS.rerun)
        except base.Unservable as e:
          if FLAGS.method != "all":
            raise
          lines.append(f"--method=all: {name} skipped: {e}")
          print(lines[-1], flush=True)
          continue
        out_dir = os.path.join(workdir, methods.get(name).name)
        files += [os.path.join(out_dir, f) for f in ("config.json", "results.json")]
        lines.append(run_lib.finished_line(methods.get(name).name, files[-1]))
    if (len(names) > 1 or len(seeds) > 1) and multihost.is_primary():
      from experiments import compare

      compare.compare(FLAGS.workdir)
      files.append(os.path.join(FLAGS.workdir, "comparison.md"))
      lines.append(open(files[-1]).read())
      print(lines[-1])
    if multihost.is_primary() and multihost.process_count() == 1:
      from experiments import finished

      finished.write(sys.argv[1:], lines, files)
    parts = ", ".join(
      f"{e.rsplit('/', 1)[1].replace('_duration', '')} {v:.1f}" for e, v in clock.by_event.items()
    )
    cache = (
      f"cache {cache_dir}: {cache_stats.hits} programs loaded, {cache_stats.misses} compiled"
      if cache_dir is not None
      else "no cache"
    )
    print(
      f"compilation: {clock.seconds:.1f} s in this process ({parts}); "
      f"{cache_stats.lowered} programs lowered; {cache}",
      flush=True,
    )
  except (ValueError, OSError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _config_key_error(flagname: str) -> str | None:
  """'--config.a.b: ...' naming the first unknown part of the dotted path and the keys
  allowed where it failed; None when the path exists."""
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel

  node, where = FLAGS["config"].value, "config"
  if node is None:
    return f"--{flagname}: give --config=<file> before overriding its keys"
  for part in flagname.split(".")[1:]:
    if not isinstance(node, config_dict.ConfigDict):
      return f"--{flagname}: {where} is a value, not a section with keys"
    if part not in node:
      keys = sorted(node.keys())
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f"did you mean {where}.{close[0]}? " if close else ""
      return f"--{flagname}: {where} has no key {part!r}; {hint}allowed: {', '.join(keys)}"
    node, where = node[part], f"{where}.{part}"
  return None


def _bad_config_key(argv) -> str | None:
  """The first --config.<path> override in argv naming no key of the config file."""
  FLAGS.unparse_flags()
  plain = [a for a in argv if not a.startswith("--config.")]
  saved, sys.argv = sys.argv, plain  # ml_collections reads the overrides from sys.argv
  try:
    FLAGS(plain, known_only=True)
  finally:
    sys.argv = saved
  for a in argv:
    if a.startswith("--config."):
      msg = _config_key_error(a[2:].split("=", 1)[0])
      if msg:
        return msg
  return None


def _parse_flags(argv):
  """absl's parsing, with one line on stderr instead of a traceback for a bad flag or
  config key (ml_collections raises KeyError/AttributeError from inside absl)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
  except (KeyError, AttributeError, TypeError) as e:
    try:
      msg = _bad_config_key(argv) or str(e).splitlines()[0]
    except Exception:  # pylint: disable=broad-except
      msg = str(e).splitlines()[0]  # diagnosing must not bring the traceback back
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _on_sigint(signum, frame):
  del signum, frame
  env = sys.modules.get("experiments.env")
  if env is not None:
    env.INTERRUPTED.set()  # in case this exception is dropped (env.INTERRUPTED)
  raise KeyboardInterrupt


if __name__ == "__main__":
  signal.signal(signal.SIGINT, _on_sigint)
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:
    # Checkpoints are written atomically (fu_jax/checkpoint.py): the same command resumes.
    print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
    sys.exit(130)
