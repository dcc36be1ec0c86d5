"""FedEraser: client-level unlearning by calibrating stored updates.

Liu, Ma, Yang, Wang, Liu, "FedEraser: Enabling Efficient Client-Level Data Removal from
Federated Learning Models", IWQoS 2021. Trainer `federaser`, method `federaser`.

Training (`train_federaser`): plain FedAvg, bit-identical to the `fedavg` trainer's model,
where the server additionally keeps, every `federaser.interval` rounds (Delta t), the global
model M^{t_j} it broadcast and every sampled client's update U_k^{t_j} = theta_k - M^{t_j},
for the stored rounds t_j = j * Delta t < R. The store is part of the checkpointed round
state, so a resumed or cached training run still has it; its size is reported as
`stored_update_bytes` (client updates) and `stored_model_bytes` (global models).

Unlearning (calibration training) from the initial model M~^{t_0} = M^{t_0}, for each stored
round j, with K_j the remaining clients that took part in round t_j:

    U~_k = calibration update of client k in K_j: `calib_ratio` of the local epochs of
           ordinary local training from M~^{t_j} on its data, minus M~^{t_j}
    U^_k = ||U_k^{t_j}||_l * U~_k / ||U~_k||_l            per layer l (each parameter leaf)
    M~^{t_{j+1}} = M~^{t_j} + server_lr * sum_k n_k U^_k / sum_k n_k

The old update gives the step length, the calibration its direction. At j = 0 both models
are the initial model, so U^_k = U_k^{t_0} without calibration (the paper: "FedEraser can
directly update the global model without calibration ... at the first reconstruction
epoch"). The result is M~ after the last stored round: ceil(R / Delta t) server steps.

Choices the paper leaves open, and ours:
  * Stored rounds t_j = 0, Delta t, 2 Delta t, ...: the first one starts at the initial model,
    so the uncalibrated first step above is exact. (The reference code pairs client models
    of round j Delta t - 1 with the global model of round j Delta t, an off-by-one.)
  * Fractional calibration epochs: the calibration runs ceil(r E) epochs (E = fl.local_epochs,
    r = calib_ratio) over a random ceil(n_k r E / ceil(r E))-example subset of the client's
    data, drawn afresh at every stored round: r E whole epochs when r E is an integer (the
    paper: E_cali = r E); with E = 1 and r = 0.5, one pass over a random half of the data,
    i.e. the first half of an epoch's batches. The reference code rounds r E up instead
    (ceil(0.5) = 1: no saving at E = 1).
  * Per-layer norms (`combine='client'`): each remaining client's calibrated update is
    rescaled, as in the paper's formula; the reference code rescales the clients' mean
    update instead (norm of the mean old update over the norm of the mean calibration
    update, per layer): `combine='mean'` (example-weighted means here).
  * A layer whose calibration update is zero keeps a zero update (0/0 = 0).
  * Aggregation weights: the clients' example counts, as in training (FedAvg).
  * Client sampling: the clients sampled at t_j (their updates are the ones stored) minus the
    removed client; a stored round where no remaining client took part leaves the model.
  * Class requests: served only when exactly one client holds the class (Xu et al.'s
    one-class-per-client comparison); that client is removed as a whole, including any
    data of other classes it holds (`federaser_removed_examples` reports how much).

Communication: in stored round j >= 1 each calibrating client downloads M~^{t_j} and uploads
its calibrated model (base.fedavg_phase's accounting); round 0 exchanges nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import fl
from fu_jax import tree as tu
from fu_jax.methods import base

COMBINE = ("client", "mean")
# Keys of config.federaser that do not change the trained model (and its store); every
# other key of the section is in its cache key (base.Trainer).
UNLEARN_ONLY_KEYS = ("calib_ratio", "combine")
FEDERASER_ID = 31  # fold_in id under fl.STREAM_UNLEARN
_PART_SUBSET, _PART_CALIB = 0, 1


def config_section(fl_cfg):
  """The `federaser` section (`fl_cfg`: the config's fl section; unused). Training key
  (a change retrains the federaser model and its store): interval."""
  del fl_cfg
  s = base.new_section()
  s.interval = 1  # Delta t: store rounds 0, Delta t, 2 Delta t, ... (1..fl.rounds)
  s.calib_ratio = 0.5  # calibration work / local training work (paper 0.5; with 1
  #                        local epoch: one pass over a random half of the data)
  s.combine = "client"  # per-client rescaled updates (paper) | mean (reference code)
  return s


RULES = {
  "calib_ratio": base.in_range(0, 1, low_open=True),
  "combine": base.one_of(COMBINE),
}


def validate(config):
  rounds = config.fl.rounds
  base.check_section(
    config,
    "federaser",
    dict(RULES, interval=base.Rule(lambda v: 1 <= v <= rounds, f"allowed 1..fl.rounds={rounds}")),
  )


def num_stored(rounds: int, interval: int) -> int:
  """Stored rounds t_j = j * interval < rounds."""
  return math.ceil(rounds / interval)


def calib_schedule(local_epochs: int, ratio: float) -> tuple[int, float]:
  """(epochs, fraction): calibration = `epochs` passes over a `fraction` of the data, so
  that epochs * fraction = ratio * local_epochs."""
  total = ratio * local_epochs
  epochs = max(1, math.ceil(total - 1e-9))
  return epochs, min(1.0, total / epochs)


# ---------------------------------------------------------------------------------------
# Training: FedAvg that keeps every interval-th round's updates.


class Store(NamedTuple):
  """What the server keeps for FedEraser; leading axis T = stored rounds, k = sampled."""

  rounds: Any  # int32 [T]: the training round t_j
  globals: Any  # params pytree [T, ...]: M^{t_j}, the model broadcast in round t_j
  clients: Any  # int32 [T, k]: the clients sampled in round t_j
  active: Any  # bool [T, k]: sampled and training (weight > 0)
  updates: Any  # params pytree [T, k, ...]: U_k^{t_j} = theta_k - M^{t_j}


class ServerWithStore(NamedTuple):
  """The trainer's round state: the server plus the stored client updates."""

  server: fl.ServerState
  store: Store


def empty_store(params, num_rounds: int, num_sampled: int) -> Store:
  t, k = num_rounds, num_sampled
  return Store(
    jnp.zeros((t,), jnp.int32),
    jax.tree.map(lambda p: jnp.zeros((t,) + p.shape, p.dtype), params),
    jnp.zeros((t, k), jnp.int32),
    jnp.zeros((t, k), jnp.bool_),
    jax.tree.map(lambda p: jnp.zeros((t, k) + p.shape, p.dtype), params),
  )


@functools.partial(jax.jit, donate_argnums=(0,))
def _put(store: Store, j, round_idx, global_params, clients, active, client_params) -> Store:
  upd = jax.tree.map(lambda c, g: c - g[None], client_params, global_params)
  at = lambda a, v: a.at[j].set(v)
  return Store(
    at(store.rounds, round_idx),
    jax.tree.map(at, store.globals, global_params),
    at(store.clients, clients),
    at(store.active, active),
    jax.tree.map(at, store.updates, upd),
  )


def store_bytes(store: Store) -> dict:
  """Bytes the server keeps: client updates (only the active slots) and global models."""
  per_update = tu.tree_num_bytes(jax.tree.map(lambda a: a[0, 0], store.updates))
  return {
    "stored_update_bytes": int(np.asarray(store.active).sum()) * per_update,
    "stored_model_bytes": tu.tree_num_bytes(store.globals),
  }


def train_federaser(task: base.Task, env: base.Env) -> base.Trained:
  """FedAvg (the same rounds as base.train_fedavg, so the same model bit for bit) that
  also stores rounds 0, interval, 2 interval, ...; Trained.kept is the Store."""
  cfg = task.config
  s = cfg.federaser
  c = task.clients
  runner = env.runner(base.client_program(task), cfg.fl.local_epochs, cfg.fl.batch_size)
  server_opt = fl.server_optimizer(float(cfg.fl.server_lr))
  weights = np.ones(c.count.shape[0])
  k = base.num_sampled(cfg)
  params = base.init_params(task)
  play = fl.fedavg_play(
    runner,
    (c.x, c.y),
    c.valid,
    seed=cfg.seed,
    client_weights=weights,
    num_sampled=k,
    server_opt=server_opt,
    server_of=lambda st: st.server,
  )

  def store_round(state: ServerWithStore, r, res: fl.RoundResult) -> ServerWithStore:
    """Keeps round r's broadcast model and client updates when r is a stored round."""
    store = state.store
    if r % s.interval == 0:
      store = _put(
        store,
        r // s.interval,
        r,
        state.server.params,
        jnp.asarray(res.sampled, jnp.int32),
        jnp.asarray(weights[res.sampled] > 0),
        res.client.params,
      )
    return ServerWithStore(res.server, store)

  init = ServerWithStore(
    fl.server_init(params, server_opt),
    empty_store(params, num_stored(cfg.fl.rounds, s.interval), k),
  )
  state = fl.fedavg_rounds(
    play,
    init,
    cfg.fl.rounds,
    rounds=env.rounds,
    phase="train",
    params_fn=lambda st: st.server.params,
    on_round=store_round,
    model_bytes=tu.tree_num_bytes(params),
    epochs=cfg.fl.local_epochs,
  )
  return base.Trained(state.server.params, kept=state.store)


# ---------------------------------------------------------------------------------------
# Unlearning: calibration training over the stored rounds.


def removed_client(task: base.Task) -> int:
  """The client whose influence is removed: the client of a client request, or the only
  holder of the class of a class request (ValueError otherwise)."""
  req = task.request
  if req.kind == "client":
    return int(req.client)
  if req.kind == "class":
    holders = base.target_clients(task)
    if len(holders) != 1:
      raise base.Unservable(
        f"federaser removes whole clients: a class request is served only when exactly one "
        f"client holds the class, but classes {list(req.classes)} are held by clients "
        f"{[int(h) for h in holders]} (use unlearn.kind=client or another method)"
      )
    return int(holders[0])
  raise ValueError(f"federaser serves client and class requests, got {req.kind!r}")


@jax.jit
def calibrated_updates(old, cal):
  """Per client (leading axis) and per leaf: ||old||_leaf * cal / ||cal||_leaf (0 where
  ||cal|| = 0)."""

  def one(o, c):
    axes = tuple(range(1, o.ndim))
    no = jnp.sqrt(jnp.sum(jnp.square(o), axis=axes, keepdims=True))
    nc = jnp.sqrt(jnp.sum(jnp.square(c), axis=axes, keepdims=True))
    return jnp.where(nc > 0, c * no / jnp.where(nc > 0, nc, 1.0), 0.0)

  return jax.tree.map(one, old, cal)


@jax.jit
def _mean(stacked, weights):
  return jax.tree.map(lambda a: a[None], tu.tree_weighted_mean(stacked, weights))


def combine_updates(old, cal, weights, mode: str):
  """The example-weighted mean update of a stored round: per client rescaled ('client', the
  paper) or the mean calibration update rescaled to the mean old update ('mean')."""
  if mode == "mean":
    return tu.tree_weighted_mean(
      calibrated_updates(_mean(old, weights), _mean(cal, weights)), jnp.ones((1,))
    )
  return tu.tree_weighted_mean(calibrated_updates(old, cal), weights)


@functools.partial(jax.jit, static_argnums=1)
def _uniform(key, n):
  return jax.random.uniform(key, (n,))


def subset_mask(task: base.Task, clients, fraction: float, j: int) -> np.ndarray:
  """bool [len(clients), max_n]: ceil(fraction * n_k) of each client's retained examples,
  uniformly at random (key per stored round and client); all of them when fraction = 1."""
  v = np.array(np.asarray(task.retain_valid)[np.asarray(clients)])
  if fraction >= 1.0:
    return v
  seed = task.config.seed
  for i, c in enumerate(clients):
    rows = np.flatnonzero(v[i])
    m = math.ceil(fraction * rows.size - 1e-9)
    u = np.asarray(
      _uniform(
        fl.stream_key(seed, fl.STREAM_UNLEARN, FEDERASER_ID, _PART_SUBSET, j, int(c)), v.shape[1]
      )
    )
    keep = rows[np.argsort(u[rows], kind="stable")[:m]]
    v[i] = False
    v[i, keep] = True
  return v


def _unlearn(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  cfg = task.config
  s = cfg.federaser
  store = trained.kept
  if not isinstance(store, Store):
    raise ValueError(
      "federaser needs the updates stored by its own trainer ('federaser'); "
      f"the trained model came with {type(store).__name__}"
    )
  gone = removed_client(task)
  num = task.clients.count.shape[0]
  weights = np.ones(num)
  weights[gone] = 0.0
  counts = np.asarray(task.retain_valid).sum(1).astype(np.float32)
  epochs, fraction = calib_schedule(cfg.fl.local_epochs, s.calib_ratio)
  program = fl.sgd_program(task.apply_fn, base.client_optimizer(cfg))
  runner = env.runner(program, epochs, cfg.fl.batch_size)
  clients_all = np.asarray(store.clients)
  active_all = np.asarray(store.active)
  num_rounds = clients_all.shape[0]
  params0 = jax.tree.map(lambda a: a[0], store.globals)
  model_bytes = tu.tree_num_bytes(params0)
  data = (task.clients.x, task.clients.y)
  server_lr = float(cfg.fl.server_lr)

  def round_fn(params, j):
    idx = clients_all[j]
    use = active_all[j] & (weights[idx] > 0) & (counts[idx] > 0)
    keep = idx[use]
    if keep.size == 0:
      return params, {}
    w = jnp.asarray(counts[keep])
    old = jax.tree.map(lambda a: a[j][np.flatnonzero(use)], store.updates)
    if j == 0:  # M~^{t_0} = M^{t_0}: the stored updates are exact (no calibration)
      new = tu.tree_weighted_mean(old, w)
      m = {}
    else:
      valid = subset_mask(task, keep, fraction, j)
      keys = jnp.stack(
        [
          fl.stream_key(cfg.seed, fl.STREAM_UNLEARN, FEDERASER_ID, _PART_CALIB, j, int(c))
          for c in keep
        ]
      )
      # The calibrating clients' index rows (clients.x is an index block into the one copy
      # of the training images, fu_jax/images.py): their images are gathered per batch,
      # as in training (fl.fedavg_round), never for every client at once.
      rows = jax.tree.map(lambda a: jnp.take(a, jnp.asarray(keep), axis=0), data)
      res = runner.run(params, rows, valid, None, keys)
      cal = jax.tree.map(lambda c, p: c - p[None], res.params, params)
      new = combine_updates(old, cal, w, s.combine)
      wn = np.asarray(w) / float(np.sum(w))
      m = {k: float(np.sum(np.asarray(v) * wn)) for k, v in res.metrics.items()}
      m.update(fl.round_cost(valid.sum(1), w, model_bytes=model_bytes, epochs=epochs))
    return optax.tree.add(params, optax.tree.scale(server_lr, new)), m

  params = env.rounds("federaser", params0, num_rounds, round_fn, lambda p: p)
  forget = np.asarray(task.forget)
  results = {
    **store_bytes(store),
    "federaser_stored_rounds": int(num_rounds),
    "federaser_calib_epochs": epochs,
    "federaser_calib_fraction": fraction,
    "federaser_removed_client": gone,
    "federaser_removed_examples": int(np.asarray(task.clients.valid)[gone].sum()),
    "federaser_forget_examples": int(forget.sum()),
  }
  return base.Outcome(params, results)


def _check(task: base.Task):
  removed_client(task)


TRAINER = base.Trainer("federaser", train_federaser, UNLEARN_ONLY_KEYS)
SECTION = base.Section("federaser", config_section, validate)
METHODS = {
  "federaser": base.Method(
    "federaser",
    ("class", "client"),
    TRAINER,
    _unlearn,
    check=_check,
    section=SECTION,
    streams=(FEDERASER_ID,),
  )
}
