"""A process's fixed costs: the programs a small run lowers (each costs tracing, lowering
and a cache lookup in every process), and a finished command answered from its marker
without importing JAX (experiments/finished.py)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from experiments import finished

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# BUILD.md's measured command: 2 rounds of FedAvg on digits (CNN, 10 clients), no MIA.
FEDAVG_DIGITS = [
  "--method=fedavg",
  "--config=experiments/configs/digits.py",
  "--config.fl.rounds=2",
  "--config.mia.enabled=False",
]
MAX_PROGRAMS = 20

# Runs experiments.main as `python -m` does, then says whether JAX was imported.
_RUN_MAIN = """
import runpy, sys
sys.argv = ["experiments.main", *sys.argv[1:]]
try:
  runpy.run_module("experiments.main", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print("jax imported:", "jax" in sys.modules)
"""


def _main(args):
  cmd = [sys.executable, "-m", "experiments.main", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _main_reporting_imports(args):
  t0 = time.perf_counter()
  cmd = [sys.executable, "-c", _RUN_MAIN, *args]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  return out, time.perf_counter() - t0


def test_fedavg_digits_lowers_few_programs_and_its_rerun_skips_jax(tmp_path):
  args = [*FEDAVG_DIGITS, f"--workdir={tmp_path}"]
  out = _main(args)
  lowered = re.search(r"(\d+) programs lowered", out)
  assert lowered, out[-500:]
  # Host-side jax.numpy calls in runners, rounds or evaluation would each add programs.
  assert int(lowered.group(1)) <= MAX_PROGRAMS, out[-500:]
  results = os.path.join(str(tmp_path), "fedavg", "results.json")
  stamp = os.stat(results).st_mtime_ns

  fast, seconds = _main_reporting_imports(args)
  assert "jax imported: False" in fast, fast
  expected = f"[fedavg] finished already, not recomputed (--rerun to recompute); results: {results}"
  assert fast.splitlines()[0] == expected, fast
  print(f"finished command answered in {seconds:.2f} s")
  # The usual path (no marker) answers the same, and writes the marker again.
  shutil.rmtree(os.path.join(str(tmp_path), finished.MARKER_DIR))
  slow = _main(args)
  assert slow.splitlines()[0] == expected, slow
  assert "jax imported: False" in _main_reporting_imports(args)[0]
  assert os.stat(results).st_mtime_ns == stamp  # nothing recomputed


@pytest.fixture
def done(tmp_path, monkeypatch):
  """A fake finished command in tmp_path (the working directory): (argv, lines, files)."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "cfg.py").write_text("def get_config(): ...\n")
  os.makedirs("wd/fedavg")
  files = ["wd/fedavg/config.json", "wd/fedavg/results.json"]
  for f in files:
    with open(f, "w") as fh:
      json.dump({"a": 1}, fh)
  argv = ["--method=fedavg", "--config=cfg.py", "--workdir=wd", "--config.fl.rounds=2"]
  lines = ["[fedavg] finished already"]
  finished.write(argv, lines, files)
  assert finished.answer(argv) == lines
  return argv, lines, files


@pytest.mark.parametrize(
  "change",
  [
    ["--config.fl.rounds=3"],  # another config
    ["--config.fl.rounds=2"],  # the same config, spelt twice: not vouched for
    ["--rerun"],
    ["--flagfile=f"],
    ["--num_processes=2"],
  ],
)
def test_a_marker_answers_only_its_own_command(done, change):
  argv, _, _ = done
  assert finished.answer(argv + change) is None
  assert finished.answer(argv[:-1]) is None  # a flag less


def test_a_marker_is_void_when_the_config_file_or_a_result_changed(done):
  argv, lines, files = done
  with open("cfg.py", "a") as f:
    f.write("# changed\n")
  assert finished.answer(argv) is None
  finished.write(argv, lines, files)
  assert finished.answer(argv) == lines
  with open(files[1], "w") as f:
    json.dump({"a": 2}, f)  # rewritten (e.g. by a later --rerun)
  assert finished.answer(argv) is None
  finished.write(argv, lines, files)
  os.remove(files[1])
  assert finished.answer(argv) is None


def test_a_marker_is_void_in_another_working_directory(done, tmp_path, monkeypatch):
  argv, lines, files = done
  other = tmp_path / "other"
  os.makedirs(other / "wd" / "fedavg")
  shutil.copy("cfg.py", other / "cfg.py")
  for f in files:
    shutil.copy2(f, other / f)
  monkeypatch.chdir(other)
  assert finished.answer(argv) is None  # relative paths name other files here


def test_a_marker_is_void_when_the_code_changed(done, monkeypatch):
  argv, lines, _ = done
  monkeypatch.setattr(finished, "_package_dirs", lambda: [os.getcwd()])  # cfg.py counts
  assert finished.answer(argv) is None
