"""FedAF: federated unlearning by active forgetting (Li et al. 2023; docs/design.md §5).

Methods `fedaf` and `fedaf_c` (the paper's ablation without EWC). For each target client
(the client of a client / client_class request; every client holding the class of a class
request -- the paper only runs one class of one client):

  1. Memory generator (§4.2, fu_jax.labels): Q untrained Xavier teachers of the same
     architecture label the client's target samples (uniform | random | teacher | debias).
  2. Knowledge preserver (§4.3, fu_jax.ewc): the curvature H of the client's loss at the
     trained global model theta*, as the diagonal empirical Fisher or a CountSketch S J
     (t rows, penalty ||S J (theta - theta*)||^2 / n).
  3. Unlearning loop (Eq. 13): local epochs over the target samples (`fedaf.epochs`, raised
     so that each target client takes at least `fedaf.min_steps` SGD steps, then continued
     until the client's target samples lose their old labels: `max_steps`, `stop_acc`) of
         CE(f(x), y_new) - CE(f(x), y_old) + (lambda/2) (theta - theta*)^T H (theta - theta*)
     by SGD (fedaf.lr, fedaf.momentum), the penalty's gradient added by
     `ewc.add_ewc_gradient`, whose anchor and curvature sit in the optax state (built per
     client from the runner's `extra`).
  4. The server takes the target-count-weighted mean of the target clients' unlearned models
     (for one target client: its model) and broadcasts it; `fedaf.recovery_rounds` ordinary
     FedAvg rounds may follow (§4.1: "broadcasts the unlearned update through the federated
     training loop").

What the paper fixes, and what we chose where it does not:
  * Fisher data: ALL of the client's local data D_k, target included. Eq. 13 comes from
    L_{D_k \\ D_u} = L_{D_k} - L_{D_u}, with L_{D_k} replaced by its quadratic expansion at
    theta* (its gradient vanishes there because theta* was trained on D_k, Eq. 5/7) and
    L_{D_u} kept exactly -- the "- CE(f(x), y_old)" term. A Fisher of the retained data
    alone would subtract L_{D_u} twice. `fisher_data='retain'` is offered as an ablation.
  * Fisher labels: the paper's H is the Fisher of the client's loss at theta*, estimated
    from per-example gradients of the labels it holds (`fisher_labels='empirical'`, the
    empirical Fisher). At a converged theta* those gradients are tiny, so at lambda 10 the
    penalty barely acts. `fisher_labels='model'` samples each example's label from the
    model's predictive distribution at theta* (one draw per example, keys from the Fisher
    step keys: the true Fisher, unbiased), for the diagonal and the CountSketch alike.
  * Fisher sample: the empirical Fisher is a mean over examples; `fisher_samples` (default
    1024) estimates it from that many local examples drawn uniformly without replacement
    (0 = all, the literal reading). Per-example gradients dominate the method's cost on CPU.
  * Old labels: the labels the client trained on (`old_labels='trained'`, backdoor flips
    included -- they are the data it holds, and the Taylor argument needs the labels theta*
    was trained on); debias lowers the same label's component.
  * Step size: plain SGD as in the paper (MNIST lr 0.001), default lr 0.002. The loss is
    unbounded below (-CE); at FL step sizes (0.05, momentum 0.9) one epoch collapses the
    model to a single class, and lambda = 10 with the mean empirical Fisher (tiny at a
    converged theta*) cannot stop it. `max_old_loss` optionally stops a client once its
    old-label loss passes chance level (off by default).
  * Unlearning budget: the paper tunes "EWC training epochs" (1 of {1..5}) on its data, but
    with plain SGD the amount of forgetting follows the number of steps, not epochs: a
    client with 40 target images at batch 64 takes 1 step an epoch, one with 1,500 takes
    24. `min_steps` (default 10: one epoch of a class-wide request on full Fashion-MNIST,
    600 images a client at batch 64, so the settings lr 0.002 was tuned on keep their
    budget) raises the epochs to ceil(min_steps / s_min), s_min the steps per epoch of the
    target client with the fewest target samples; with it lr 0.002 also serves digits (1
    step an epoch). A step floor, not a step count: clients with more data still take
    whole epochs, as the paper does. The floor is not free: too many steps at a large lr
    collapse the model.
  * Forgetting rule (`max_steps`, `stop_acc`): a fixed budget still depends on the model
    and the request (BUILD.md: "Unlearning budget vs the amount of data"). Past the floor,
    the client keeps taking whole epochs until one in which at most `stop_acc` of its
    target samples got their old label (argmax, each measured before its batch's step),
    then stops; `max_steps` (steps of the smallest target client) caps it. The rule is the
    paper's tuning of "EWC training epochs" made per client and automatic: it ends the loop
    where the objective's purpose (the old labels gone) is met, instead of at a count tuned
    on one data set. The paper's loss has no natural stopping point (-CE is unbounded
    below). We stop on the old labels' accuracy over a whole epoch, not on a batch's
    CE(y_old) > log K: that stop (`max_old_loss`) fires on the first confused batch and
    leaves backdoors in place. "Old labels gone" is what retraining gives only when the
    forgotten labels appear nowhere else -- a class-wide request or backdoor labels
    (`forgets_labels`); for a clean client or random samples a retrained model still
    predicts most of them, so there the floor alone is the budget. Under an all-to-one
    backdoor the records whose class is the target keep that label after retraining too,
    so the rule counts only the records whose planted label differs from their class (with
    them counted it is met only once the model stops predicting the target class at all).
    Epochs run in chunks of the floor's epoch count, each runner call resuming the
    clients' states, and the loop ends once every client has stopped
    (`run_until_forgotten`). The count lags: it is taken before each step, so the epoch
    that forgets still counts its early batches and a client forgotten at the floor takes
    one more chunk.
  * Several target clients (class-wide request): each runs the loop on its own target
    samples in one runner call (vmapped or looped, as configured); their models are
    averaged weighted by target-sample counts.
  * Recovery rounds (default 0: the paper times only the unlearned update) use every
    remaining client's retained data (`task.retain_valid`: a client keeps training on its
    other classes, never on the forgotten samples); a forgotten client is weighted 0.
  * Per-example gradients (Fisher) use the same model with `conv_impl='im2col'` (identical
    parameters and outputs): vmapped per-example conv gradients run as batched matmuls
    instead of XLA:CPU's slow grouped convolutions.

Communication (fl.round_cost): in the unlearning round each target client downloads theta*
and uploads one model (teachers, Fisher and labels never leave the client); recovery rounds
are ordinary FedAvg rounds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import ewc, fl, labels, losses, models
from fu_jax import tree as tu
from fu_jax.methods import base

FISHER_DATA = ("local", "retain")
FEDAF_ID = 11  # fold_in id under fl.STREAM_UNLEARN
_PART_TEACHERS, _PART_FISHER_SAMPLE, _PART_FISHER, _PART_UNLEARN = range(4)
LABEL_KEY = 1  # fold_in id of the Fisher's sampled labels under a Fisher step's key
LABEL_CHUNK = 128  # target samples per teacher-labelling call (memory: Q x chunk activations)


def config_section(fl_cfg):
  """The `fedaf` section (`fl_cfg`: the config's fl section, which batch_size follows)."""
  s = base.new_section()
  s.teachers = 10  # Q untrained Xavier teachers labelling the target data (paper 10)
  s.label = "debias"  # new labels: uniform | random | teacher | debias (paper: debias)
  s.debias_scope = "sample"  # debias weight w per sample | one w over the target set (batch)
  s.lam = 10.0  # EWC strength lambda (paper 10); unused by fedaf_c
  s.epochs = 1  # local epochs of the unlearning loss on the target data (paper 1)
  s.min_steps = 10  # >= this many SGD steps per target client (epochs raised to
  #                          ceil(min_steps / steps per epoch)): forgetting that does not
  #                          depend on how many images a client holds (0 = epochs only).
  #                          10 = one epoch of full Fashion-MNIST's class-wide request
  #                          (600 images at batch 64), where lr 0.002 was tuned
  s.max_steps = 200  # forgetting rule: past min_steps, keep taking epochs (up to
  #                          this many steps for the smallest target client) until an
  #                          epoch in which at most stop_acc of a client's target samples
  #                          got their old label; the client then stops. Class requests
  #                          and backdoors only (retraining would not predict those
  #                          labels); 0 = off (min_steps / epochs alone)
  s.stop_acc = 0.02  # the rule's tolerance (argmax = old label, before each step)
  s.fisher = "diag"  # H: diag (empirical Fisher diagonal) | sketch (CountSketch S J)
  s.sketch_width = 50  # t, rows of the CountSketch (memory t * d per client)
  s.fisher_labels = "empirical"  # labels of the Fisher's gradients: empirical (held,
  #                            paper) | model (sampled from p(.|x; theta*): true Fisher)
  s.fisher_data = "local"  # Fisher over all local data (paper, Eq. 7-13) | retain (ablation)
  s.fisher_samples = 1024  # local examples the Fisher is estimated from (0 = all)
  s.fisher_chunk = 64  # examples per per-example-gradient call (memory chunk * d)
  s.lr = 0.002  # unlearning SGD lr; paper: MNIST 0.001
  s.momentum = 0.0  # unlearning SGD momentum (paper: plain SGD)
  s.batch_size = base.linked(fl_cfg, "batch_size")  # unlearning batch size
  s.true_weight = 1.0  # weight of the -CE(f(x), y_old) term (paper 1)
  s.max_old_loss = -1.0  # stop a client once batch CE(y_old) > it (0 = log K; < 0 never)
  s.old_labels = "trained"  # y_old: trained (as held, backdoor flips incl.) | original
  s.recovery_rounds = 0  # FedAvg rounds on retained data after the unlearned update
  return s


RULES = {
  "label": base.one_of(labels.VARIANTS),
  "debias_scope": base.one_of(labels.DEBIAS_SCOPES),
  "fisher": base.one_of(ewc.KINDS),
  "fisher_labels": base.one_of(ewc.FISHER_LABELS),
  "fisher_data": base.one_of(FISHER_DATA),
  "old_labels": base.one_of(base.OLD_LABELS),
  "teachers": base.at_least(1),
  "lam": base.at_least(0),
  "epochs": base.at_least(1),
  "min_steps": base.at_least(0, "0 = off"),
  "max_steps": base.at_least(0, "0 = off"),
  "stop_acc": base.in_range(0, 1),
  "sketch_width": base.at_least(1),
  "fisher_samples": base.at_least(0, "0 = all"),
  "fisher_chunk": base.at_least(1),
  "lr": base.positive(),
  "momentum": base.in_range(0, 1, high_open=True),
  "batch_size": base.at_least(1),
  "recovery_rounds": base.at_least(0),
}


def validate(config):
  base.check_section(config, "fedaf", RULES)


# ---------------------------------------------------------------------------------------
# Memory generator.


def new_labels(task: base.Task, s, clients, y_old) -> jax.Array:
  """float32 [N, max_n, K]: the new label of every target sample of `clients` (zeros
  elsewhere); s: the fedaf section (or a dict with its keys). Teachers of client c come
  from stream key (seed, UNLEARN, FEDAF_ID, 0, c).

  Eq. (3)'s mean over teachers is taken one teacher per `labels.teacher_labels` call: on
  XLA:CPU a conv forward vmapped over teachers becomes a grouped convolution, slower than
  the plain forward repeated.
  """
  k = task.num_classes
  forget = np.asarray(task.forget)
  y_old = np.asarray(y_old)
  out = np.zeros(forget.shape + (k,), np.float32)
  variant = s["label"]
  keys = base.client_keys(task.config.seed, FEDAF_ID, _PART_TEACHERS, clients)
  for c, key in zip(clients, keys):
    rows = np.flatnonzero(forget[c])
    if rows.size == 0:
      continue
    teachers = None
    if variant in ("teacher", "debias"):
      teachers = labels.init_teachers(
        task.model, jax.random.fold_in(key, 0), task.input_shape, s["teachers"], glorot=True
      )
      teachers = [jax.tree.map(lambda a, q=q: a[q : q + 1], teachers) for q in range(s["teachers"])]
    x_c = np.asarray(task.clients.x[int(c)])
    probs = []
    for start in range(0, rows.size, LABEL_CHUNK):
      r = rows[start : start + LABEL_CHUNK]
      xb = x_c[np.concatenate([r, np.full(LABEL_CHUNK - r.size, r[0])])]  # one shape
      if teachers is None:
        yb = labels.teacher_labels(
          None, None, xb, variant=variant, num_classes=k, key=jax.random.fold_in(key, 1 + start)
        )
      else:
        yb = sum(
          labels.teacher_labels(task.apply_fn, t, xb, variant="teacher", num_classes=k)
          for t in teachers
        ) / len(teachers)
      probs.append(np.asarray(yb)[: r.size])
    probs = np.concatenate(probs)
    if variant == "debias":  # over the whole target set at once: scope='batch' sees all
      probs = np.asarray(
        labels.debias(jnp.asarray(probs), jnp.asarray(y_old[c, rows]), scope=s["debias_scope"])
      )
    out[c, rows] = probs
  return jnp.asarray(out)


# ---------------------------------------------------------------------------------------
# Knowledge preserver: the Fisher as a local program over the client's data.


class FisherState(NamedTuple):
  anchor: Any  # theta*
  acc: Any  # sum_i g_i^2 (diag) or S J (sketch, leaves (t,) + shape)
  n: Any  # valid examples summarised


def fisher_program(
  loss_fn: Callable, kind: str, width: int, label_fn: Callable | None = None
) -> fl.LocalProgram:
  """Accumulates the Fisher of a client's batches at theta* (= server params).

  finish -> (acc, n): diag F = acc / n; sketch state (S J = acc, n). Each batch's sketch
  uses the step's own key, so buckets and signs are independent across batches and the sum
  is a CountSketch of all the client's examples (ewc.count_sketch per batch).
  label_fn(theta*, x, key) -> labels replaces the batch's labels (None: the empirical
  Fisher of the labels held); it gets fold_in(step key, LABEL_KEY), independent of the
  sketch's key.
  """
  if kind not in ewc.KINDS:
    raise ValueError(f"Fisher kind {kind!r}: allowed {ewc.KINDS}")

  def init(server_params, extra, key):
    del extra, key
    if kind == "diag":
      acc = optax.tree.zeros_like(server_params)
    else:
      acc = jax.tree.map(lambda p: jnp.zeros((width,) + p.shape, p.dtype), server_params)
    return FisherState(server_params, acc, jnp.zeros((), jnp.float32))

  def step(state, batch, key):
    nb = jnp.sum(batch.mask).astype(jnp.float32)
    y = batch.y
    if label_fn is not None:
      y = label_fn(state.anchor, batch.x, jax.random.fold_in(key, LABEL_KEY))
    if kind == "diag":
      f = ewc.fisher_diagonal(loss_fn, state.anchor, batch.x, y, batch.mask)
      acc = jax.tree.map(lambda a, b: a + b * nb, state.acc, f)
    else:
      acc = optax.tree.add(
        state.acc, ewc.count_sketch(loss_fn, state.anchor, batch.x, y, batch.mask, key, width=width)
      )
    return FisherState(state.anchor, acc, state.n + nb), {}

  return fl.LocalProgram(init, step, lambda s: (s.acc, s.n))


def fisher_mask(task: base.Task, s, clients) -> jax.Array:
  """bool [T, max_n]: the examples each target client's Fisher is estimated from: its
  local data (or retained data), at most fisher_samples of them, uniformly at random."""
  src = task.clients.valid if s["fisher_data"] == "local" else task.retain_valid
  v = np.array(np.asarray(src)[np.asarray(clients)])
  m = s["fisher_samples"]
  if m > 0:
    keys = base.client_keys(task.config.seed, FEDAF_ID, _PART_FISHER_SAMPLE, clients)
    for i, key in enumerate(keys):
      rows = np.flatnonzero(v[i])
      if rows.size > m:
        u = np.asarray(_uniform(key, v.shape[1]))
        keep = rows[np.argsort(u[rows], kind="stable")[:m]]
        v[i] = False
        v[i, keep] = True
  return jnp.asarray(v)


@functools.partial(jax.jit, static_argnums=1)
def _uniform(key, n):
  return jax.random.uniform(key, (n,))


@functools.lru_cache(maxsize=16)
def _client_fisher_program(apply_fn, kind: str, width: int, model_labels: bool):
  # One program object per setting: runners of equal programs share compiled steps
  # (fl.ClientRunner), so K models (an audit's bank) compile the Fisher pass once.
  label_fn = functools.partial(ewc.model_labels, apply_fn) if model_labels else None
  return fisher_program(ewc.example_ce_loss(apply_fn), kind, width, label_fn)


def client_fisher(task: base.Task, env: base.Env, s, params, clients, y_old):
  """Per-target-client EWC curvature at theta* = params, stacked on a leading [T] axis:
  the diagonal Fisher (pytree like params) or (S J, n). Returns (curvature, examples)."""
  # im2col: vmapped per-example conv gradients become batched matmuls, not grouped convs.
  model = models.with_conv_impl(task.model, "im2col")
  apply_fn = models.logits_fn(model)
  program = _client_fisher_program(
    apply_fn, s["fisher"], s["sketch_width"], s["fisher_labels"] == "model"
  )
  valid = fisher_mask(task, s, clients)
  idx = np.asarray(clients)
  data = (task.clients.x[idx], np.asarray(y_old)[idx])  # only the targets' images
  keys = base.client_keys(task.config.seed, FEDAF_ID, _PART_FISHER, clients)
  runner = env.runner(program, 1, s["fisher_chunk"])
  acc, n = runner.run(params, data, valid, None, keys).params
  curv = _mean_fisher(acc, n) if s["fisher"] == "diag" else (acc, n)
  return curv, int(np.asarray(n).sum())


@jax.jit
def _mean_fisher(acc, n):
  """[T, ...] sums of g^2 over n[t] examples -> means (zeros for a client with none)."""
  scale = 1.0 / jnp.maximum(n, 1.0)
  return jax.tree.map(lambda a: a * scale.reshape((-1,) + (1,) * (a.ndim - 1)), acc)


# ---------------------------------------------------------------------------------------
# The unlearning loop (Eq. 13).


class UnlearnState(NamedTuple):
  params: Any
  opt_state: Any
  stopped: Any  # bool: stopped by max_old_loss or the forgetting rule; no further step
  seen: Any  # target samples seen in the current epoch (float32)
  kept: Any  # of those, how many the model gave their old label, before the step
  epochs: Any  # epochs completed (int32)
  n_target: Any  # the client's number of target samples (float32; epoch ends)


class StopRule(NamedTuple):
  """Stop a client at the end of the first epoch, from epoch `min_epochs` on, in which at
  most `acc` of its target samples got their old label (argmax, each measured before its
  batch's step): its data no longer carries the old memory. The client's target count
  n_k comes in its `extra` (epoch ends are where n_k samples have been seen)."""

  min_epochs: int
  acc: float


def unlearn_program(
  apply_fn: Callable,
  optimizer: optax.GradientTransformation,
  *,
  ewc_kind: str | None,
  lam: float,
  width: int,
  true_weight: float = 1.0,
  max_old_loss: float | None = None,
  stop: StopRule | None = None,
) -> fl.LocalProgram:
  """Local steps on L = CE(f(x), y_new) - true_weight CE(f(x), y_old) (Eq. 13), plus the EWC
  penalty's gradient when ewc_kind is 'diag' or 'sketch'. batch.y = (y_new [B, K], y_old [B])
  or (y_new, y_old, counted [B] bool): then only the counted samples enter `stop`'s count of
  old labels kept (the training steps use every sample).
  The client's `extra` is (curvature, n_k, resume): the diagonal Fisher or (S J, n) (None
  without EWC), its number of target samples (read by `stop`), and None or an UnlearnState
  to continue from (a later runner call of the same unlearning; see `run_until_forgotten`).

  max_old_loss: stop the client for good once a batch's CE(f(x), y_old), measured before its
  step, exceeds it (the old memory is at chance level); None = never (the paper).
  stop: the forgetting rule (StopRule); None = run every epoch.
  Metrics: 'loss' (L), 'old_loss', 'old_acc' (fraction given the old label), 'stopped'.
  """

  def loss_fn(params, batch):
    y_new, y_old, *counted = batch.y
    logits = apply_fn(params, batch.x)
    old = losses.masked_ce(logits, y_old, batch.mask)
    hit = (jnp.argmax(logits, -1) == y_old) & batch.mask
    if counted:
      hit = hit & counted[0]
    kept = jnp.sum(hit).astype(jnp.float32)
    return losses.masked_ce(logits, y_new, batch.mask) - true_weight * old, (old, kept)

  if ewc_kind is None:
    chained, opt_init = optimizer, lambda params, curv: optimizer.init(params)
  else:
    chained = optax.chain(ewc.add_ewc_gradient(lam, kind=ewc_kind, width=width), optimizer)

    def opt_init(params, curv):
      if ewc_kind == "diag":
        state = ewc.ewc_state_diag(params, curv)
      else:
        state = ewc.ewc_state_sketch(params, curv[0], curv[1])
      return ewc.set_ewc_state(chained.init(params), state)

  def init(server_params, extra, key):
    del key
    if extra[2] is not None:  # resume the client's state from an earlier runner call
      return extra[2]
    zero = jnp.zeros((), jnp.float32)
    return UnlearnState(
      server_params,
      opt_init(server_params, extra[0]),
      jnp.zeros((), jnp.bool_),
      zero,
      zero,
      jnp.zeros((), jnp.int32),
      jnp.asarray(extra[1], jnp.float32),
    )

  def step(state, batch, key):
    del key
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (old, batch_kept)), grads = grad_fn(state.params, batch)
    halt = state.stopped
    if max_old_loss is not None:
      halt = halt | (old > max_old_loss)
    updates, opt_state = chained.update(grads, state.opt_state, state.params)
    moved = (optax.apply_updates(state.params, updates), opt_state)
    params, opt_state = jax.tree.map(
      lambda a, b: jnp.where(halt, b, a), moved, (state.params, state.opt_state)
    )
    nb = jnp.sum(batch.mask).astype(jnp.float32)
    seen, kept = state.seen + nb, state.kept + batch_kept
    epoch_end = (nb > 0) & (seen >= state.n_target)
    epochs = state.epochs + epoch_end.astype(jnp.int32)
    if stop is not None:  # this step is taken; the following ones are not
      forgotten = epoch_end & (epochs >= stop.min_epochs) & (kept <= stop.acc * seen)
      halt = halt | forgotten
    seen, kept = jnp.where(epoch_end, 0.0, seen), jnp.where(epoch_end, 0.0, kept)
    return (
      UnlearnState(params, opt_state, halt, seen, kept, epochs, state.n_target),
      {
        "loss": loss,
        "old_loss": old,
        "old_acc": batch_kept / jnp.maximum(nb, 1.0),
        "stopped": halt.astype(jnp.float32),
      },
    )

  return fl.LocalProgram(init, step, lambda s: s.params)


