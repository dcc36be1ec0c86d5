"""FRR, federated rapid retraining with a diagonal empirical-Fisher quasi-Newton update.

Liu, Xu, Yuan, Wang, Li, "The Right to be Forgotten in Federated Learning: An Efficient
Realization with Rapid Retraining", INFOCOM 2022. Method `frr`.

The paper's protocol (our default): after the forgotten samples are deleted, the global
model is re-initialised and every client retrains on its remaining data D_k^u in ordinary
FedAvg rounds (the forgotten client of a client request weighted 0), with a Newton-type
local optimizer: from the first-order expansion
grad F(w^u) ~ grad F(w) + H (w^u - w) = 0 the step is H^{-1} grad F, with the Hessian H
replaced by the diagonal empirical Fisher of the mini-batch,

    g   = (1/|B|) sum_{i in B} grad l_i(w)          F = (1/|B|) sum_{i in B} grad l_i(w)^2

and, as the paper does to "alleviate the error caused by the approximation", momentum on
both (beta1 = 0.9, beta2 = 0.999 in the paper, eta = 0.001):

    m <- beta1 m + (1 - beta1) g                     v <- beta2 v + (1 - beta2) F^2
    w <- w - eta * m^ / (sqrt(v^) + eps)             (^: bias-corrected, step count t)

so sqrt(v^) tracks F itself and the step is m^ / F (the Newton direction), not Adam's
m^ / sqrt(second moment). With beta1 = beta2 = 0 it is w <- w - eta g / (F + eps).
The server averages the clients' models weighted by their retained example counts.

Choices the paper leaves open, and ours:
  * Rounds: `frr.rounds` follows fl.rounds (retraining's) unless set. The paper claims the
    rapid-retraining optimizer reaches retraining's accuracy in fewer rounds; against our
    FedAvg retraining (SGD, momentum 0.9) it does not on digits (CNN, 10 IID clients, 20
    rounds, forget class 0; 2 seeds, test accuracy gap to retrain): 1/2 of the rounds
    -3.9 points, 3/4 -1.7, all of them 0.0. The default is the smallest simple fraction
    within about a point of retrain, 1, so FRR costs about what retraining does (a little
    more: per-example gradients). Set frr.rounds to trade accuracy for time.
  * eta: the paper's 0.001 works from scratch here and is the best of those tried
    (0.0003 a point lower after 20 rounds, 0.003 three points lower, 0.01 diverges).
  * Starting point: `init='scratch'` (default) is the paper's re-initialised global model;
    `init='trained'` is our variant, a fine-tuning reading of the Taylor expansion (taken
    around the FL model w*): it retrains from w* instead (result tables name it
    "frr (init=trained, variant)"). From w* the retained classes start learned, but the
    forgotten class is only unlearned as far as the rounds overwrite it.
  * eps (not given in the paper) damps directions the retained data do not excite: the
    largest step a coordinate can take is eta / (2 sqrt(eps)) (F >= g^2). 1e-4 is the best
    tried from scratch (1e-6 is 7 points lower after 20 rounds, 1e-8 diverges).
  * Block size: the paper's complexity analysis mentions a block-diagonal Fisher (b = 3)
    but its update uses the diagonal; we use the exact per-parameter diagonal.
  * Batch size B: the training's (fl.batch_size); the paper sweeps 128..2048.
  * The momentum state is local to a client and round (reset every round, as the other
    local optimizers here).
  * Per-example gradients use the model's own convolution (`frr.conv_impl='model'`), so
    FRR is timed on the same convolution as the retraining it is compared with;
    'im2col' takes them as matmuls (same parameters and outputs; vmapped per-example conv
    gradients run far faster so on XLA:CPU, which would make a speed-up over retrain
    measure im2col against XLA's convolution).

Serves every request kind in FRR_KINDS that the experiment defines (base.REQUEST_KINDS):
it only needs the retained data.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import ewc, fl, models
from fu_jax.methods import base

INITS = ("trained", "scratch")
CONV_IMPLS = ("im2col", "model")
FRR_KINDS = ("class", "client_class", "client", "samples")


def config_section(fl_cfg):
  """The `frr` section (`fl_cfg`: the config's fl section, which rounds and local_epochs
  follow)."""
  s = base.new_section()
  s.init = "scratch"  # a fresh init (the paper) | trained (variant: fine-tune the FL model)
  s.rounds = base.linked(fl_cfg, "rounds")  # FedAvg rounds of rapid retraining
  s.local_epochs = base.linked(fl_cfg, "local_epochs")  # local epochs per round
  s.lr = 0.001  # eta (paper 0.001)
  s.beta1 = 0.9  # momentum of the gradient (paper 0.9)
  s.beta2 = 0.999  # momentum of the squared diagonal Fisher (paper 0.999)
  s.eps = 1e-4  # damping added to the Fisher before dividing (not in the paper)
  s.conv_impl = "model"  # per-example gradients: model (the model's own convolution, as
  #                         retrain's steps) | im2col (faster per-example grads on CPU)
  return s


RULES = {
  "init": base.one_of(INITS),
  "rounds": base.at_least(1),
  "local_epochs": base.at_least(1),
  "lr": base.positive(),
  "beta1": base.in_range(0, 1, high_open=True),
  "beta2": base.in_range(0, 1, high_open=True),
  "eps": base.positive(),
  "conv_impl": base.one_of(CONV_IMPLS),
}


def validate(config):
  base.check_section(config, "frr", RULES)


class FrrState(NamedTuple):
  params: Any
  m: Any  # first moment of the gradient
  v: Any  # second moment of the diagonal Fisher (EMA of F^2)
  t: Any  # int32 steps taken


def frr_direction(grads, fisher, state_m, state_v, t, *, beta1: float, beta2: float, eps: float):
  """(update direction m^ / (sqrt(v^) + eps), m, v) after step t (1-based)."""
  m = jax.tree.map(lambda a, g: beta1 * a + (1 - beta1) * g, state_m, grads)
  v = jax.tree.map(lambda a, f: beta2 * a + (1 - beta2) * f * f, state_v, fisher)
  c1 = 1 - beta1**t
  c2 = 1 - beta2**t
  d = jax.tree.map(lambda a, b: (a / c1) / (jnp.sqrt(b / c2) + eps), m, v)
  return d, m, v


def frr_program(
  model, *, lr: float, beta1: float, beta2: float, eps: float, conv_impl: str = "model"
) -> fl.LocalProgram:
  """Local rapid-retraining steps (see the module docstring) as a LocalProgram.

  model: the flax module; its per-example gradients are taken with the module as given
    (conv_impl='model'), or with its convolutions as im2col matmuls (conv_impl='im2col').
  Metrics: 'loss' (masked CE of the batch before the step).
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={conv_impl!r}: allowed {CONV_IMPLS}")
  grad_model = model if conv_impl == "model" else models.with_conv_impl(model, "im2col")
  loss_fn = ewc.example_ce_loss(models.logits_fn(grad_model))
  value_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))

  def init(server_params, extra, key):
    del extra, key
    z = optax.tree.zeros_like(server_params)
    return FrrState(server_params, z, z, jnp.zeros((), jnp.int32))

  def step(state, batch, key):
    del key
    losses_i, g_i = value_grad(state.params, batch.x, batch.y)
    w = batch.mask.astype(jnp.float32)
    w = w / jnp.maximum(jnp.sum(w), 1.0)
    expand = lambda a: w.reshape((-1,) + (1,) * (a.ndim - 1))
    g = jax.tree.map(lambda a: jnp.sum(expand(a) * a, axis=0), g_i)
    f = jax.tree.map(lambda a: jnp.sum(expand(a) * a * a, axis=0), g_i)
    t = state.t + 1
    d, m, v = frr_direction(
      g, f, state.m, state.v, t.astype(jnp.float32), beta1=beta1, beta2=beta2, eps=eps
    )
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, d)
    return FrrState(params, m, v, t), {"loss": jnp.sum(w * losses_i)}

  return fl.LocalProgram(init, step, lambda s: s.params)


def _unlearn(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  cfg = task.config
  s = cfg.frr
  program = frr_program(
    task.model, lr=s.lr, beta1=s.beta1, beta2=s.beta2, eps=s.eps, conv_impl=s.conv_impl
  )
  if s.init == "trained":
    params, offset = trained.params, cfg.fl.rounds
  else:
    params, offset = base.init_params(task), 0
  params = base.fedavg_phase(
    task,
    env,
    "frr",
    params,
    s.rounds,
    valid=task.retain_valid,
    client_weights=task.client_weights,
    program=program,
    epochs=s.local_epochs,
    round_offset=offset,
  )
  # Each client keeps 2 extra model-sized moments (m, v) while training.
  results = {
    "frr_init": s.init,
    "frr_rounds": s.rounds,
    "frr_retained_examples": int(np.asarray(task.retain_valid).sum()),
  }
  return base.Outcome(params, results)


def kinds() -> tuple:
  """The request kinds FRR serves among those the experiment defines."""
  return tuple(k for k in base.REQUEST_KINDS if k in FRR_KINDS)


SECTION = base.Section("frr", config_section, validate)
METHODS = {"frr": base.Method("frr", kinds(), base.FEDAVG, _unlearn, section=SECTION)}
