"""Dataset condensation by gradient matching, as integrated into FL by QuickDrop.

Gradient matching (Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching",
ICLR 2021; "DC") learns a small synthetic set S_c per class c such that the loss gradient
of the model on S_c matches the gradient on the real data of class c:

    min_S  sum_c  D(grad_theta L(T_c; theta), grad_theta L(S_c; theta)).

QuickDrop (Dhasade et al. 2023, arXiv:2311.15603) runs this inside federated training: each
client reuses the per-class gradients of its real batch (which the FL step needs anyway) as
the matching target, and takes one step on its synthetic images per local step.

Layout of a client's synthetic set (`SyntheticSet`): per class, padded to a static capacity m,

    x     float32 [K, m, H, W, C]   x[c, j] is the j-th synthetic image of class c
    y     int32   [K, m]            y[c, j] = c (also on padding)
    valid bool    [K, m]            j < size_c; padding slots are zeros and never change

With the class axis first, the per-class step maps over axis 0 (vmap, or an unrolled loop
where that is faster), the data of one class (QuickDrop's unlearning of class c) is
`syn.x[c]`, and a set of clients is the same pytree with one more leading axis. `flatten`
gives the [K*m, ...] view for training a model on the synthetic set. m must be the same for
all clients that are stacked (vmap needs static shapes): compute it host-side with
`synthetic_capacity`.

A QuickDrop client step ("reuse" mode), all at the same params theta:

    g_c = per_class_grads(apply_fn, theta, x, y, mask, K)               # [K, ...] targets
    n_c = class_counts(y, mask, K)
    theta_update_grad = combine_class_grads(g_c, n_c)                   # = batch gradient
    syn, img_state, loss = synthetic_update(apply_fn, theta, syn, g_c, img_state,
                                            real_counts=n_c)

Gradient pytrees follow Flax: a kernel's output channel is its LAST axis.
"""
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import losses
from fu_jax import tree

METRICS = ('ours', 'mse', 'cos')
# DC's eps in the cosine denominator: cos = <a, b> / (|a| |b| + 1e-6).
COS_EPS = 1e-6

ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (params, x [B, ...]) -> logits [B, K]


class SyntheticSet(NamedTuple):
  """One client's synthetic images, per class, padded to a static capacity m (see module doc)."""
  x: Any      # float32 [K, m, H, W, C]
  y: Any      # int32   [K, m]
  valid: Any  # bool    [K, m]


# --------------------------------------------------------------------------- matching distance