@functools.lru_cache(maxsize=16)
def _unlearn_program(
  apply_fn,
  lr: float,
  momentum: float,
  ewc_kind: str | None,
  lam: float,
  width: int,
  true_weight: float,
  max_old_loss: float | None,
  stop: StopRule | None,
):
  # One program object per setting (see _client_fisher_program): the client's Fisher and
  # anchor arrive as runtime state, so nothing per model is compiled in.
  optimizer = optax.sgd(lr, momentum=momentum or None)
  return unlearn_program(
    apply_fn,
    optimizer,
    ewc_kind=ewc_kind,
    lam=lam,
    width=width,
    true_weight=true_weight,
    max_old_loss=max_old_loss,
    stop=stop,
  )


def forgets_labels(task: base.Task) -> bool:
  """Whether a model retrained without the forget data would no longer give it its old
  labels: a class-wide request (the class is gone), or planted backdoor labels (they appear
  nowhere else). Only then is "the old labels are gone" the forgetting rule's target; a
  clean client's or random samples' labels are still predicted after retraining."""
  return task.request.kind == "class" or bool(task.config.backdoor.enabled)


def planted_labels(task: base.Task, y_old) -> np.ndarray | None:
  """bool [N, max_n]: the forget samples whose old label differs from their class, when a
  backdoor planted some forget samples' own class (an all-to-one target); else None (every
  old label is one retraining would not predict)."""
  if not task.config.backdoor.enabled:
    return None
  differs = np.asarray(y_old) != np.asarray(task.y_true)
  forget = np.asarray(task.forget)
  return differs if np.any(forget & ~differs) else None


