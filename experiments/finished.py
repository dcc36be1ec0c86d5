"""Answering a finished command without importing JAX: a marker per command line.

Rerunning a command whose runs have all finished only prints where their results are
(experiments.run: config.json equal and results.json present); finding that out the
usual way costs the imports of JAX, Flax and TFDS and building the config (seconds).
At the end of a command that succeeded, experiments.main writes a marker
<workdir>/.finished/<key>.json; the same command run again finds it with the standard
library alone (`answer`, called before any heavy import) and prints the same lines.

The key is a hash of everything the "finished" answer depends on:
  - the command line (sys.argv[1:], verbatim: flags in another order, or another
    spelling of the same config, miss the marker and take the usual path, which is
    correct, only slower) and the working directory (relative paths);
  - the config file's bytes (its path from --config, without a `:variant`);
  - the source of the fu_jax and experiments packages (every .py file's bytes: the
    defaults a config resolves to, the methods `--method=all` runs, the validation).
A marker also records the content hash of every file the answer rests on (each run's
config.json and results.json, the comparison); if any changed or is gone (e.g. a later
--rerun rewrote a results.json, or it was deleted), the marker is ignored.
So a marker answers "finished" only when the usual path would, for the same config;
anything it cannot vouch for goes the usual way. --rerun, and a run over several
processes, never use markers.

Standard library only: importing it must stay cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

MARKER_DIR = ".finished"
# Flags under which a marker is neither read nor written.
# --flagfile: flags read from a file the key does not cover.
_NO_MARKER = ("--rerun", "--coordinator_address", "--num_processes", "--process_id", "--flagfile")


def _flag(argv: list[str], name: str) -> str | None:
  """The value of --name=<v> or --name <v> in argv (the last one given), else None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def usable(argv: list[str]) -> bool:
  """Whether this command line may use a marker (see the module doc)."""
  return not any(a == f or a.startswith(f + "=") for a in argv for f in _NO_MARKER)


def _package_dirs() -> list[str]:
  dirs = []
  for name in ("fu_jax", "experiments"):
    spec = importlib.util.find_spec(name)  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(name)
    dirs.extend(spec.submodule_search_locations)
  return dirs


def _hash_tree(h, directory: str):
  for root, subdirs, files in os.walk(directory):
    subdirs.sort()
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(root, f)
        h.update(os.path.relpath(path, directory).encode() + b"\0")
        with open(path, "rb") as fh:
          h.update(hashlib.sha256(fh.read()).digest())


def key(argv: list[str]) -> str | None:
  """The marker key of a command line (hex), or None when it has no config file to read."""
  config = _flag(argv, "config")
  if config is None:
    return None
  config_path = config.split(":", 1)[0]
  h = hashlib.sha256()
  h.update(json.dumps({"argv": list(argv), "cwd": os.getcwd()}).encode())
  with open(config_path, "rb") as f:
    h.update(hashlib.sha256(f.read()).digest())
  for d in _package_dirs():
    _hash_tree(h, d)
  return h.hexdigest()


def _path(workdir: str, k: str) -> str:
  return os.path.join(workdir, MARKER_DIR, f"{k}.json")


def _stamp(path: str) -> str:
  """The file's content hash (the files are small: configs, results, a comparison)."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def write(argv: list[str], lines: list[str], files: list[str]):
  """Records that `argv` finished: `lines` are what a rerun prints, `files` what the answer
  rests on (see the module doc). Written atomically; does nothing when argv cannot use a
  marker."""
  workdir = _flag(argv, "workdir")
  k = key(argv) if usable(argv) and workdir else None
  if k is None:
    return
  path = _path(workdir, k)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  record = {"argv": list(argv), "lines": lines, "files": {f: _stamp(f) for f in files}}
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


def answer(argv: list[str]) -> list[str] | None:
  """The lines to print when `argv` has finished (its marker is valid), else None.

  Never raises: a missing, unreadable or stale marker means "not known to be finished".
  """
  try:
    workdir = _flag(argv, "workdir")
    if not workdir or not usable(argv):
      return None
    k = key(argv)
    if k is None or not os.path.exists(_path(workdir, k)):
      return None
    with open(_path(workdir, k)) as f:
      record = json.load(f)
    if record["argv"] != list(argv):
      return None
    for path, stamp in record["files"].items():
      if not os.path.exists(path) or _stamp(path) != stamp:
        return None
    return list(record["lines"])
  except (OSError, ValueError, KeyError, TypeError):
    return None
