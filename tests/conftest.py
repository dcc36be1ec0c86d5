"""Test-session setup: two simulated CPU devices so the `shard` runner's multi-device path
(client axis split over a mesh) is exercised on any machine."""
import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
