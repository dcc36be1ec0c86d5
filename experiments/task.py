"""The task a method runs on (base.Task): the data split and partitioned over clients, the
unlearning request's forgotten rows, a planted backdoor, the model; and the seed of the
data (data_seed)."""

from __future__ import annotations

import hashlib
import math

import jax
import numpy as np

from experiments import validation
from fu_jax import data as data_lib
from fu_jax import fl, models
from fu_jax import images as images_lib
from fu_jax.methods import base
from fu_jax.metrics import backdoor as bd_lib

_require = base.require


def data_seed(config) -> int:
  """The seed of the train/test split, the partition and a samples request's selection:
  config.data.seed, or config.seed when it is -1 (an audit's model bank varies config.seed
  with the data fixed)."""
  s = int(config.data.get("seed", -1))
  return int(config.seed) if s == -1 else s


def load_forget_indices(path: str) -> np.ndarray:
  """The 1-D integer array of training-set positions in the .npy file `path` (ConfigError
  naming the file when it cannot be read, is not 1-D integer, or is empty)."""
  try:
    idx = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise base.ConfigError(
      f"unlearn.forget_indices={path!r}: cannot read it as a .npy array ({e})"
    ) from None
  _require(
    idx.ndim == 1 and (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)),
    f"unlearn.forget_indices={path!r}: expected a 1-D integer array, got {idx.dtype} {idx.shape}",
  )
  _require(idx.size > 0, f"unlearn.forget_indices={path!r} is empty: no sample to forget")
  return idx


def forget_indices_digest(path: str) -> str:
  """sha256 (16 hex digits) of the sorted unique positions in unlearn.forget_indices: the
  request's identity in every cache key and config.json, so a file rewritten in place with
  other positions never reuses results computed for the old ones (and duplicates or order,
  which forget_samples ignores, do not count)."""
  idx = np.unique(load_forget_indices(path)).astype("<i8")
  return hashlib.sha256(idx.tobytes()).hexdigest()[:16]


def forget_samples(config, owner: np.ndarray) -> np.ndarray:
  """bool [n_train]: the training rows a kind='samples' request forgets.

  From unlearn.forget_indices (a .npy of training-set positions; duplicates collapse), or
  for each selected client k (unlearn.forget_client, -1 = every client) the first
  max(1, floor(forget_fraction * n_k + 1/2)) of a random permutation of its rows, drawn
  with stream_key(data_seed, STREAM_FORGET, k): the same samples for every method and
  for every training seed of an audit's bank.
  """
  u, n = config.unlearn, owner.size
  rows = np.zeros(n, bool)
  path = u.get("forget_indices", "") or ""
  if path:
    idx = load_forget_indices(path)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
      raise base.ConfigError(
        f"unlearn.forget_indices={path!r}: position {int(bad[0])} out of "
        f"range; allowed 0..{n - 1} (training-set positions)"
      )
    rows[idx] = True
    return rows
  clients = range(int(owner.max()) + 1) if u.forget_client == -1 else [int(u.forget_client)]
  for k in clients:
    own = np.flatnonzero(owner == k)
    if own.size == 0:
      continue
    count = max(1, math.floor(float(u.forget_fraction) * own.size + 0.5))
    perm = np.asarray(
      jax.random.permutation(fl.stream_key(data_seed(config), fl.STREAM_FORGET, k), own.size)
    )
    rows[own[perm[:count]]] = True
  return rows