def _safe_norm(v, axis=-1):
  """Euclidean norm with a finite (zero) gradient at v = 0.

  A class without synthetic images has g_syn = 0; the plain sqrt would give 0 * inf = NaN
  in the second-order gradient even where that class's loss is masked out.
  """
  sq = jnp.sum(v * v, axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _one_minus_cos(a, b):
  """1 - <a, b> / (|a| |b| + eps) over the last axis (DC's `distance_wb` row term)."""
  return 1.0 - jnp.sum(a * b, axis=-1) / (_safe_norm(a) * _safe_norm(b) + COS_EPS)


def _rows_by_output_channel(g):
  """Flax kernel [..., out] -> [out, prod(...)] (DC works on PyTorch's [out, ...] layout)."""
  return jnp.moveaxis(g, -1, 0).reshape(g.shape[-1], -1)


def _flat(leaves):
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def match_loss(g_real, g_syn, *, metric: str = 'ours'):
  """Gradient-matching distance D(g_real, g_syn) between two gradient pytrees (DC, Eq. 10).

  metric:
    'ours' (DC's default, used by QuickDrop): layer-wise, output-channel-wise cosine distance
        sum_{leaves with ndim >= 2} sum_o (1 - <r_o, s_o> / (|r_o| |s_o| + 1e-6)),
      where r_o, s_o are the gradients of output channel o (the kernel's LAST axis in Flax)
      flattened over all other axes. Leaves of ndim < 2 (biases, norm scales) contribute 0,
      as in DC's `distance_wb`.
    'mse': sum over all leaves of sum((g_syn - g_real)^2).
    'cos': 1 - <r, s> / (|r| |s| + 1e-6) of the whole flattened, concatenated pytrees.

  Args:
    g_real: gradient pytree (the target).
    g_syn: gradient pytree with the same structure and shapes.
    metric: one of METRICS.

  Returns:
    float32 scalar. Equal gradients give 0 up to float rounding (the eps makes it ~1e-6
    relative, not exactly 0). A zero row/vector counts as cos = 0 (distance 1), as in DC.
  """
  if metric not in METRICS:
    raise ValueError(f'metric={metric!r}; allowed: {METRICS}')
  real_leaves, real_def = jax.tree.flatten(g_real)
  syn_leaves, syn_def = jax.tree.flatten(g_syn)
  if real_def != syn_def:
    raise ValueError(f'g_real and g_syn differ in structure: {real_def} vs {syn_def}')
  for r, s in zip(real_leaves, syn_leaves):
    if r.shape != s.shape:
      raise ValueError(f'g_real and g_syn differ in leaf shape: {r.shape} vs {s.shape}')
  pairs = list(zip(real_leaves, syn_leaves))
  if not pairs:
    return jnp.zeros((), jnp.float32)
  if metric == 'ours':
    total = jnp.zeros((), jnp.float32)
    for r, s in pairs:
      if r.ndim < 2:
        continue
      total = total + jnp.sum(_one_minus_cos(
          _rows_by_output_channel(r).astype(jnp.float32),
          _rows_by_output_channel(s).astype(jnp.float32)))
    return total
  r = _flat([p[0] for p in pairs])
  s = _flat([p[1] for p in pairs])
  if metric == 'mse':
    return jnp.sum((s - r) ** 2)
  return _one_minus_cos(r, s)


# ------------------------------------------------------------------------ per-class gradients


def class_counts(y, mask, num_classes: int):
  """int32 [K]: number of examples of each class where mask is True."""
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.int32)
  return jnp.sum(onehot * mask.astype(jnp.int32)[:, None], axis=0)


def _resolve_vectorize(vectorize, params):
  allowed = ('auto', 'vmap', 'unroll')
  if vectorize not in allowed:
    raise ValueError(f'vectorize={vectorize!r}; allowed: {allowed}')
  if vectorize != 'auto':
    return vectorize
  # XLA:CPU lowers a vmapped convolution weight gradient to a grouped convolution, several
  # times slower than K separate ones; dense-only models batch well under vmap and compile
  # faster (measured in benchmarks/distill_sanity.py).
  has_conv = any(jnp.ndim(p) > 2 for p in jax.tree.leaves(params))
  return 'unroll' if has_conv and jax.default_backend() == 'cpu' else 'vmap'


def per_class_grads(apply_fn: ApplyFn, params, x, y, mask, num_classes: int, *,
                    method: str = 'per_example'):
  """Mean cross-entropy gradient of the examples of each class.

    g_c = grad_theta (1 / n_c) sum_{i: y_i = c, mask_i} CE(f(x_i; theta), y_i),  g_c = 0 if n_c = 0.

  The FL step's gradient (masked mean CE over the whole batch) is the count-weighted mean of
  these, `combine_class_grads(g, class_counts(y, mask, K))`, so a QuickDrop client computes
  the per-class targets once and derives its model update from them.

  Args:
    apply_fn: (params, x) -> logits [B, K].
    params: parameter pytree.
    x: [B, ...] inputs. y: int [B] labels. mask: bool [B] (False on padding).
    num_classes: K (static).
    method: how the K gradients are computed (same result up to float rounding). Costs in
      units of one batch gradient, measured for a 2-conv CNN on 28x28, B=64, K=10, CPU:
      'per_example' (default): per-example gradients (vmap over the batch) contracted with
        the [B, K] class weights w_ic = mask_i [y_i = c] / n_c. 2.4x; memory B x |params|.
        Needs a model that treats examples independently (no batch norm; fu_jax has none).
      'vmap': one forward pass and a vmap of its VJP over the K weight vectors. 13x on CPU
        (the vmapped weight gradient becomes a grouped convolution); memory K x |params|.
      'unroll': the same VJP, a Python loop over the K classes. 6x.

  Returns:
    pytree like params with a leading axis K on every leaf.
  """
  allowed = ('per_example', 'vmap', 'unroll')
  if method not in allowed:
    raise ValueError(f'method={method!r}; allowed: {allowed}')
  mask = mask.astype(jnp.float32)
  counts = class_counts(y, mask, num_classes).astype(jnp.float32)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  weights = (onehot * mask[:, None]) / jnp.maximum(counts, 1.0)  # [B, K]

  if method == 'per_example':
    def example_grad(xi, yi):
      return jax.grad(lambda p: losses.cross_entropy(apply_fn(p, xi[None]), yi[None])[0])(params)

    g = jax.vmap(example_grad)(x, y)
    return jax.tree.map(
        lambda a: jnp.tensordot(weights.T, a.astype(jnp.float32), axes=1).astype(a.dtype), g)

  _, vjp = jax.vjp(lambda p: losses.cross_entropy(apply_fn(p, x), y), params)
  if method == 'vmap':
    return jax.vmap(lambda w: vjp(w)[0])(weights.T)
  grads = [vjp(weights[:, c])[0] for c in range(num_classes)]
  return jax.tree.map(lambda *a: jnp.stack(a), *grads)


