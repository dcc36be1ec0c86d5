"""fu_jax.compilation_cache: where the persistent cache lives (no timing here; the
cross-process hit is checked by tests/test_experiments.py's resume test)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax import compilation_cache as cc

HOME = os.path.expanduser("~")


def test_default_is_the_user_cache_dir():
  assert cc.resolve_dir(environ={}) == os.path.join(HOME, ".cache", "fu_jax", "jax_cache")
  assert cc.resolve_dir(environ={"XDG_CACHE_HOME": "/x"}) == "/x/fu_jax/jax_cache"


def test_flag_dir_then_environment_variable_wins():
  assert cc.resolve_dir("/flag", environ={}) == "/flag"
  assert cc.resolve_dir("~/c", environ={}) == os.path.join(HOME, "c")
  env = {cc.ENV_VAR: "/env", "XDG_CACHE_HOME": "/x"}
  assert cc.resolve_dir(None, environ=env) == "/env"
  assert cc.resolve_dir("/flag", environ=env) == "/env"
  assert cc.resolve_dir("/flag", environ={cc.ENV_VAR: ""}) == "/flag"  # empty = unset


def test_off_by_flag_whatever_the_environment():
  env = {cc.ENV_VAR: "/env"}
  assert cc.resolve_dir("", environ=env) is None
  assert cc.resolve_dir("/flag", enabled=False, environ=env) is None
  assert cc.resolve_dir(None, enabled=False, environ={}) is None


def test_the_session_cache_stores_and_counts(tmp_path):
  # conftest.py enabled a session cache: a new program lands in it, and compiling the same
  # program again from a fresh function (no in-memory hit) loads it from disk.
  directory = jax.config.jax_compilation_cache_dir
  assert directory and os.path.isdir(directory)
  stats = cc.stats()
  salt = 1234.5  # a constant no other test compiles
  before = set(os.listdir(directory))
  f = lambda x: jnp.sin(x) * salt
  np.testing.assert_allclose(jax.jit(f)(jnp.ones(3)), np.sin(1.0) * salt, rtol=1e-6)
  assert set(os.listdir(directory)) - before  # written
  hits = stats.hits
  g = lambda x: jnp.sin(x) * salt
  np.testing.assert_allclose(jax.jit(g)(jnp.ones(3)), np.sin(1.0) * salt, rtol=1e-6)
  assert stats.hits == hits + 1


def test_an_unusable_directory_turns_the_cache_off(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  enabled = jax.config.jax_enable_compilation_cache
  try:
    assert cc.enable(str(blocker / "cache")) is None
    assert "no compilation cache" in capsys.readouterr().err
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


def test_entries_without_atime_are_adopted_and_writes_work_again(tmp_path):
  # An unbounded writer (no filelock, plain JAX) or a process killed between JAX's two
  # writes leaves `<key>-cache` without `<key>-atime`; JAX's eviction (on under fu_jax's
  # bound) then fails every later write. JAX's own cache class shows the failure, and that
  # adopting the entry (its mtime as atime) mends it without losing it.
  from jax._src import lru_cache  # pylint: disable=import-outside-toplevel

  (tmp_path / "unbounded-cache").write_bytes(b"x" * 8)
  os.utime(tmp_path / "unbounded-cache", ns=(5, 7))
  (tmp_path / "whole-cache").write_bytes(b"y" * 8)
  (tmp_path / "whole-atime").write_bytes((1).to_bytes(8, "little"))
  cache = lru_cache.LRUCache(str(tmp_path), max_size=cc.MAX_BYTES)
  try:
    cache.put("new", b"z")
    raise AssertionError("JAX wrote an entry beside one without atime: the workaround may go")
  except FileNotFoundError:
    pass
  assert cc.adopt_entries_without_atime(str(tmp_path)) == ["unbounded"]
  assert (tmp_path / "unbounded-atime").read_bytes() == (7).to_bytes(8, "little")
  assert (tmp_path / "whole-atime").read_bytes() == (1).to_bytes(8, "little")
  cache.put("newer", b"z")
  assert cache.get("newer") == b"z" and cache.get("unbounded") == b"x" * 8
  assert cc.adopt_entries_without_atime(str(tmp_path)) == []
