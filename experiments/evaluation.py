"""Evaluation of a model on its task: test metrics named per request kind, metrics on the
forgotten samples, membership inference and relearn time (docs/design.md §6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import task as task_lib
from fu_jax import fl, models
from fu_jax import losses as losses_lib
from fu_jax.methods import base
from fu_jax.metrics import accuracy as acc_lib
from fu_jax.metrics import backdoor as bd_lib
from fu_jax.metrics import mia as mia_lib
from fu_jax.metrics import relearn as relearn_lib

# Which results.json metric measures forgetting and which utility, per request kind (the
# README's metric table). Every kind also reports bd_acc when a backdoor is planted and
# the membership-inference scores (mia_*) as further forgetting measures.
#   class         forget_acc: test accuracy of the forgotten classes (retrain ~0);
#                 retain_acc: test accuracy of the other classes.
#   client_class  forget_train_acc: accuracy on the forgotten training samples (the
#                 class's other holders keep it, so its test accuracy must stay high:
#                 class_acc, a utility); retain_acc: test accuracy of every class.
#   client        forget_train_acc; retain_acc: test accuracy of every class.
#   samples       (individual training samples) as client.
METRICS_BY_KIND = {
  "class": ("forget_acc", "retain_acc"),
  "client_class": ("forget_train_acc", "retain_acc"),
  "client": ("forget_train_acc", "retain_acc"),
  "samples": ("forget_train_acc", "retain_acc"),
}


def metric_names(kind: str) -> tuple[str, str]:
  """(forgetting metric, utility metric) of a request kind: see METRICS_BY_KIND."""
  if kind not in METRICS_BY_KIND:
    raise base.ConfigError(
      f"unlearn.kind={kind!r}: no metric is defined for it; allowed {tuple(METRICS_BY_KIND)}"
    )
  return METRICS_BY_KIND[kind]


def forgotten_records(task: base.Task):
  """The forgotten training samples as they were trained on: (x, y, source class).

  x as the client holds it (with the trigger when a backdoor was planted) and y the label
  trained on (the flipped one under a backdoor; the true label otherwise); source = the
  true label. These are the records whose influence unlearning must remove: their clean
  originals were never in the training set, and scoring them cannot tell the trained model
  from retrain (BUILD.md, "What the evaluation measures").
  """
  forget = np.asarray(task.forget)
  return (
    np.asarray(task.clients.x[forget]),
    np.asarray(task.clients.y)[forget],
    np.asarray(task.y_true)[forget],
  )


def evaluate(task: base.Task, params, forgotten_classes=None) -> dict:
  """Test metrics of a model, named per request kind (METRICS_BY_KIND, the README table).

    test_acc          all test samples.
    retain_acc        test samples of the classes that must survive: for a class request
                      all but the forgotten classes; for client_class and client every
                      class (other clients keep the class).
    forget_acc        class requests: test accuracy of the forgotten classes; null for
                      client_class and client (no class is forgotten everywhere).
    class_acc         client_class: test accuracy of the request's classes (utility).
    forget_train_acc  accuracy on the forgotten training samples as trained on
                      (forgotten_records: triggered images and flipped labels under a
                      backdoor), so it means "still reproduces the forgotten data" in every
                      setting; retrain's value is the reference.
    bd_acc            backdoor.enabled: triggered test images of the source class predicted
                      as the flipped label.

  forgotten_classes: the classes forgotten class-wide by the end of the method (default
  the request's; e.g. a QuickDrop sequence forgets more).
  """
  ds = task.dataset
  cfg = task.config
  kind = task.request.kind
  if forgotten_classes is None:
    forgotten_classes = task.request.classes
  wide = tuple(forgotten_classes) if kind == "class" else ()
  out = acc_lib.evaluate(task.apply_fn, params, ds.x_test, ds.y_test, task.num_classes, wide)
  if kind == "client_class":
    rows = np.isin(ds.y_test, np.asarray(task.request.classes))
    per_class = np.nan_to_num(np.asarray(out["per_class_acc"], np.float64))
    n = np.bincount(np.asarray(ds.y_test)[rows], minlength=task.num_classes)
    out["class_acc"] = float(np.sum(per_class * n) / max(n.sum(), 1))
  x_f, y_f, _ = forgotten_records(task)
  logits = acc_lib.predict_logits(task.apply_fn, params, x_f)
  out["forget_train_acc"] = acc_lib.accuracy(logits, y_f)
  if cfg.backdoor.enabled:
    src = task.request.classes[0] if task.request.classes else None
    out["bd_acc"] = bd_lib.backdoor_accuracy(
      task.apply_fn,
      params,
      ds.x_test,
      ds.y_test,
      src,
      task_lib.backdoor_trigger(cfg, ds),
      task_lib.backdoor_flip(cfg),
      num_classes=task.num_classes,
    )
  return out


def sample_metrics(task: base.Task, params) -> dict:
  """Accuracy and mean loss on the forgotten training samples (their original labels) and
  on held-out samples of the same classes (every test row of a class among theirs): after
  a perfect sample-wise unlearning the two sides look alike, as under retraining."""
  ds = task.dataset
  forget = np.asarray(task.forget)
  x_f = np.asarray(task.clients.x[forget])  # only the forgotten rows' images
  y_f = np.asarray(task.y_true)[forget]
  held = np.isin(ds.y_test, np.unique(y_f))
  lf = acc_lib.predict_logits(task.apply_fn, params, x_f)
  lh = acc_lib.predict_logits(task.apply_fn, params, ds.x_test[held])
  return {
    "forget_train_loss": float(np.mean(acc_lib.loss_from_logits(lf, y_f))),
    "heldout_acc": acc_lib.accuracy(lh, ds.y_test[held]),
    "heldout_loss": float(np.mean(acc_lib.loss_from_logits(lh, ds.y_test[held]))),
  }


def membership_scores(task: base.Task, params) -> dict:
  """MIA: the forgotten training samples (members) vs held-out samples of the same classes.

  Members are the records as trained on (forgotten_records); non-members are made the same
  way from held-out data, so the attacker can only separate members from non-members, not
  triggered from clean images: the test rows of the members' source classes, with the
  trigger planted and the label flipped when a backdoor was planted (their clean
  originals and true labels otherwise). Under a backdoor the question answered is thus
  "was this triggered record trained on"; the backdoor's own strength is bd_acc.

  The test set is split in two by position: odd rows are the non-members; even rows form
  the shadow models' pool, so no attacker trains on the non-members it is scored against.
  """
  ds, cfg = task.dataset, task.config
  x_m, y_m, src = forgotten_records(task)
  odd = np.arange(len(ds.y_test)) % 2 == 1
  held = odd & np.isin(ds.y_test, np.unique(src))
  x_o, y_o = ds.x_test[held], ds.y_test[held]
  if cfg.backdoor.enabled:
    x_o = bd_lib.apply_trigger(x_o, task_lib.backdoor_trigger(cfg, ds))
    y_o = bd_lib.flip_labels(y_o, task_lib.backdoor_flip(cfg), task.num_classes)
  out = mia_lib.membership_inference(task.apply_fn, params, x_m, y_m, x_o, y_o, seed=cfg.seed)
  if cfg.mia.shadows > 0:
    pool = np.flatnonzero(~odd)[: cfg.mia.shadow_pool]
    out.update(
      mia_lib.shadow_attack(
        _shadow_train_fn(task),
        task.apply_fn,
        params,
        ds.x_test[pool],
        ds.y_test[pool],
        x_m,
        y_m,
        x_o,
        y_o,
        num_shadows=cfg.mia.shadows,
        key=fl.stream_key(cfg.seed, fl.STREAM_EVAL),
        vectorize=_vectorize_shadows(cfg),
      )
    )
  return out


RELEARN_ID = 1  # fold_in ids under fl.STREAM_EVAL
RELEARN_MIX_ID = 2


def relearn_fields(task: base.Task, original_forget_acc: float, params) -> dict:
  """relearn_steps_to_recover when eval.relearn_steps > 0: central SGD steps (client lr,
  momentum and batch size) on the forgotten training samples, with the labels they were
  trained with, until their accuracy reaches half the original model's on the same samples;
  capped at the budget (relearn_capped = True).

  eval.relearn_retained = r > 0 mixes round(r * n) retained training samples (drawn without
  replacement, key RELEARN_MIX_ID) into the n forgotten ones; accuracy is still measured on
  the forgotten ones. A class request's forgotten samples share one label, so fine-tuning on
  them alone recovers in one step for every model that forgot (BUILD.md); with the retained
  samples mixed in the class must be told apart again. The forgotten-only count is then
  reported too (relearn_forgotten_only_steps, relearn_forgotten_only_capped)."""
  cfg = task.config
  budget = int(cfg.eval.relearn_steps)
  if budget <= 0:
    return {}
  # The original model's accuracy on these records is its evaluation's forget_train_acc.
  x, y, _ = forgotten_records(task)
  kw = dict(
    target=0.5 * original_forget_acc,
    max_steps=budget,
    lr=cfg.fl.client_lr,
    momentum=cfg.fl.client_momentum,
    batch_size=cfg.fl.batch_size,
    key=fl.stream_key(cfg.seed, fl.STREAM_EVAL, RELEARN_ID),
  )
  only = relearn_lib.relearn_steps(task.apply_fn, params, x, y, **kw)
  out = {}
  ratio = float(cfg.eval.relearn_retained)
  if ratio > 0:
    rows, cols = np.nonzero(np.asarray(task.retain_valid))
    m = min(len(rows), int(round(ratio * len(y))))
    pick = np.sort(
      np.asarray(
        jax.random.permutation(fl.stream_key(cfg.seed, fl.STREAM_EVAL, RELEARN_MIX_ID), len(rows))
      )[:m]
    )
    xr = np.asarray(task.clients.x[rows[pick], cols[pick]])
    yr = np.asarray(task.clients.y)[rows[pick], cols[pick]]
    score = np.concatenate([np.ones(len(y), bool), np.zeros(m, bool)])
    r = relearn_lib.relearn_steps(
      task.apply_fn, params, np.concatenate([x, xr]), np.concatenate([y, yr]), score=score, **kw
    )
    out = {
      "relearn_forgotten_only_steps": only.steps,
      "relearn_forgotten_only_capped": not only.reached,
      "relearn_retained_rows": m,
    }
  else:
    r = only
  return {
    "relearn_steps_to_recover": r.steps,
    "relearn_capped": not r.reached,
    "relearn_target_acc": r.target,
    "relearn_start_acc": r.start_acc,
    **out,
  }


def _vectorize_shadows(cfg) -> bool:
  # Same trade-off as the client runners: vmapped conv training is slow on XLA:CPU.
  return fl.choose_runner(cfg.model.name) != "loop"


def _shadow_train_fn(task: base.Task):
  """The target's recipe, centralised: mia.shadow_epochs epochs of the client optimiser
  over the rows where mask is True (a pure function, vmappable over shadows)."""
  cfg = task.config
  opt = base.client_optimizer(cfg)
  bs = cfg.fl.batch_size
  # XLA's own conv backward inside lax.scan is ~20x slower on XLA:CPU (fu_jax/models.py),
  # which made the shadow fits dominate a run.
  model = models.with_conv_impl(task.model, "canonical")

  def loss_fn(p, batch):
    return losses_lib.masked_ce(models.logits_fn(model)(p, batch.x), batch.y, batch.mask)

  def train_fn(key, x, y, mask):
    params = models.init_params(task.model, key, task.input_shape)
    n_steps = fl.steps_per_epoch(x.shape[0] // 2, bs)  # shadows train on half the pool

    def epoch(state, e):
      order = fl.epoch_order(jax.random.fold_in(key, e), mask)

      def step(state, s):
        p, o = state
        g = jax.grad(loss_fn)(p, fl.take_batch((x, y), mask, order, s, bs))
        u, o = opt.update(g, o, p)
        return (optax.apply_updates(p, u), o), None

      return jax.lax.scan(step, state, jnp.arange(n_steps))[0], None

    state = (params, opt.init(params))
    return jax.lax.scan(epoch, state, jnp.arange(cfg.mia.shadow_epochs))[0][0]

  return train_fn if _vectorize_shadows(cfg) else jax.jit(train_fn)