def build_task(config) -> base.Task:
  ds = data_lib.load_dataset(
    config.data.source,
    seed=data_seed(config),
    data_dir=config.data.data_dir or None,
    max_test=config.data.get("test_size", 0) or None,
  )
  validation.validate(config, config.method, ds.num_classes, num_train=len(ds.y_train))
  ds, calibration = data_lib.split_calibration(
    ds,
    config.data.get("train_size", 0),
    config.unlearn.get("calibration_size", 0),
    data_seed(config),
  )
  parts = data_lib.partition(
    ds.y_train,
    config.data.num_clients,
    kind=config.data.partition,
    seed=data_seed(config),
    alpha=config.data.alpha,
    classes_per_client=config.data.classes_per_client,
    min_size=config.data.min_size,
    size_sigma=config.data.get("size_sigma", 0.0),
  )
  u = config.unlearn
  classes = () if u.kind in ("client", "samples") else validation.request_classes(config)
  client = u.forget_client if u.kind != "class" else -1
  if u.kind == "samples" and (u.get("forget_indices", "") or ""):
    client = -1
  owner = np.full(len(ds.y_train), -1)
  for k, p in enumerate(parts):
    owner[p] = k
  forget_rows = np.zeros(len(ds.y_train), bool)
  if u.kind == "class":
    forget_rows = np.isin(ds.y_train, classes)
  elif u.kind == "client_class":
    forget_rows = np.isin(ds.y_train, classes) & (owner == client)
  elif u.kind == "samples":
    forget_rows = forget_samples(config, owner)
  else:
    forget_rows = owner == client
  _require(
    forget_rows.any(),
    f"the unlearning request {u.kind} (classes={classes}, "
    f"client={client}) selects no training sample; pick a class/client that holds data",
  )
  y_train = ds.y_train
  # One copy of the training images on the device; clients are index blocks into it.
  if config.backdoor.enabled:  # the triggered copy, in float32 (triggers are set there)
    trigger = backdoor_trigger(config, ds)
    x_train, y_train = bd_lib.plant_backdoor(
      ds.x_train, y_train, forget_rows, trigger, backdoor_flip(config), num_classes=ds.num_classes
    )
    table = images_lib.ImageTable(x_train)
  else:
    table = images_lib.dataset_table(ds)
  clients = data_lib.index_clients(y_train, parts)
  idx = np.where(clients.index >= 0, clients.index, 0)
  forget = forget_rows[idx] & clients.valid
  y_true = np.where(clients.valid, ds.y_train[idx], 0).astype(np.int32)
  weights = np.ones(config.data.num_clients, np.float32)
  if u.kind == "client":
    weights[client] = 0.0
  print(
    f"data {ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test, "
    f"{ds.num_classes} classes, {config.data.num_clients} clients, "
    f"sizes {[len(p) for p in parts][:20]}",
    flush=True,
  )
  model = models.create(config.model.name, ds.num_classes, **_model_overrides(config))
  dev = jax.device_put  # a transfer, where jnp.asarray runs a program per shape
  index = dev(clients.index)
  clients = type(clients)(
    x=images_lib.ClientImages(index, table),
    y=dev(clients.y),
    valid=dev(clients.valid),
    count=dev(clients.count),
    index=index,
  )
  return base.Task(
    config=config,
    dataset=ds,
    clients=clients,
    y_true=dev(y_true),
    forget=dev(forget),
    retain_valid=dev(np.asarray(clients.valid) & ~forget),
    client_weights=weights,
    request=base.Request(u.kind, classes, client),
    model=model,
    input_shape=tuple(ds.x_train.shape[1:]),
    num_classes=ds.num_classes,
    calibration=None if calibration is None else (dev(calibration[0]), calibration[1]),
  )


def _model_overrides(config) -> dict:
  return {k: v for k, v in config.model.items() if k != "name"}


def backdoor_trigger(config, ds):
  """The backdoor's trigger patch for the dataset's images (backdoor.size)."""
  return bd_lib.trigger_for(ds.x_train, size=config.backdoor.size)


def backdoor_flip(config):
  """The backdoor's label flip: every class -> backdoor.target when it is >= 0, else class
  c -> c + backdoor.shift (mod the class count)."""
  target = int(config.backdoor.get("target", -1))
  if target >= 0:
    return bd_lib.Flip("target", target)
  return bd_lib.Flip("shift", int(config.backdoor.shift))