def run_until_forgotten(
  task: base.Task,
  env: base.Env,
  program: fl.LocalProgram,
  params,
  *,
  y,
  targets,
  counts,
  curv,
  keys,
  chunk_epochs: int,
  max_epochs: int,
  batch_size: int,
):
  """The unlearning loop on the target clients' forget samples, `chunk_epochs` epochs per
  runner call, each call resuming the clients' states, until every client has stopped
  (StopRule) or `max_epochs` are done. Returns (aggregated params, example-weighted metric
  means, epochs run). With max_epochs == chunk_epochs: one call, keys as given."""
  idx = np.asarray(targets)
  take = lambda a: np.asarray(a)[idx]
  valid = take(task.forget)
  data = (task.clients.x[idx], jax.tree.map(take, y))
  runner = env.runner(program, chunk_epochs, batch_size)
  state, sums, done, call = None, {}, 0, 0
  while done < max_epochs:
    k = keys if call == 0 else jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, call)
    res = runner.run(params, data, valid, (curv, counts, state), k)
    state, done, call = res.state, done + chunk_epochs, call + 1
    for name, m in res.metrics.items():
      sums[name] = sums.get(name, 0.0) + np.asarray(m, np.float64)
    if np.all(np.asarray(state.stopped) | (counts == 0)):
      break
  w = counts / max(float(counts.sum()), 1.0)
  metrics = {name: float(np.sum(m / call * w)) for name, m in sums.items()}
  return base.apply_mean_delta(params, res.params, counts), metrics, done


