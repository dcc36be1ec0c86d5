"""Config validation: every check the runner makes before it loads data or trains, each a
ConfigError naming the bad value and what is allowed; and which methods `--method=all` runs."""

from __future__ import annotations

import math
import os

from fu_jax import data as data_lib
from fu_jax import fl, models, multihost
from fu_jax import methods as methods_lib
from fu_jax.methods import base

ConfigError = base.ConfigError
PARTITIONS = data_lib.PARTITIONS

_require = base.require


def validate(
  config, method_name: str, num_classes: int | None = None, num_train: int | None = None
):
  """Raises ConfigError naming the bad value and what is allowed: the runner's sections
  here, the method's own section by its Method.validate.

  num_classes, num_train: known after loading the data; checks needing them are skipped
  when None.
  """
  method = methods_lib.get(method_name)  # unknown method -> ValueError listing the allowed
  d, f = config.data, config.fl
  _require(
    isinstance(d.num_clients, int) and d.num_clients >= 1,
    f"data.num_clients={d.num_clients!r}: must be an int >= 1",
  )
  size = d.get("train_size", 0)
  _require(
    isinstance(size, int) and not isinstance(size, bool) and size >= 0,
    f"data.train_size={size!r}: must be 0 (all) or an int in 1..number of training examples",
  )
  if num_train is not None:
    _require(
      size <= num_train,
      f"data.train_size={size}: allowed 0 (all) or 1..{num_train} (the training set)",
    )
  _require(d.partition in PARTITIONS, f"data.partition={d.partition!r}: allowed {PARTITIONS}")
  _require(d.alpha > 0, f"data.alpha={d.alpha!r}: must be > 0")
  sigma = d.get("size_sigma", 0.0)
  _require(
    isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0,
    f"data.size_sigma={sigma!r}: must be a finite number >= 0 (0 = equal sizes)",
  )
  _require(isinstance(f.rounds, int) and f.rounds >= 1, f"fl.rounds={f.rounds!r}: must be >= 1")
  _require(f.local_epochs >= 1, f"fl.local_epochs={f.local_epochs!r}: must be >= 1")
  _require(f.batch_size >= 1, f"fl.batch_size={f.batch_size!r}: must be >= 1")
  _require(f.client_lr > 0, f"fl.client_lr={f.client_lr!r}: must be > 0")
  _require(f.runner in fl.RUNNERS, f"fl.runner={f.runner!r}: allowed {fl.RUNNERS}")
  _require(
    multihost.process_count() == 1 or f.runner in ("auto", "shard"),
    f"fl.runner={f.runner!r} would run every client in each of the "
    f"{multihost.process_count()} processes; with several processes allowed: "
    "'shard' or 'auto' (which picks it)",
  )
  _require(
    config.model.name in models.MODEL_NAMES,
    f"model.name={config.model.name!r}: allowed {models.MODEL_NAMES}",
  )
  fl.num_sampled_clients(f.clients_per_round, d.num_clients)
  u = config.unlearn
  _require(u.kind in base.REQUEST_KINDS, f"unlearn.kind={u.kind!r}: allowed {base.REQUEST_KINDS}")
  if u.kind in ("client", "client_class"):
    _require(
      0 <= u.forget_client < d.num_clients,
      f"unlearn.forget_client={u.forget_client}: allowed 0..{d.num_clients - 1}",
    )
  if u.kind == "samples":
    _validate_samples(config)
  cal = u.get("calibration_size", 0)
  _require(
    isinstance(cal, int) and not isinstance(cal, bool) and cal >= 0,
    f"unlearn.calibration_size={cal!r}: must be an int >= 0 (0 = no calibration split)",
  )
  if num_train is not None and cal:
    room = num_train - size if size else num_train - 1
    _require(
      cal <= room,
      f"unlearn.calibration_size={cal}: allowed 0..{room} (the training images "
      + ("outside the data.train_size subsample)" if size else "less one)"),
    )
  if num_classes is not None and u.kind not in ("client", "samples"):
    for c in request_classes(config):
      _require(0 <= c < num_classes, f"unlearn.forget_class={c}: allowed 0..{num_classes - 1}")
  bd = config.backdoor
  if bd.enabled:
    _require(
      isinstance(bd.size, int) and bd.size >= 1,
      f"backdoor.size={bd.size!r}: must be an int >= 1 (the trigger's side in pixels)",
    )
    target = bd.get("target", -1)
    _require(
      isinstance(target, int) and target >= -1,
      f"backdoor.target={target!r}: allowed -1 (shift labels by backdoor.shift) or a class",
    )
    if num_classes is not None:
      _require(
        target < num_classes,
        f"backdoor.target={target}: allowed -1 or 0..{num_classes - 1}",
      )
      _require(
        target >= 0 or bd.shift % num_classes != 0,
        f"backdoor.shift={bd.shift}: must not be a multiple of {num_classes} (labels would "
        "not change)",
      )
  r = config.eval.relearn_steps
  _require(
    isinstance(r, int) and r >= 0, f"eval.relearn_steps={r!r}: must be an int >= 0 (0 = off)"
  )
  _require(  # why: fu_jax/metrics/relearn.py's docstring
    r == 0 or u.kind != "samples",
    f"eval.relearn_steps={r} with unlearn.kind=samples: relearn time is undefined for a "
    "samples request (retrained models still classify the forgotten samples); set "
    "eval.relearn_steps=0 and audit it with experiments.audit",
  )
  m = config.eval.relearn_retained
  _require(
    isinstance(m, (int, float)) and m >= 0,
    f"eval.relearn_retained={m!r}: must be a number >= 0 (0 = forgotten samples only)",
  )
  if method.validate is not None:
    method.validate(config)
  why = f" ({method.why})" if method.why else ""
  _require(
    u.kind in method.kinds,
    f"method {method_name!r} cannot serve unlearn.kind={u.kind!r}{why}; it serves {method.kinds}",
  )


def _validate_samples(config):
  u, n = config.unlearn, config.data.num_clients
  path = u.get("forget_indices", "") or ""
  frac = u.get("forget_fraction", 0.0)
  if path:
    _require(
      not frac,
      f"unlearn.forget_fraction={frac!r} and unlearn.forget_indices="
      f"{path!r}: set one of them, not both",
    )
    _require(
      os.path.isfile(path),
      f"unlearn.forget_indices={path!r}: no such file (expected "
      "a .npy file of training-set positions)",
    )
    return
  _require(
    isinstance(frac, (int, float)) and 0 < frac <= 1,
    f"unlearn.forget_fraction={frac!r}: must be in (0, 1] (or give "
    "unlearn.forget_indices=<file.npy>) for unlearn.kind='samples'",
  )
  _require(
    u.forget_client == -1 or 0 <= u.forget_client < n,
    f"unlearn.forget_client={u.forget_client}: allowed -1 (every client) or 0..{n - 1}",
  )


def request_classes(config) -> tuple:
  extra = tuple(int(c) for c in config.unlearn.get("also_classes", ()) or ())
  return (int(config.unlearn.forget_class),) + extra


def methods_for(name: str, kind: str) -> list[str]:
  """[name], or for 'all' every registered method serving `kind`, retrain first."""
  if name != "all":
    methods_lib.get(name)
    return [name]
  names = ["retrain"] + sorted(
    n for n, m in methods_lib.REGISTRY.items() if n != "retrain" and kind in m.kinds
  )
  skipped = sorted(n for n, m in methods_lib.REGISTRY.items() if kind not in m.kinds)
  if skipped:
    print(f"--method=all: {skipped} cannot serve unlearn.kind={kind!r}; skipped", flush=True)
  return names
