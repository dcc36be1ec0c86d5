"""One trained model per training config for the whole test session.

Many end-to-end tests start from the same trained model: the same data, FedAvg rounds and
model, i.e. the same `run.training_config`, which keys a workdir's pretraining cache
(`<workdir>/pretrain/<trainer>-<hash>/`). Each test still runs in its own workdir:
`pretrain(config, workdir)` puts the trained model there before `run.run` - trained by the
first test of the session that needs it, copied for the others - and `run.run` then finds
it in the workdir's cache exactly as a second method run into one workdir does (that path
of the library is tested on its own in test_experiments, without this helper).

The session directory is shared by the xdist workers (conftest.py sets ENV_VAR before they
start); a lock per model makes a second worker wait for the first one's training instead
of repeating it. Without ENV_VAR (the helper imported outside pytest) nothing is shared.
"""

import fcntl
import os
import shutil
import tempfile

ENV_VAR = "FU_JAX_TEST_PRETRAIN_CACHE"


def name(config, trainer: str | None = None) -> str:
  """The directory under <workdir>/pretrain/ that run.run trains `config`'s model into."""
  # Imported here: conftest.py imports this module before it sets XLA's flags.
  from experiments import caches  # pylint: disable=import-outside-toplevel
  from fu_jax import methods as methods_lib  # pylint: disable=import-outside-toplevel

  trainer = methods_lib.trainer(trainer or methods_lib.get(config.method).trainer)
  key = caches.training_config(config, trainer)
  return f"{trainer.name}-{caches.config_hash(key)}"


def pretrain(config, workdir: str, trainer: str | None = None) -> str:
  """Makes <workdir>/pretrain hold the model `config`'s method starts from (or `trainer`'s),
  trained at most once per session; returns its directory."""
  from experiments import caches  # pylint: disable=import-outside-toplevel
  from experiments import task as task_lib  # pylint: disable=import-outside-toplevel
  from fu_jax import methods as methods_lib  # pylint: disable=import-outside-toplevel

  trainer = methods_lib.trainer(trainer or methods_lib.get(config.method).trainer)
  sub = name(config, trainer)
  dest = os.path.join(workdir, "pretrain", sub)
  root = os.environ.get(ENV_VAR)
  if os.path.exists(dest) or not root:
    return dest
  cached = os.path.join(root, sub)
  with open(cached + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.isdir(cached):
      caches.pretrained(task_lib.build_task(config), workdir, trainer)
      tmp = tempfile.mkdtemp(dir=root)
      shutil.copytree(dest, os.path.join(tmp, sub))
      os.rename(os.path.join(tmp, sub), cached)
      os.rmdir(tmp)
      return dest
  shutil.copytree(cached, dest)
  return dest


def run(config, workdir: str, **kwargs) -> dict:
  """run.run(config, workdir) from the session's trained model."""
  from experiments import run as run_lib  # pylint: disable=import-outside-toplevel

  pretrain(config, workdir)
  return run_lib.run(config, workdir, **kwargs)
