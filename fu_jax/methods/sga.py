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
  * the stopping rule, `sga.stop`: 'loss' is the rule above (steps lr * g, stop at the
    first batch whose loss exceeds max_loss, recovery after); 'normalized' (the default for
    a class request, `stop='auto'`) takes steps of L2 length `normalized_lr` along the
    batch gradient, up to `normalized_steps` per client, stops past `normalized_max_loss`,
    and runs the recovery rounds *before* the ascent. Why: the CE gradient of a confident
    model is tiny (dCE/dz = p - e_y ~ 0 at p_y ~ 1) and grows without bound once the ascent
    starts, so lr * g crawls, then jumps (Fashion-MNIST, 12,000 images, class 1: one lr-0.1
    step took a client's forget loss from 0.35 to 16.7, the next to 1,635), and whether
    the loss rule forgets a class hangs on that last overshoot (forget 0.2 / 79.6 / 14.7% on
    three seeds). Fixed-length steps stop within a step of the threshold; but a recovery
    round after a controlled stop brings the class back (86-95%), hence recovery first and
    a threshold (5) past log K. A class request only: for a client's or samples' data a
    retrained model still predicts most labels, and without a repair round after it the
    rule drives their loss far past the trained model's (samples: 1.79 vs 1.40, retrain
    0.36); those keep 'loss' (BUILD.md, the data-size section, has the measurements).
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

`sga.stop='calibrated'` replaces the ascent by fu_jax.calibration's rule: each forgotten
sample i gets a target confidence t_i (its confidence phi quantile-matched from the client's
retained samples to the server's calibration split, `unlearn.calibration_size` images no
client trains on) and the clients descend the hinge (1/|B|) sum_i max(0, phi_i - t_i): a
sample moves the model only while it is more confident than a model that never saw it would
be, and the ascent ends (a step changes nothing) once none is, instead of at a loss threshold
that ignores where a retrained model would put the sample. With it the recovery rounds run
first (`sga.recovery_order='auto'`) and the targets are taken under the recovered model, so
the model returned is the one whose forgotten samples were matched to its own held-out
confidence (recovery after the ascent lifts them again). Its step is `sga.calibrated_lr`
(phi's gradient is 1/(1 - p_y) times CE's: `lr` would jump far past the targets), its cap
`sga.calibrated_steps`, and `sga.calibrated_band` makes the hinge two-sided. Measured on
the audit's digits request (BUILD.md): one-sided, recovery after, lr 0.003, 50 steps U-LiRA
AUC 0.667; recovery before 0.765 and none 0.797 (the one-sided rule drifts ~0.8 below the
targets: lowering one sample lowers its neighbours); two-sided (band 0.3, lr 0.001, 150
steps) with recovery before 0.619, none 0.659, after 0.672 (retrain's null 0.543, the loss
rule 0.723).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import ascent, calibration, fl, losses
from fu_jax.methods import base
from fu_jax.metrics import accuracy as acc_lib

# fold_in ids under fl.STREAM_UNLEARN, so methods' randomness never overlaps.
SGA_ID = 21


# ---------------------------------------------------------------------------------------
# The ascent program.


class SgaState(NamedTuple):
  params: Any
  anchor: Any  # theta*: centre of the L2 ball
  radius: Any  # the ball's radius (float32 scalar; +inf = no projection)
  stopped: Any  # bool: a batch loss exceeded max_loss; no further step


def _ball_init(project: bool):
  """A LocalProgram init: theta* as the ball's centre; the radius is the client's `extra`
  with `project`, else +inf (no projection)."""

  def init(server_params, extra, key):
    del key
    radius = jnp.asarray(extra if project else jnp.inf, jnp.float32)
    return SgaState(server_params, server_params, radius, jnp.zeros((), jnp.bool_))

  return init


