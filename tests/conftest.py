"""Test-session setup: two simulated CPU devices so the `shard` runner's multi-device path
(client axis split over a mesh) is exercised on any machine, fu_jax's default XLA flags
(fu_jax/xla_flags.py), as experiments.main sets them, and one persistent compilation cache
for the session (fu_jax/compilation_cache.py).

The cache directory is new for every session (a clean checkout pays every compilation once,
never a stale entry) and shared by everything in it: the tests of this process, the xdist
workers (they inherit the environment variable set here, before they start) and the
experiments.main subprocesses the tests launch, which would otherwise each recompile the
same programs, and which must not write into the user's own cache.

Likewise one directory of trained models for the session (tests/pretrain_cache.py): the
end-to-end tests that start from the same trained model train it once, not once per test.
"""

import atexit
import os
import resource
import shutil
import tempfile

import pytest

from fu_jax import compilation_cache, xla_flags
from tests import pretrain_cache

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
xla_flags.use_defaults()

if not os.environ.get(compilation_cache.ENV_VAR):
  _cache_dir = tempfile.mkdtemp(prefix="fu_jax_test_jax_cache_")
  os.environ[compilation_cache.ENV_VAR] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
compilation_cache.enable(compilation_cache.resolve_dir())

if not os.environ.get(pretrain_cache.ENV_VAR):
  _models_dir = tempfile.mkdtemp(prefix="fu_jax_test_models_")
  os.environ[pretrain_cache.ENV_VAR] = _models_dir
  atexit.register(shutil.rmtree, _models_dir, ignore_errors=True)


# --cpu-durations: the tests that used the most CPU. On a shared machine wall seconds
# (--durations) grow with the load; a test's CPU seconds (its process and the subprocesses
# it waited for, setup and teardown included) hardly do, and add up to the suite's cost.


def pytest_addoption(parser):
  parser.addoption(
    "--cpu-durations",
    type=int,
    default=None,
    metavar="N",
    help="show the N tests that used the most CPU seconds (0: all), and the total over all tests",
  )


def _cpu_seconds() -> float:
  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  item.stash[_CPU_START] = _cpu_seconds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  if call.when == "teardown" and _CPU_START in item.stash:  # before the report is made
    item.user_properties.append(("cpu_seconds", _cpu_seconds() - item.stash[_CPU_START]))
  yield


def pytest_runtest_logreport(report):
  # Runs where the reports arrive: in the xdist controller too.
  if report.when == "teardown":
    cpu = dict(report.user_properties).get("cpu_seconds")
    if cpu is not None:
      _CPU_BY_TEST[report.nodeid] = cpu


def pytest_terminal_summary(terminalreporter, config):
  n = config.getoption("cpu_durations")
  if n is None or not _CPU_BY_TEST:
    return
  rows = sorted(_CPU_BY_TEST.items(), key=lambda kv: -kv[1])
  tr = terminalreporter
  tr.write_sep("=", f"CPU seconds: {sum(_CPU_BY_TEST.values()):.1f} over {len(rows)} tests")
  for nodeid, cpu in rows[: n or None]:
    tr.write_line(f"{cpu:8.1f}s cpu  {nodeid}")


_CPU_START = pytest.StashKey[float]()
_CPU_BY_TEST: dict[str, float] = {}
