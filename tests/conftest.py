"""Test-session setup: two simulated CPU devices so the `shard` runner's multi-device path
(client axis split over a mesh) is exercised on any machine, and fu_jax's default XLA flags
(fu_jax/xla_flags.py), as experiments.main sets them."""
import os

from fu_jax import xla_flags

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
xla_flags.use_defaults()
