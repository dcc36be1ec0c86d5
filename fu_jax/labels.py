"""FedAF memory generator: knowledge-free labels for the data to forget.

FedAF (Class-wise Federated Unlearning: Harnessing Active Forgetting with Teacher-Student
Memory Generation, §4.2) overwrites old memories by training the target client on its own
target features paired with new, knowledge-free labels. Four label kinds are ablated (§5.3):

  uniform  y = 1/K for every class.
  random   y ~ Dirichlet(1, ..., 1) per example: the uniform distribution on the simplex,
           which for K = 2 is exactly the paper's [r, 1 - r] with r ~ U(0, 1).
  teacher  Eq. (3): y = (1/Q) sum_q softmax(f(x; theta_q)) over Q untrained teachers of the
           same architecture (Xavier-initialised, §5.1.2; Q = 10 in the paper).
  debias   Eq. (4): the teacher label with the target component divided by a propensity
           weight w and renormalised by its L1 norm,
               y_db = normalise(y_teacher / (1 + (w - 1) onehot(target))),
           w = p_target / mean_k p_k ("the quotient of the target prediction weight and the
           average prediction weight"). Per example, mean_k p_k = 1/K, so before
           renormalising the target component becomes exactly 1/K: the untrained models'
           bias toward (or against) the target class is replaced by the average weight, and
           every other class keeps its teacher weight.
           The paper does not say whether the "average" is per example or over the target
           set; `debias_scope='sample'` (default) uses each example's own prediction,
           `'batch'` one w = K * mean_b p_{b,target} for the whole (masked) batch, which
           removes the teachers' systematic class bias but keeps per-example variation.
           (The equation bodies are not recoverable from the paper's text; this follows the
           prose around Eq. 4, docs/design.md §5.) Note that only the target component
           moves: if the other components are all below 1/K the target can remain the
           debiased label's argmax.

The unlearning objective (Eq. 13) is `forgetting_loss` below plus the EWC penalty in
`fu_jax.ewc`.

Everything here is a pure function of its inputs and PRNG keys, and jittable with `variant`
and `debias_scope` static.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fu_jax import losses

__all__ = [
  "VARIANTS",
  "DEBIAS_SCOPES",
  "glorot_reinit",
  "init_teachers",
  "teacher_probs",
  "debias",
  "random_labels",
  "teacher_labels",
  "forgetting_loss",
]

VARIANTS = ("uniform", "random", "teacher", "debias")
DEBIAS_SCOPES = ("sample", "batch")


def glorot_reinit(params, key):
  """Re-draws every kernel (leaf with ndim >= 2) from Xavier/Glorot uniform.

  U(-a, a), a = sqrt(6 / (fan_in + fan_out)), with Flax's fan convention (input axis -2,
  output axis -1, the remaining axes are the receptive field), which matches PyTorch's
  `xavier_uniform_` for Linear and Conv weights. FedAF initialises all models with Xavier
  (Glorot & Bengio 2010) whereas Flax's default kernel init is LeCun normal. Biases and norm
  parameters (ndim < 2) are kept as the module initialised them (zeros / ones).

  Leaf i (in tree-flatten order) uses `fold_in(key, i)`, so the result is a pure function of
  `key` and the tree structure.
  """
  init = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1)
  leaves, treedef = jax.tree.flatten(params)
  new = [
    init(jax.random.fold_in(key, i), x.shape, x.dtype) if x.ndim >= 2 else x
    for i, x in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, new)


def init_teachers(
  module, key, input_shape: Sequence[int], num_teachers: int, *, glorot: bool = True
):
  """Q untrained teacher models, parameters stacked on a leading axis of size Q.

  Args:
    module: a Flax linen module (no mutable collections).
    key: PRNG key; teacher q uses `split(key, Q)[q]`.
    input_shape: shape of ONE example, without the batch axis (e.g. (28, 28, 1)).
    num_teachers: Q >= 1.
    glorot: re-initialise kernels with Xavier uniform (the paper's choice); False keeps
      the module's own initialisers.

  Returns:
    params pytree whose every leaf has shape (Q,) + leaf.shape.
  """
  if int(num_teachers) < 1:
    raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
  return _init_stacked(
    module, key, tuple(int(d) for d in input_shape), int(num_teachers), bool(glorot)
  )


# Jitted with the (hashable) module static: one cached program per architecture instead of
# dozens of eagerly compiled ops; inlined when called under an outer jit.
@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _init_stacked(module, key, input_shape, num_teachers, glorot):
  dummy = jnp.zeros((1,) + input_shape, jnp.float32)

  def one(k):
    k_init, k_glorot = jax.random.split(k)
    params = module.init(k_init, dummy)["params"]
    return glorot_reinit(params, k_glorot) if glorot else params

  # lax.map, not vmap: same result, and XLA:CPU compiles the batched PRNG of a vmapped init
  # about 3x slower (measured); init runs once per request, so its run time is irrelevant.
  return jax.lax.map(one, jax.random.split(key, num_teachers))


def teacher_probs(apply_fn: Callable[..., Any], teacher_params_stacked, x):
  """Eq. (3): mean over the Q teachers of softmax(f(x; theta_q)); vmapped over teachers.

  apply_fn(params, x) -> logits [B, K].
  Returns float32 [B, K].
  """

  def probs(p):
    return jax.nn.softmax(apply_fn(p, x).astype(jnp.float32), axis=-1)

  return jnp.mean(jax.vmap(probs)(teacher_params_stacked), axis=0)


def debias(probs, target_class, *, scope: str = "sample", mask=None):
  """Eq. (4): divide the target component by w = p_target / mean_k p_k, renormalise to 1.

  Args:
    probs: float [B, K] teacher labels (rows sum to 1).
    target_class: int scalar or int [B] (the example's original label, Eq. 4's y).
    scope: 'sample' (w per example) or 'batch' (one w from the masked batch means).
    mask: optional bool [B]; only used by scope='batch' (padding never changes w).

  Returns:
    float [B, K]. With scope='sample' the pre-normalisation target component equals
    mean_k p_k (= 1/K) exactly: y_db = normalise(p with p_target replaced by 1/K).
  """
  if scope not in DEBIAS_SCOPES:
    raise ValueError(f"unknown debias scope {scope!r}; allowed: {', '.join(DEBIAS_SCOPES)}")
  probs = probs.astype(jnp.float32)
  b, k = probs.shape
  onehot = jax.nn.one_hot(jnp.broadcast_to(target_class, (b,)), k, dtype=jnp.bool_)
  p_t = jnp.sum(jnp.where(onehot, probs, 0.0), axis=-1)
  mean_p = jnp.mean(probs, axis=-1)
  if scope == "sample":
    # p_t / w = p_t / (p_t / mean_p) = mean_p; written directly so p_t -> 0 stays finite.
    new_t = mean_p
  else:
    valid = jnp.ones((b,), jnp.bool_) if mask is None else mask.astype(jnp.bool_)
    w = losses.masked_mean(p_t, valid) / losses.masked_mean(mean_p, valid)
    new_t = p_t / jnp.maximum(w, jnp.finfo(jnp.float32).tiny)
  q = jnp.where(onehot, new_t[:, None], probs)
  return q / jnp.sum(q, axis=-1, keepdims=True)


def random_labels(key, batch_size: int, num_classes: int):
  """Dirichlet(1,...,1) label per row, float32 [B, K].

  Sampled as normalised Exp(1) draws (Gamma(1) = Exp(1)), which is exactly Dirichlet(1)
  and avoids the gamma sampler's rejection loop. Row i uses fold_in(key, i), so padding
  rows appended at the end never change the labels of the real rows."""

  def one(i):
    e = jax.random.exponential(jax.random.fold_in(key, i), (num_classes,), jnp.float32)
    return e / jnp.sum(e)

  return jax.vmap(one)(jnp.arange(batch_size))


def teacher_labels(
  apply_fn: Callable[..., Any] | None,
  teacher_params_stacked,
  x,
  *,
  variant: str,
  target_class=None,
  num_classes: int | None = None,
  key=None,
  mask=None,
  debias_scope: str = "sample",
):
  """New (knowledge-free) labels for the target data x: float32 [B, K], rows sum to 1.

  Args:
    apply_fn: (params, x) -> logits, hashable (a jit static argument: pass the same
      function, e.g. fu_jax.models.logits_fn(module), to avoid recompiling); unused by
      'uniform' / 'random' (may be None there).
    teacher_params_stacked: output of `init_teachers` (leading teacher axis); unused by
      'uniform' / 'random'.
    x: [B, ...] target features.
    variant: one of 'uniform', 'random', 'teacher', 'debias' (static).
    target_class: int scalar or int [B]; required by 'debias'.
    num_classes: K; required by 'uniform' and 'random' (checked against the logits
      otherwise when given).
    key: PRNG key; required by 'random'.
    mask: optional bool [B]; used by debias_scope='batch'.
    debias_scope: 'sample' | 'batch', see `debias`.

  Raises:
    ValueError: unknown variant, or a required argument missing.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from fu_jax import labels, models
    >>> module = nn.Dense(4)                              # a 4-class model on 3 features
    >>> teachers = labels.init_teachers(module, jax.random.key(0), (3,), num_teachers=5)
    >>> x = jax.random.normal(jax.random.key(1), (2, 3))
    >>> y = labels.teacher_labels(models.logits_fn(module), teachers, x, variant='debias',
    ...                           target_class=1)
    >>> print(y.shape, jnp.allclose(y.sum(axis=1), 1.0))
    (2, 4) True
    >>> print(labels.teacher_labels(None, None, x, variant='uniform', num_classes=4)[0])
    [0.25 0.25 0.25 0.25]
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown label variant {variant!r}; allowed: {', '.join(VARIANTS)}")
  if variant in ("uniform", "random") and num_classes is None:
    raise ValueError(f"variant {variant!r} needs num_classes")
  if variant == "random" and key is None:
    raise ValueError("variant 'random' needs a PRNG key")
  if variant == "debias" and target_class is None:
    raise ValueError("variant 'debias' needs target_class")
  if variant in ("teacher", "debias"):
    if apply_fn is None or teacher_params_stacked is None:
      raise ValueError(f"variant {variant!r} needs apply_fn and teacher_params_stacked")
    k_out = jax.eval_shape(lambda p: teacher_probs(apply_fn, p, x), teacher_params_stacked).shape[
      -1
    ]
    if num_classes is not None and k_out != num_classes:
      raise ValueError(f"num_classes={num_classes} but the teachers output {k_out}")
    num_classes = k_out
  return _teacher_labels(
    apply_fn,
    teacher_params_stacked,
    x,
    variant,
    target_class,
    int(num_classes),
    key,
    mask,
    debias_scope,
  )


# Static: apply_fn (hashable), variant, num_classes, debias_scope.
@functools.partial(jax.jit, static_argnums=(0, 3, 5, 8))
def _teacher_labels(
  apply_fn, teacher_params_stacked, x, variant, target_class, num_classes, key, mask, debias_scope
):
  b = x.shape[0]
  if variant == "uniform":
    return jnp.full((b, num_classes), 1.0 / num_classes, jnp.float32)
  if variant == "random":
    return random_labels(key, b, num_classes)
  probs = teacher_probs(apply_fn, teacher_params_stacked, x)
  if variant == "teacher":
    return probs
  return debias(probs, target_class, scope=debias_scope, mask=mask)


def forgetting_loss(logits, y_new, y_true, mask, *, true_weight=1.0):
  """Active-forgetting part of FedAF's unlearning loss (Eq. 13).

    L = mean_valid CE(f(x), y_new) - true_weight * mean_valid CE(f(x), y_true)

  The total objective adds the EWC penalty (lambda/2) (theta - theta*)^T H (theta - theta*)
  (`fu_jax.ewc`), H the Fisher of the client's local data D at theta*. Derivation (§4.3):
  the loss on the retained data D \\ D_u is written as L_D - L_{D_u}, L_D is replaced by its
  quadratic expansion at theta*, and L_{D_u} (the original target data, available) is kept
  exactly, hence the minus term. With mean losses the exact weights would be
  n_u / (n - n_u) on CE(y_true) and n / (n - n_u) on the quadratic; the paper drops both
  ("scales ... omitted without loss of generality"), which is the default true_weight=1.
  The subtracted term is unbounded below (it is gradient ascent on the true labels): keep
  the epoch count small (the paper uses 1 epoch) or rely on the EWC term.

  Args:
    logits: [B, K]; y_new: float [B, K] (from `teacher_labels`) or int [B];
    y_true: int [B] original labels; mask: bool [B] (padding rows excluded).
  Returns: scalar.
  """
  return losses.masked_ce(logits, y_new, mask) - true_weight * losses.masked_ce(
    logits, y_true, mask
  )
