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
import shutil
import tempfile

from fu_jax import compilation_cache
from fu_jax import xla_flags
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
