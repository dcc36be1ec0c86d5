"""SGA baseline: bounded stochastic gradient ascent on the real data to forget.

Wu et al. 2022 ("Federated Unlearning: Guarantee the Right of Clients to Forget", IEEE
Network 36(5)), as FedAF (Table 2) and QuickDrop compare against it: every target client
(the client of a client / client_class request; every client holding the class of a class
request) runs `sga.epochs` epochs of

    theta <- Proj_{B(theta*, r)}(theta + lr * grad mean_b CE(f(x_b; theta), y_b))

on its own forget samples, stopping for good once a batch's loss (measured before its step)
exceeds `max_loss` (fu_jax.ascent: the loss-threshold and L2-ball bounds; Halimi et al. 2022
for the ball). The server replaces the model by the example-weighted mean of the target
clients' ascended models, then `sga.recovery_rounds` FedAvg rounds on the retained data
(forgotten client excluded) repair the collateral damage.

Choices the papers leave open, and ours:
  * radius r = radius_frac * ||theta_rand - theta*||, theta_rand a freshly initialised model
    (Halimi et al.: one third of the distance to a random model); 0 = no projection.
  * max_loss 0 means log(K), the loss of a uniform prediction: ascending past it only
    makes the model anti-predict the forget data.
  * budget: `sga.epochs` is a cap (the loss threshold usually ends the ascent first);
    `sga.min_steps` raises the epochs so that each target client takes at least that many
    steps (see `budget_epochs`: an epoch is 1 step for 40 images at batch 64, 24 for 1,500).
  * the labels ascended are the ones the client trained on (`old_labels='trained'`, with
    the backdoor flips when a trigger was planted: that is the data it holds and whose
    influence must go); 'original' uses the clean labels.
  * Wu et al. add an EWC regulariser to the ascent; this baseline is the bounded ascent
    alone (EWC is what FedAF studies; `fedaf` / `fedaf_c` cover it).

The local loop is an `fl.LocalProgram` run by the configured client runner (vmapped over
the target clients, or a host loop of jitted steps for conv nets on CPU), so it is as fast
as ordinary local training. `ascent.sga_epoch` computes the same thing inside one
`lax.scan` (checked equal in tests/test_sga.py).

Shared with fedaf (and usable by any method): `target_clients`, `old_labels`,
`run_on_targets` (one checkpointed, cost-counted unlearning round over the target clients)
and `recover` (FedAvg rounds on the retained data).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import ascent
from fu_jax import fl
from fu_jax import losses
from fu_jax import tree as tu
from fu_jax.methods import base

OLD_LABELS = ("trained", "original")

# fold_in ids under fl.STREAM_UNLEARN, so methods' randomness never overlaps.
SGA_ID = 21


# ---------------------------------------------------------------------------------------
# Target clients and their unlearning round (shared with fedaf).


def target_clients(task: base.Task) -> np.ndarray:
  """Sorted indices of the clients holding at least one sample to forget."""
  return np.flatnonzero(np.asarray(task.forget).any(axis=1))


def old_labels(task: base.Task, source: str):
  """[N, max_n] int labels of the old memories: as trained on, or the clean originals."""
  if source not in OLD_LABELS:
    raise ValueError(f"old_labels={source!r}: allowed {OLD_LABELS}")
  return task.clients.y if source == "trained" else task.y_true


def client_keys(seed: int, method_id: int, part: int, clients) -> jax.Array:
  """One key per client: stream_key(seed, STREAM_UNLEARN, method_id, part, client)."""
  return jnp.stack([fl.stream_key(seed, fl.STREAM_UNLEARN, method_id, part, int(c))
                    for c in clients])


def budget_epochs(task: base.Task, clients, epochs: int, min_steps: int,
                  batch_size: int) -> int:
  """Local epochs of an unlearning round that give every target client at least
  `min_steps` optimizer steps: max(epochs, ceil(min_steps / s_min)), where s_min =
  ceil(n_min / batch_size) is the steps per epoch of the target client with the fewest
  forget samples n_min (a client takes ceil(n_k / batch_size) steps an epoch, so the others
  take more). An epoch count alone makes the amount of unlearning depend on how many
  samples a client holds: 40 images at batch 64 are one step an epoch, 1,500 are 24.
  min_steps 0 = `epochs` as given."""
  if min_steps <= 0:
    return int(epochs)
  counts = np.asarray(task.forget)[np.asarray(clients)].sum(axis=1)
  counts = counts[counts > 0]
  if counts.size == 0:
    return int(epochs)
  s_min = math.ceil(int(counts.min()) / int(batch_size))
  return max(int(epochs), math.ceil(int(min_steps) / s_min))


class TargetResult(NamedTuple):
  params: Any         # the aggregated model
  clients: np.ndarray  # target client indices
  counts: np.ndarray   # their forget-sample counts (the aggregation weights)
  metrics: dict        # example-weighted means of the programs' metrics


@jax.jit
def _apply_mean_delta(params, client_params, weights):
  return optax.tree.add(params, fl.aggregate(params, client_params, weights))


def run_on_targets(task: base.Task, env: base.Env, program: fl.LocalProgram, params, *,
                   y, epochs: int, batch_size: int, keys, extra=None,
                   clients=None) -> TargetResult:
  """Runs `program` on each target client's forget samples, from `params`; returns
  params + sum_k n_k (theta_k - params) / sum_k n_k over the targets (n_k = forget count).

  y: labels pytree with leading [N, max_n] axes (all clients); extra: per-target pytree with
  a leading [T] axis (T = len(clients)); keys: [T] keys; clients: default target_clients.
  """
  idx = target_clients(task) if clients is None else np.asarray(clients)
  take = lambda a: np.asarray(a)[idx]  # host gathers: no per-shape XLA compile
  valid = take(task.forget)
  runner = env.runner(program, epochs, batch_size)
  x = task.clients.x[idx]  # only the targets' images (clients.x may be an index block)
  res = runner.run(params, (x, jax.tree.map(take, y)), valid, extra, keys)
  counts = valid.sum(1).astype(np.float32)
  new = _apply_mean_delta(params, res.params, counts)
  w = counts / max(float(counts.sum()), 1.0)
  metrics = {k: float(np.sum(np.asarray(m) * w)) for k, m in res.metrics.items()}
  return TargetResult(new, idx, counts.astype(np.int64), metrics)


def round_cost(params, result: TargetResult, epochs: int) -> dict:
  """fl.round_cost of the unlearning round: each target client with samples to forget
  downloads theta* and uploads its model (the final broadcast is not counted, as for
  every method)."""
  return fl.round_cost(result.counts, result.counts, model_bytes=tu.tree_num_bytes(params),
                       epochs=epochs)


def recover(task: base.Task, env: base.Env, phase: str, params, rounds: int):
  """`rounds` FedAvg rounds on the retained data (forgotten client weighted 0), numbered
  after the training rounds and the unlearning round."""
  if rounds <= 0:
    return params
  return base.fedavg_phase(task, env, phase, params, int(rounds), valid=task.retain_valid,
                           client_weights=task.client_weights,
                           round_offset=task.config.fl.rounds + 1)


# ---------------------------------------------------------------------------------------
# The ascent program.


class SgaState(NamedTuple):
  params: Any
  anchor: Any    # theta*: centre of the L2 ball
  radius: Any    # the ball's radius (float32 scalar; +inf = no projection)
  stopped: Any   # bool: a batch loss exceeded max_loss; no further step


@functools.lru_cache(maxsize=32)
def sga_program(apply_fn: Callable, lr: float, *, project: bool = False,
                max_loss: float | None = None) -> fl.LocalProgram:
  """Bounded ascent as a LocalProgram (same steps as `ascent.sga_epoch`).

  step: L_b = masked CE; stopped |= L_b > max_loss; theta' = theta + lr grad L_b,
  projected on the ball ||theta' - theta*|| <= radius when `project`; kept unless stopped.
  With `project`, each client's `extra` is its radius (a scalar): a runtime value, so one
  compiled program serves every radius (an audit's K models each have their own, from
  their own theta*). Equal arguments return the same program object, whose runners share
  compiled steps (fl.ClientRunner).
  Metrics: 'loss' (L_b, measured before the step) and 'stopped'.
  """
  def loss_fn(p, batch):
    return losses.masked_ce(apply_fn(p, batch.x), batch.y, batch.mask)

  def init(server_params, extra, key):
    del key
    radius = jnp.asarray(extra if project else jnp.inf, jnp.float32)
    return SgaState(server_params, server_params, radius, jnp.zeros((), jnp.bool_))

  def step(state, batch, key):
    del key
    loss, g = jax.value_and_grad(loss_fn)(state.params, batch)
    stopped = state.stopped
    if max_loss is not None:
      stopped = stopped | (loss > max_loss)
    new = ascent.sga_step(state.params, g, lr)
    if project:
      new = ascent.project_l2_ball(new, state.anchor, state.radius)
    p = jax.tree.map(lambda a, b: jnp.where(stopped, b, a), new, state.params)
    return SgaState(p, state.anchor, state.radius, stopped), {
        "loss": loss, "stopped": stopped.astype(jnp.float32)}

  return fl.LocalProgram(init, step, lambda s: s.params)


def settings(config) -> dict:
  """The sga section with its 0-means-default values resolved; raises on bad values."""
  s = config.sga
  out = {"lr": float(s.lr), "epochs": int(s.epochs), "min_steps": int(s.min_steps),
         "batch_size": int(s.batch_size) or int(config.fl.batch_size),
         "radius_frac": float(s.radius_frac), "max_loss": float(s.max_loss),
         "old_labels": str(s.old_labels), "recovery_rounds": int(s.recovery_rounds)}
  if not out["lr"] > 0:
    raise ValueError(f"sga.lr={s.lr!r}: must be > 0")
  if out["epochs"] < 1:
    raise ValueError(f"sga.epochs={s.epochs!r}: must be >= 1")
  if out["min_steps"] < 0:
    raise ValueError(f"sga.min_steps={s.min_steps!r}: must be >= 0 (0 = off)")
  if out["radius_frac"] < 0:
    raise ValueError(f"sga.radius_frac={s.radius_frac!r}: must be >= 0 (0 = no projection)")
  if out["recovery_rounds"] < 0:
    raise ValueError(f"sga.recovery_rounds={s.recovery_rounds!r}: must be >= 0")
  if out["old_labels"] not in OLD_LABELS:
    raise ValueError(f"sga.old_labels={s.old_labels!r}: allowed {OLD_LABELS}")
  return out


def ball_radius(task: base.Task, params, frac: float) -> float | None:
  """frac * ||theta_rand - theta*||, theta_rand a fresh init from the unlearning stream."""
  if frac <= 0:
    return None
  rand = base.init_params(task, fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, SGA_ID))
  delta = optax.tree.sub(rand, params)
  return float(frac * jnp.sqrt(optax.tree.vdot(delta, delta)))


def _unlearn(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  cfg = task.config
  s = settings(cfg)
  params = trained.params
  radius = ball_radius(task, params, s["radius_frac"])
  if s["max_loss"] == 0:
    max_loss = math.log(task.num_classes)
  else:
    max_loss = None if s["max_loss"] < 0 else s["max_loss"]
  program = sga_program(task.apply_fn, s["lr"], project=radius is not None,
                        max_loss=max_loss)
  targets = target_clients(task)
  extra = None if radius is None else jnp.full((len(targets),), radius, jnp.float32)
  y = old_labels(task, s["old_labels"])
  keys = client_keys(cfg.seed, SGA_ID, 1, targets)
  epochs = budget_epochs(task, targets, s["epochs"], s["min_steps"], s["batch_size"])
  info = {}

  def round_fn(p, r):
    del r
    out = run_on_targets(task, env, program, p, y=y, epochs=epochs,
                         batch_size=s["batch_size"], keys=keys, extra=extra, clients=targets)
    info.update(out.metrics)
    m = round_cost(p, out, epochs)
    return out.params, dict(m, loss=out.metrics["loss"])

  params = env.rounds("sga", params, 1, round_fn, lambda p: p)
  params = recover(task, env, "sga_recovery", params, s["recovery_rounds"])
  results = {"sga_target_clients": [int(c) for c in targets],
             "sga_radius": radius, "sga_max_loss": max_loss, "sga_epochs": epochs}
  if "stopped" in info:  # absent when the round was restored from a checkpoint
    results["sga_stopped_fraction"] = info["stopped"]
  return base.Outcome(params, results)


METHODS = {"sga": base.Method("sga", base.REQUEST_KINDS, "fedavg", _unlearn)}
