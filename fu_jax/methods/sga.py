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

The target clients, their unlearning round and the recovery rounds are base's
(`target_clients`, `budget_epochs`, `run_on_targets`, `recover`), shared with FedAF.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fu_jax import ascent, fl, losses
from fu_jax.methods import base

# fold_in ids under fl.STREAM_UNLEARN, so methods' randomness never overlaps.
SGA_ID = 21


# ---------------------------------------------------------------------------------------
# The ascent program.


class SgaState(NamedTuple):
  params: Any
  anchor: Any  # theta*: centre of the L2 ball
  radius: Any  # the ball's radius (float32 scalar; +inf = no projection)
  stopped: Any  # bool: a batch loss exceeded max_loss; no further step


@functools.lru_cache(maxsize=32)
def sga_program(
  apply_fn: Callable, lr: float, *, project: bool = False, max_loss: float | None = None
) -> fl.LocalProgram:
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
      "loss": loss,
      "stopped": stopped.astype(jnp.float32),
    }

  return fl.LocalProgram(init, step, lambda s: s.params)


def config_section(fl_cfg):
  """The `sga` section (`fl_cfg`: the config's fl section, which batch_size follows)."""
  s = base.new_section()
  s.lr = 0.1  # ascent step size
  s.epochs = 5  # ascent epochs (max_loss usually ends the ascent earlier)
  s.min_steps = 0  # epochs raised so each target client has >= this many steps
  s.batch_size = base.linked(fl_cfg, "batch_size")  # ascent batch size
  s.radius_frac = 0.33  # L2 ball around theta*: frac * ||theta_random - theta*|| (0 = none)
  s.max_loss = 0.0  # stop once a batch CE exceeds it (0 = log K; < 0 = never)
  s.old_labels = "trained"  # labels ascended: trained (backdoor flips incl.) | original
  s.recovery_rounds = 1  # FedAvg rounds on retained data afterwards
  return s


RULES = {
  "lr": base.positive(),
  "epochs": base.at_least(1),
  "min_steps": base.at_least(0, "0 = off"),
  "batch_size": base.at_least(1),
  "radius_frac": base.at_least(0, "0 = no projection"),
  "recovery_rounds": base.at_least(0),
  "old_labels": base.one_of(base.OLD_LABELS),
}


def validate(config):
  base.check_section(config, "sga", RULES)


def ball_radius(task: base.Task, params, frac: float) -> float | None:
  """frac * ||theta_rand - theta*||, theta_rand a fresh init from the unlearning stream."""
  if frac <= 0:
    return None
  rand = base.init_params(task, fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, SGA_ID))
  delta = optax.tree.sub(rand, params)
  return float(frac * jnp.sqrt(optax.tree.vdot(delta, delta)))


def _unlearn(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  cfg = task.config
  s = cfg.sga
  params = trained.params
  radius = ball_radius(task, params, s.radius_frac)
  if s.max_loss == 0:
    max_loss = math.log(task.num_classes)
  else:
    max_loss = None if s.max_loss < 0 else float(s.max_loss)
  program = sga_program(task.apply_fn, s.lr, project=radius is not None, max_loss=max_loss)
  targets = base.target_clients(task)
  extra = None if radius is None else jnp.full((len(targets),), radius, jnp.float32)
  y = base.old_labels(task, s.old_labels)
  keys = base.client_keys(cfg.seed, SGA_ID, 1, targets)
  epochs = base.budget_epochs(task, targets, s.epochs, s.min_steps, s.batch_size)

  def round_fn(p, r):
    del r
    out = base.run_on_targets(
      task,
      env,
      program,
      p,
      y=y,
      epochs=epochs,
      batch_size=s.batch_size,
      keys=keys,
      extra=extra,
      clients=targets,
    )
    return out.params, dict(out.cost, **out.metrics)  # loss, stopped

  params = env.rounds("sga", params, 1, round_fn, lambda p: p)
  info = base.last_round_metrics(env, "sga")  # restored with the round on a resume
  params = base.recover(task, env, "sga_recovery", params, s.recovery_rounds)
  results = {
    "sga_target_clients": [int(c) for c in targets],
    "sga_radius": radius,
    "sga_max_loss": max_loss,
    "sga_epochs": epochs,
  }
  if "stopped" in info:  # absent from checkpoints written before round metrics were kept
    results["sga_stopped_fraction"] = info["stopped"]
  return base.Outcome(params, results)


METHODS = {"sga": base.Method("sga", base.REQUEST_KINDS, base.FEDAVG, _unlearn, validate=validate)}