@functools.lru_cache(maxsize=32)
def sga_program(
  apply_fn: Callable,
  lr: float,
  *,
  project: bool = False,
  max_loss: float | None = None,
  normalize: bool = False,
) -> fl.LocalProgram:
  """Bounded ascent as a LocalProgram (same steps as `ascent.sga_epoch` without `normalize`).

  step: L_b = masked CE; stopped |= L_b > max_loss; theta' = theta + lr grad L_b (with
  `normalize`: theta + lr grad L_b / ||grad L_b||, a step of L2 length lr), projected on
  the ball ||theta' - theta*|| <= radius when `project`; kept unless stopped.
  With `project`, each client's `extra` is its radius (a scalar): a runtime value, so one
  compiled program serves every radius (an audit's K models each have their own, from
  their own theta*). Equal arguments return the same program object, whose runners share
  compiled steps (fl.ClientRunner).
  Metrics: 'loss' (L_b, measured before the step) and 'stopped'.
  """

  def loss_fn(p, batch):
    return losses.masked_ce(apply_fn(p, batch.x), batch.y, batch.mask)

  def step(state, batch, key):
    del key
    loss, g = jax.value_and_grad(loss_fn)(state.params, batch)
    stopped = state.stopped
    if max_loss is not None:
      stopped = stopped | (loss > max_loss)
    if normalize:  # a zero gradient (no valid sample) stays zero
      g = optax.tree.scale(1.0 / jnp.maximum(optax.tree.norm(g), 1e-12), g)
    new = ascent.sga_step(state.params, g, lr)
    if project:
      new = ascent.project_l2_ball(new, state.anchor, state.radius)
    p = jax.tree.map(lambda a, b: jnp.where(stopped, b, a), new, state.params)
    return SgaState(p, state.anchor, state.radius, stopped), {
      "loss": loss,
      "stopped": stopped.astype(jnp.float32),
    }

  return fl.LocalProgram(_ball_init(project), step, lambda s: s.params)


@functools.lru_cache(maxsize=32)
def calibrated_program(
  apply_fn: Callable, lr: float, *, project: bool = False, band: float | None = None
) -> fl.LocalProgram:
  """Gated confidence descent as a LocalProgram (fu_jax.calibration's rule).

  Batches carry y = (labels, targets). step: L_b = calibration.hinge_excess (mean over the
  batch's valid samples of max(0, phi_i - t_i), plus max(0, t_i - band - phi_i) with a
  `band`); theta' = theta - lr grad L_b, projected on
  the ball ||theta' - theta*|| <= radius when `project` (each client's `extra` is its radius,
  as in `sga_program`). A step with no sample above its target has a zero gradient and
  leaves theta unchanged (the rule's stop); a later step reopens when a sample is lifted
  above its target again. Metrics: 'loss' (L_b before the step), 'active' (fraction of the
  batch's samples above target) and 'moved' (1 when any was, so the step changed theta).
  """

  def loss_fn(p, batch):
    labels, targets = batch.y
    return calibration.hinge_excess(apply_fn(p, batch.x), labels, targets, batch.mask, band)

  def step(state, batch, key):
    del key
    (loss, active), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    new = ascent.sga_step(state.params, g, -lr)
    if project:
      new = ascent.project_l2_ball(new, state.anchor, state.radius)
    moved = jnp.any(active)
    p = jax.tree.map(lambda a, b: jnp.where(moved, a, b), new, state.params)
    n = jnp.maximum(jnp.sum(batch.mask), 1)
    return SgaState(p, state.anchor, state.radius, state.stopped), {
      "loss": loss,
      "active": jnp.sum(active) / n,
      "moved": moved.astype(jnp.float32),
    }

  return fl.LocalProgram(_ball_init(project), step, lambda s: s.params)