def _unlearn(
  task: base.Task, env: base.Env, trained: base.Trained, *, use_ewc: bool
) -> base.Outcome:
  cfg = task.config
  s = cfg.fedaf
  name = "fedaf" if use_ewc else "fedaf_c"
  if use_ewc and s["fisher_data"] == "retain" and task.request.kind == "client":
    raise ValueError(
      "fedaf.fisher_data='retain' needs retained local data; a client "
      "request leaves the target client none (use 'local')"
    )
  targets = base.target_clients(task)
  y_old = base.old_labels(task, s["old_labels"])
  ewc_kind = s["fisher"] if use_ewc else None
  max_old_loss = base.loss_bound(s["max_old_loss"], task.num_classes)
  keys = base.client_keys(cfg.seed, FEDAF_ID, _PART_UNLEARN, targets)
  floor = base.budget_epochs(task, targets, s["epochs"], s["min_steps"], s["batch_size"])
  epochs = floor  # the cap, in whole chunks of `floor` epochs (run_until_forgotten)
  if forgets_labels(task):
    cap = base.budget_epochs(task, targets, 1, s["max_steps"], s["batch_size"])
    epochs = floor * max(1, math.ceil(cap / floor))
  stop = StopRule(floor, s["stop_acc"]) if epochs > floor else None
  program = _unlearn_program(
    task.apply_fn,
    s["lr"],
    s["momentum"],
    ewc_kind,
    s["lam"],
    s["sketch_width"],
    s["true_weight"],
    max_old_loss,
    stop,
  )
  counts = np.asarray(task.forget)[np.asarray(targets)].sum(axis=1).astype(np.float32)
  counted = planted_labels(task, y_old) if stop is not None else None

  def round_fn(params, r):
    del r
    y_new = new_labels(task, s, targets, y_old)
    curv, fisher_examples = None, 0
    if use_ewc:
      curv, fisher_examples = client_fisher(task, env, s, params, targets, y_old)
    new, metrics, done = run_until_forgotten(
      task,
      env,
      program,
      params,
      y=(y_new, y_old) if counted is None else (y_new, y_old, counted),
      targets=targets,
      counts=counts,
      curv=curv,
      keys=keys,
      chunk_epochs=floor,
      max_epochs=epochs,
      batch_size=s["batch_size"],
    )
    m = fl.round_cost(counts, counts, model_bytes=tu.tree_num_bytes(params), epochs=done)
    m["examples"] += fisher_examples
    # Reported as round metrics so they survive a resume (base.Env.round_metrics).
    return new, dict(m, **metrics, fisher_examples=fisher_examples, epochs_run=done)

  params = env.rounds(name, trained.params, 1, round_fn, lambda p: p)
  info = base.last_round_metrics(env, name)  # restored with the round on a resume
  params = base.recover(task, env, name + "_recovery", params, s["recovery_rounds"])
  d = tu.tree_num_bytes(trained.params)
  results = {
    f"{name}_target_clients": [int(c) for c in targets],
    f"{name}_target_examples": int(np.asarray(task.forget).sum()),
    f"{name}_label": s["label"],
    f"{name}_epochs": epochs,
    f"{name}_min_epochs": floor,
  }
  if use_ewc:
    results[f"{name}_fisher"] = s["fisher"]
    results[f"{name}_fisher_labels"] = s["fisher_labels"]
    # Curvature held by each target client: d floats (diag) or t * d (sketch).
    results[f"{name}_curvature_bytes"] = d * (1 if s["fisher"] == "diag" else s["sketch_width"])
  if "loss" in info:  # absent from checkpoints written before round metrics were kept
    results[f"{name}_unlearn_loss"] = info["loss"]
    results[f"{name}_stopped_fraction"] = info["stopped"]
    results[f"{name}_old_acc"] = info["old_acc"]
    results[f"{name}_epochs_run"] = info["epochs_run"]
    if use_ewc:
      results[f"{name}_fisher_examples"] = info["fisher_examples"]
  return base.Outcome(params, results)


SECTION = base.Section("fedaf", config_section, validate)  # fedaf, fedaf_c

METHODS = {
  "fedaf": base.Method(
    "fedaf",
    base.REQUEST_KINDS,
    base.FEDAVG,
    lambda t, e, tr: _unlearn(t, e, tr, use_ewc=True),
    section=SECTION,
    streams=(FEDAF_ID,),
  ),
  "fedaf_c": base.Method(
    "fedaf_c",
    base.REQUEST_KINDS,
    base.FEDAVG,
    lambda t, e, tr: _unlearn(t, e, tr, use_ewc=False),
    section=SECTION,
    streams=(FEDAF_ID,),
  ),
}