def combine_class_grads(per_class, counts):
  """sum_c n_c g_c / sum_c n_c: the masked-mean batch gradient from per-class mean gradients.

  Zero when every count is zero (like `losses.masked_mean`).
  """
  return tree.tree_weighted_mean(per_class, counts)


# --------------------------------------------------------------------------- synthetic sets


def synthetic_sizes(counts_per_class, scale: float = 0.01,
                    images_per_class: Optional[int] = None) -> np.ndarray:
  """Host-side number of synthetic images per class (QuickDrop: ceil(n_c * scale)).

  Args:
    counts_per_class: int array [..., K] of real examples per class (any leading axes, e.g.
      [clients, K]).
    scale: fraction of each class kept, in (0, 1]; used when images_per_class is None.
    images_per_class: fixed count per present class instead (DC's "ipc"), capped at n_c
      because images are initialised from distinct real examples.

  Returns:
    int32 array like counts_per_class: 0 for absent classes, otherwise
    ceil(n_c * scale) (>= 1 automatically) or min(images_per_class, n_c).
  """
  n = np.asarray(counts_per_class)
  if n.size and (n.min() < 0):
    raise ValueError(f'counts_per_class must be >= 0, got min {n.min()}')
  if images_per_class is not None:
    if int(images_per_class) != images_per_class or images_per_class < 1:
      raise ValueError(f'images_per_class={images_per_class!r}; allowed: an integer >= 1 or None')
    sizes = np.minimum(n, int(images_per_class))
  else:
    if not 0.0 < scale <= 1.0:
      raise ValueError(f'scale={scale!r}; allowed: 0 < scale <= 1')
    # Integer-exact ceil for the common decimal scales (n * 0.01 must not become 1.0000001).
    sizes = np.array([math.ceil(round(v * scale, 9)) for v in n.ravel().tolist()],
                     np.int64).reshape(n.shape)
  return sizes.astype(np.int32)


def synthetic_capacity(counts_per_class, scale: float = 0.01,
                       images_per_class: Optional[int] = None) -> int:
  """Static slot count m = max synthetic size over all classes (and clients), at least 1."""
  sizes = synthetic_sizes(counts_per_class, scale, images_per_class)
  return max(1, int(sizes.max(initial=0)))