def calibrated_targets(task: base.Task, params, y) -> np.ndarray:
  """Targets t [N, max_n] float32 for the forgotten samples (0 elsewhere): per target client,
  calibration.quantile_transfer of its forgotten samples' phi under `params` (labels y) from
  the phis of its retained samples (seen; its forgotten ones when it retains none) to the
  calibration split's phis under `params` (unseen, its own labels)."""
  if task.calibration is None:
    raise base.ConfigError("sga.stop='calibrated' needs unlearn.calibration_size > 0")
  x_cal, y_cal = task.calibration
  phi_of = lambda x, labels: np.asarray(
    calibration.margin(acc_lib.predict_logits(task.apply_fn, params, x), labels)
  )
  phi_cal = phi_of(x_cal, y_cal)
  forget, retain = np.asarray(task.forget), np.asarray(task.retain_valid)
  y = np.asarray(y)
  out = np.zeros(forget.shape, np.float32)
  for c in base.target_clients(task):
    rows = np.flatnonzero(forget[c])
    phi = phi_of(np.asarray(task.clients.x[np.full(rows.shape, c), rows]), y[c, rows])
    kept = np.flatnonzero(retain[c])
    seen = (
      phi
      if kept.size == 0
      else phi_of(np.asarray(task.clients.x[np.full(kept.shape, c), kept]), y[c, kept])
    )
    out[c, rows] = calibration.quantile_transfer(phi, seen, phi_cal)
  return out


def config_section(fl_cfg):
  """The `sga` section (`fl_cfg`: the config's fl section, which batch_size follows)."""
  s = base.new_section()
  s.lr = 0.1  # ascent step size of the loss rule
  s.epochs = 5  # ascent epochs (max_loss usually ends the ascent earlier)
  s.min_steps = 0  # loss rule: epochs raised so each target client has >= this many steps
  s.batch_size = base.linked(fl_cfg, "batch_size")  # ascent batch size
  s.radius_frac = 0.33  # L2 ball around theta*: frac * ||theta_random - theta*|| (0 = none)
  s.max_loss = 0.0  # loss rule: stop once a batch CE exceeds it (0 = log K; < 0 = never)
  s.old_labels = "trained"  # labels ascended: trained (backdoor flips incl.) | original
  s.recovery_rounds = 1  # FedAvg rounds on retained data afterwards
  # loss: ascend until a batch loss exceeds max_loss; normalized: steps of fixed length
  # after the recovery rounds (below); calibrated: descend each sample's confidence to its
  # calibrated target (fu_jax.calibration; needs unlearn.calibration_size); auto:
  # normalized for a class request, loss otherwise
  s.stop = "auto"
  s.normalized_lr = 0.1  # the normalized rule's step length (L2)
  s.normalized_steps = 40  # its steps per target client (the threshold may stop it first)
  s.normalized_max_loss = 5.0  # it stops once a batch CE exceeds this (0 = log K)
  # step size of the calibrated descent: phi's gradient is 1/(1 - p_y) ~ e^phi times CE's,
  # so `lr` (sized for CE ascent) would jump far past the targets in one step
  s.calibrated_lr = 0.001
  # > 0: also pull up a sample pushed more than this below its target (0 = one-sided)
  s.calibrated_band = 0.3
  # the calibrated rule's step cap per target client (in place of min_steps; it usually
  # stops earlier, once every sample is at its target)
  s.calibrated_steps = 150
  # recovery rounds after the ascent | before it | auto: before for stop=calibrated (its
  # targets are then the returned model's own held-out confidence) and stop=normalized (a
  # round after it brings a class back), after for stop=loss
  s.recovery_order = "auto"
  return s


STOPS = ("auto", "loss", "normalized", "calibrated")

RULES = {
  "lr": base.positive(),
  "calibrated_lr": base.positive(),
  "calibrated_band": base.at_least(0, "0 = one-sided"),
  "epochs": base.at_least(1),
  "min_steps": base.at_least(0, "0 = off"),
  "normalized_lr": base.positive(),
  "normalized_steps": base.at_least(1),
  "normalized_max_loss": base.at_least(0, "0 = log K"),
  "batch_size": base.at_least(1),
  "radius_frac": base.at_least(0, "0 = no projection"),
  "recovery_rounds": base.at_least(0),
  "old_labels": base.one_of(base.OLD_LABELS),
  "stop": base.one_of(STOPS),
  "calibrated_steps": base.at_least(1),
  "recovery_order": base.one_of(("auto", "after", "before")),
}


def validate(config):
  base.check_section(config, "sga", RULES)
  base.require(
    config.sga.stop != "calibrated" or config.unlearn.get("calibration_size", 0) > 0,
    "sga.stop='calibrated' needs a calibration split: set unlearn.calibration_size > 0",
  )


