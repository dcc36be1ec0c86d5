"""XLA flags fu_jax's entry points set by default, before JAX creates its backends.

XLA reads `XLA_FLAGS` once, when the first backend is created, so the flags must be in the
environment before the first computation; `use_defaults()` is what `experiments.main`, the
test session and the benchmarks call at start-up. A flag the user already set in XLA_FLAGS
is left as the user set it.

The default (its speed-up: benchmarks/fl_round.py, BUILD.md):
  --xla_cpu_experimental_ynn_fusion_type=dot  routes XLA:CPU's dots (and the convolutions
      it lowers to dots) to YNNPACK kernels, faster for the CNN's SGD step; gradients agree
      with the default kernels to 1e-6 relative and are bit-identical from run to run. It
      only affects the CPU backend.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)


def per_core_devices(n: int) -> str:
  """XLA_FLAGS for `n` host CPU devices with one intra-op thread each: with
  `fl.ClientRunner(kind='loop', devices=jax.local_devices())` each core trains its own
  client (opt-in; every other computation of the process then runs on one thread)."""
  if n < 1:
    raise ValueError(f"per_core_devices: n must be >= 1, got {n}")
  return (
    f"--xla_force_host_platform_device_count={n} --xla_cpu_multi_thread_eigen=false "
    "intra_op_parallelism_threads=1"
  )


def flag_name(flag: str) -> str:
  """'--name=value' -> 'name'."""
  return flag.lstrip("-").split("=", 1)[0]


def with_defaults(flags: str, defaults=DEFAULT_FLAGS) -> str:
  """`flags` plus each default whose name `flags` does not set already."""
  present = {flag_name(f) for f in flags.split()}
  extra = [d for d in defaults if flag_name(d) not in present]
  return " ".join([flags.strip(), *extra]).strip()


def use_defaults(environ: MutableMapping[str, str] | None = None, defaults=DEFAULT_FLAGS):
  """Adds the defaults to environ['XLA_FLAGS'] (os.environ by default).

  Raises RuntimeError if JAX has already created a backend: the flags would be ignored.
  """
  environ = os.environ if environ is None else environ
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  new = with_defaults(environ.get("XLA_FLAGS", ""), defaults)
  if new != environ.get("XLA_FLAGS", "") and xla_bridge.backends_are_initialized():
    raise RuntimeError(
      "fu_jax.xla_flags.use_defaults() was called after JAX created its "
      "backends; call it before the first JAX computation"
    )
  environ["XLA_FLAGS"] = new