def init_synthetic(x, y, valid, num_classes: int, *, key, scale: float = 0.01,
                   images_per_class: Optional[int] = None, capacity: Optional[int] = None,
                   sizes=None) -> SyntheticSet:
  """One client's synthetic set, initialised from distinct random real images of each class.

  Sizes per class come from `synthetic_sizes` (computed host-side from the data), unless
  `sizes` is given. To build the sets of several clients under `vmap`/`jit`, compute sizes
  [clients, K] and capacity host-side and pass them in: then the function is pure jnp.

  Args:
    x: [n, H, W, C] real images (padded rows allowed). y: int [n]. valid: bool [n].
    num_classes: K.
    key: PRNG key.
    scale, images_per_class: see `synthetic_sizes` (ignored when `sizes` is given).
    capacity: static slot count m; default max(sizes) (needs concrete data). Must be >= the
      largest size.
    sizes: optional int [K] synthetic sizes (may be traced); each must be <= n_c.

  Returns:
    SyntheticSet with x [K, m, H, W, C] (zeros on padding), y [K, m] = c, valid [K, m].
  """
  if sizes is None:
    y_np, valid_np = np.asarray(y), np.asarray(valid, bool)
    counts = np.bincount(y_np[valid_np], minlength=num_classes)[:num_classes]
    sizes = synthetic_sizes(counts, scale, images_per_class)
  if capacity is None:
    capacity = max(1, int(np.max(np.asarray(sizes), initial=0)))
  if int(capacity) < 1:
    raise ValueError(f'capacity={capacity}; allowed: an integer >= 1')
  return _sample_per_class(jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid, bool),
                           jnp.asarray(sizes, jnp.int32), key, num_classes=int(num_classes),
                           capacity=int(capacity))


@functools.partial(jax.jit, static_argnames=('num_classes', 'capacity'))
def _sample_per_class(x, y, valid, sizes, key, *, num_classes, capacity):
  n = x.shape[0]
  take = min(capacity, n)

  def one_class(c, u):
    # Random priorities, -1 outside the class: the top `take` are distinct in-class examples
    # in random order (the first size_c of them are real because size_c <= n_c).
    score = jnp.where(valid & (y == c), u, -1.0)
    _, idx = jax.lax.top_k(score, take)
    slot_ok = jnp.arange(capacity) < sizes[c]
    idx = jnp.pad(idx, (0, capacity - take))
    imgs = jnp.where(slot_ok.reshape((-1,) + (1,) * (x.ndim - 1)), x[idx], 0.0)
    return imgs.astype(jnp.float32), slot_ok

  classes = jnp.arange(num_classes)
  xs, ok = jax.vmap(one_class)(classes, jax.random.uniform(key, (num_classes, n)))
  ys = jnp.broadcast_to(classes[:, None], (num_classes, capacity)).astype(jnp.int32)
  return SyntheticSet(x=xs, y=ys, valid=ok)


def flatten(syn: SyntheticSet):
  """(x [K*m, ...], y [K*m], valid [K*m]) for training a model on the synthetic set."""
  k, m = syn.y.shape[-2:]
  lead = syn.y.shape[:-2]
  return (syn.x.reshape(lead + (k * m,) + syn.x.shape[len(lead) + 2:]),
          syn.y.reshape(lead + (k * m,)),
          syn.valid.reshape(lead + (k * m,)))


# --------------------------------------------------------------------------- synthetic update


def default_image_optimizer(learning_rate: float = 0.1, momentum: float = 0.5):
  """DC/QuickDrop's optimiser for the synthetic images: SGD, lr 0.1, momentum 0.5."""
  return optax.sgd(learning_rate, momentum=momentum)


def class_match_losses(apply_fn: ApplyFn, params, syn_x, syn_valid, g_real_per_class, *,
                       metric: str = 'ours', vectorize: str = 'auto'):
  """float32 [K]: match_loss(g_real_c, grad_theta masked-mean CE(syn images of c)), per class.

  Differentiable in syn_x (second order: the gradient of a gradient).

  vectorize: 'vmap' over classes; 'unroll' (a Python loop over the K classes inside the trace:
    K times the graph and ~2-3x the compile time, but for a small CNN on CPU ~7x faster per
    step than vmap); 'auto': unroll for models with conv kernels on CPU, else vmap.
  """
  vectorize = _resolve_vectorize(vectorize, params)
  num_classes = syn_x.shape[0]

  def one_class(xc, vc, c, g_real_c):
    labels = jnp.full((xc.shape[0],), c, jnp.int32)
    g_syn_c = jax.grad(lambda p: losses.masked_ce(apply_fn(p, xc), labels, vc))(params)
    return match_loss(g_real_c, g_syn_c, metric=metric)

  if vectorize == 'vmap':
    return jax.vmap(one_class)(syn_x, syn_valid, jnp.arange(num_classes), g_real_per_class)
  return jnp.stack([
      one_class(syn_x[c], syn_valid[c], c, jax.tree.map(lambda g, c=c: g[c], g_real_per_class))
      for c in range(num_classes)])