def ball_radius(task: base.Task, params, frac: float) -> float | None:
  """frac * ||theta_rand - theta*||, theta_rand a fresh init from the unlearning stream."""
  if frac <= 0:
    return None
  rand = base.init_params(task, fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, SGA_ID))
  delta = optax.tree.sub(rand, params)
  return float(frac * jnp.sqrt(optax.tree.vdot(delta, delta)))


def resolve_stop(task: base.Task, stop: str) -> str:
  """The stopping rule `stop` names: 'auto' is 'normalized' for a class request, else 'loss'."""
  if stop != "auto":
    return stop
  return "normalized" if task.request.kind == "class" else "loss"


def _unlearn(
  task: base.Task, env: base.Env, trained: base.Trained, stop: str | None = None
) -> base.Outcome:
  """SGA with the stopping rule `stop` (default: the config's sga.stop)."""
  cfg = task.config
  s = cfg.sga
  stop = resolve_stop(task, stop or s.stop)
  params = trained.params
  radius = ball_radius(task, params, s.radius_frac)
  normalized = stop == "normalized"
  max_loss = base.loss_bound(s.normalized_max_loss if normalized else s.max_loss, task.num_classes)
  program = sga_program(
    task.apply_fn,
    s.normalized_lr if normalized else s.lr,
    project=radius is not None,
    max_loss=max_loss,
    normalize=normalized,
  )
  targets = base.target_clients(task)
  extra = None if radius is None else jnp.full((len(targets),), radius, jnp.float32)
  y = base.old_labels(task, s.old_labels)
  calibrated = stop == "calibrated"
  recover_first = s.recovery_order == "before" or (s.recovery_order == "auto" and stop != "loss")
  if recover_first:
    params = base.recover(task, env, "sga_recovery", params, s.recovery_rounds)
  if calibrated:
    max_loss = None
    band = float(s.calibrated_band) or None
    program = calibrated_program(
      task.apply_fn, s.calibrated_lr, project=radius is not None, band=band
    )
    y = (y, jnp.asarray(calibrated_targets(task, params, y)))
  keys = base.client_keys(cfg.seed, SGA_ID, 1, targets)
  min_steps = {"calibrated": s.calibrated_steps, "normalized": s.normalized_steps}.get(
    stop, s.min_steps
  )
  epochs = base.budget_epochs(task, targets, s.epochs, min_steps, s.batch_size)

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
  if not recover_first:
    params = base.recover(task, env, "sga_recovery", params, s.recovery_rounds)
  results = {
    "sga_stop": stop,
    "sga_target_clients": [int(c) for c in targets],
    "sga_radius": radius,
    "sga_max_loss": max_loss,
    "sga_epochs": epochs,
  }
  if "stopped" in info:  # absent from checkpoints written before round metrics were kept
    results["sga_stopped_fraction"] = info["stopped"]
  if calibrated:
    results["sga_mean_target"] = float(np.asarray(y[1])[np.asarray(task.forget)].mean())
    if "moved" in info:  # fraction of the ascent's steps that moved the model
      results["sga_moved_fraction"] = info["moved"]
  return base.Outcome(params, results)


def _check_calibration(task: base.Task):
  if task.calibration is None:
    raise base.Unservable(
      "sga_calibrated needs a calibration split the clients never trained on: "
      "set unlearn.calibration_size > 0"
    )


def _unlearn_calibrated(task: base.Task, env: base.Env, trained: base.Trained):
  return _unlearn(task, env, trained, stop="calibrated")


SECTION = base.Section("sga", config_section, validate)  # sga, sga_calibrated

METHODS = {
  "sga": base.Method(
    "sga", base.REQUEST_KINDS, base.FEDAVG, _unlearn, section=SECTION, streams=(SGA_ID,)
  ),
  # sga with sga.stop=calibrated, under its own name so that tables, audits and the
  # frontier show it beside the loss rule from one workdir.
  "sga_calibrated": base.Method(
    "sga_calibrated",
    base.REQUEST_KINDS,
    base.FEDAVG,
    _unlearn_calibrated,
    check=_check_calibration,
    section=SECTION,
    streams=(SGA_ID,),
  ),
}
