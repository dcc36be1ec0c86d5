"""fu_jax.xla_flags: defaults are added, a user's own setting wins, and a call after JAX
created its backends (as in this test session) is refused rather than silently ignored."""

import jax.numpy as jnp
import pytest

from fu_jax import xla_flags


def test_with_defaults_adds_missing_and_keeps_the_users_value():
  d = ("--a=1", "--b=2")
  assert xla_flags.with_defaults("", d) == "--a=1 --b=2"
  assert xla_flags.with_defaults("--x=3 --b=0", d) == "--x=3 --b=0 --a=1"
  assert xla_flags.with_defaults("--a= --b=5", d) == "--a= --b=5"  # empty value: disabled


def test_use_defaults_after_backend_start_is_refused_unless_nothing_changes():
  jnp.ones(1).block_until_ready()  # backends exist now
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  with pytest.raises(RuntimeError, match="before the first JAX computation"):
    xla_flags.use_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  done = {"XLA_FLAGS": xla_flags.with_defaults("")}
  xla_flags.use_defaults(done)  # nothing to add: fine at any time
  assert done["XLA_FLAGS"] == xla_flags.with_defaults("")