def nonzero_classes(per_class):
  """bool [K]: classes whose per-class gradient (leading axis K) is not all zero.

  `per_class_grads` returns exact zeros for a class without examples, so this recovers which
  classes were present when the counts were not kept.
  """
  leaves = jax.tree.leaves(per_class)
  return jnp.stack([jnp.any(jnp.reshape(g, (g.shape[0], -1)) != 0, axis=1) for g in leaves]
                   ).any(axis=0)


def synthetic_update(apply_fn: ApplyFn, params, syn: SyntheticSet, g_real_per_class, opt_state,
                     *, optimizer: Optional[optax.GradientTransformation] = None,
                     metric: str = 'ours', real_counts=None, vectorize: str = 'auto'):
  """One gradient-matching step on the synthetic images of every class (DC Alg. 1, inner step).

    L(S) = sum_{c active} D(g_real_c, grad_theta CE(S_c; theta)),   S <- optimizer step on dL/dS

  with `params` fixed. A class is active iff it has real examples in the batch and at least one
  synthetic image. Inactive classes are frozen: their images do not change and the rows of
  any optimizer-state leaf shaped like syn.x (e.g. momentum) keep their old values, so a class
  missing from this batch is not moved by stale momentum either.

  Args:
    apply_fn: (params, x) -> logits.
    params: model parameters (not updated here).
    syn: SyntheticSet of one client.
    g_real_per_class: pytree like params with a leading K axis (`per_class_grads`).
    opt_state: `optimizer.init(syn.x)`.
    optimizer: optax optimizer on the images; default `default_image_optimizer()` (the same
      optimizer must have created opt_state).
    metric: see `match_loss`.
    real_counts: int [K] real examples per class behind g_real_per_class; default: a class
      counts as present iff its real gradient is nonzero (`nonzero_classes`).
    vectorize: how the classes are batched, see `class_match_losses`.

  Returns:
    (new syn, new opt_state, loss): loss = sum over active classes of the match loss, before
    the step.
  """
  if metric not in METRICS:
    raise ValueError(f'metric={metric!r}; allowed: {METRICS}')
  if optimizer is None:
    optimizer = default_image_optimizer()
  num_classes = syn.x.shape[0]
  if real_counts is None:
    has_real = nonzero_classes(g_real_per_class)
  else:
    has_real = jnp.asarray(real_counts) > 0
  active = has_real & jnp.any(syn.valid, axis=1)

  def total_loss(sx):
    per_class = class_match_losses(apply_fn, params, sx, syn.valid, g_real_per_class,
                                   metric=metric, vectorize=vectorize)
    return jnp.sum(jnp.where(active, per_class, 0.0))

  loss, gx = jax.value_and_grad(total_loss)(syn.x)
  updates, new_state = optimizer.update(gx, opt_state, syn.x)
  row = active.reshape((num_classes,) + (1,) * (syn.x.ndim - 1))
  # Padding slots get zero gradient (masked mean), but freeze them explicitly so no optimizer
  # (weight decay, adam eps) can move them away from zero.
  keep = row & syn.valid.reshape(syn.valid.shape + (1,) * (syn.x.ndim - 2))
  new_x = jnp.where(keep, optax.apply_updates(syn.x, updates), syn.x)

  def freeze_rows(new, old):
    if hasattr(new, 'shape') and new.shape == syn.x.shape:
      return jnp.where(row, new, old)
    return new

  new_state = jax.tree.map(freeze_rows, new_state, opt_state)
  return syn._replace(x=new_x), new_state, loss
