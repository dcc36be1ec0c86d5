"""Dataset condensation by gradient matching, as integrated into FL by QuickDrop.

Gradient matching (Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching",
ICLR 2021; "DC") learns a small synthetic set S_c per class c such that the loss gradient
of the model on S_c matches the gradient on the real data of class c:

    min_S  sum_c  D(grad_theta L(T_c; theta), grad_theta L(S_c; theta)).

QuickDrop (Dhasade et al. 2023, arXiv:2311.15603) runs this inside federated training: each
client reuses the per-class gradients of its real batch (which the FL step needs anyway) as
the matching target, and takes one step on its synthetic images per local step.

Layout of a client's synthetic set (`SyntheticSet`): C chunks of b slots, each chunk holding
images of one class (a class with more than b images spans several chunks):

    x     float32 [C, b, H, W, Ch]   x[j, s] is slot s of chunk j
    y     int32   [C, b]             the chunk's class on every slot (0 in an empty chunk)
    valid bool    [C, b]             a real image; padding slots are zeros and never change

A set of clients is the same pytree with one more leading axis; C and b are static and shared
by the clients that are stacked (vmap needs static shapes): compute them host-side with
`synthetic_layout`. Chunks instead of one row per class because class sizes can be skewed
(under a Dirichlet partition one class of a client may need dozens of synthetic images and
the others one each), and a [K, max size] array would make every image step work on K x max
size slots. Chunk size b = max size (one chunk per present class) is the plain per-class
layout.
`flatten` gives the [C*b, ...] view for training a model on the synthetic set;
`class_masks` selects the images of given classes.

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
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import losses
from fu_jax import tree as tu

__all__ = [
  "METRICS",
  "ApplyFn",
  "SyntheticSet",
  "match_loss",
  "class_counts",
  "per_class_grads",
  "combine_class_grads",
  "synthetic_sizes",
  "chunks_needed",
  "synthetic_layout",
  "init_synthetic",
  "flatten",
  "class_masks",
  "images_by_class",
  "default_image_optimizer",
  "chunk_grads",
  "class_match_losses",
  "nonzero_classes",
  "synthetic_update",
]

METRICS = ("ours", "mse", "cos")
# DC's eps in the cosine denominator: cos = <a, b> / (|a| |b| + 1e-6).
COS_EPS = 1e-6

ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (params, x [B, ...]) -> logits [B, K]


class SyntheticSet(NamedTuple):
  """One client's synthetic images in C one-class chunks of b slots (see module doc)."""

  x: Any  # float32 [C, b, H, W, Ch]
  y: Any  # int32   [C, b]
  valid: Any  # bool    [C, b]


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


def match_loss(g_real, g_syn, *, metric: str = "ours"):
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

  Examples:
    >>> import jax.numpy as jnp
    >>> from fu_jax import distill
    >>> g = {'kernel': jnp.array([[1., 0.], [0., 1.]]), 'bias': jnp.ones(2)}
    >>> print(round(float(distill.match_loss(g, g)), 4))          # same direction per channel
    0.0
    >>> flipped = {'kernel': -g['kernel'], 'bias': g['bias']}
    >>> print(round(float(distill.match_loss(g, flipped)), 4))    # 2 channels, 1 - (-1) each
    4.0
    >>> print(round(float(distill.match_loss(g, flipped, metric='mse')), 4))
    8.0
  """
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r}; allowed: {METRICS}")
  real_leaves, real_def = jax.tree.flatten(g_real)
  syn_leaves, syn_def = jax.tree.flatten(g_syn)
  if real_def != syn_def:
    raise ValueError(f"g_real and g_syn differ in structure: {real_def} vs {syn_def}")
  for r, s in zip(real_leaves, syn_leaves):
    if r.shape != s.shape:
      raise ValueError(f"g_real and g_syn differ in leaf shape: {r.shape} vs {s.shape}")
  pairs = list(zip(real_leaves, syn_leaves))
  if not pairs:
    return jnp.zeros((), jnp.float32)
  if metric == "ours":
    total = jnp.zeros((), jnp.float32)
    for r, s in pairs:
      if r.ndim < 2:
        continue
      total = total + jnp.sum(
        _one_minus_cos(
          _rows_by_output_channel(r).astype(jnp.float32),
          _rows_by_output_channel(s).astype(jnp.float32),
        )
      )
    return total
  r = _flat([p[0] for p in pairs])
  s = _flat([p[1] for p in pairs])
  if metric == "mse":
    return jnp.sum((s - r) ** 2)
  return _one_minus_cos(r, s)


# ------------------------------------------------------------------------ per-class gradients


def class_counts(y, mask, num_classes: int):
  """int32 [K]: number of examples of each class where mask is True."""
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.int32)
  return jnp.sum(onehot * mask.astype(jnp.int32)[:, None], axis=0)


def _resolve_vectorize(vectorize, params):
  allowed = ("auto", "vmap", "unroll")
  if vectorize not in allowed:
    raise ValueError(f"vectorize={vectorize!r}; allowed: {allowed}")
  if vectorize != "auto":
    return vectorize
  # XLA:CPU lowers a vmapped convolution weight gradient to a grouped convolution, several
  # times slower than K separate ones; dense-only models batch well under vmap and compile
  # faster (benchmarks/distill_sanity.py times both).
  has_conv = any(jnp.ndim(p) > 2 for p in jax.tree.leaves(params))
  return "unroll" if has_conv and jax.default_backend() == "cpu" else "vmap"


def per_class_grads(
  apply_fn: ApplyFn, params, x, y, mask, num_classes: int, *, method: str = "per_example"
):
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
    method: how the K gradients are computed (same result up to float rounding; their
      costs on CPU are in BUILD.md):
      'per_example' (default): per-example gradients (vmap over the batch) contracted with
        the [B, K] class weights w_ic = mask_i [y_i = c] / n_c; memory B x |params|.
        Needs a model that treats examples independently (no batch norm; fu_jax has none).
      'vmap': one forward pass and a vmap of its VJP over the K weight vectors; memory
        K x |params| (on CPU the vmapped weight gradient becomes a grouped convolution).
      'unroll': the same VJP, a Python loop over the K classes.

  Returns:
    pytree like params with a leading axis K on every leaf.
  """
  allowed = ("per_example", "vmap", "unroll")
  if method not in allowed:
    raise ValueError(f"method={method!r}; allowed: {allowed}")
  mask = mask.astype(jnp.float32)
  counts = class_counts(y, mask, num_classes).astype(jnp.float32)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  weights = (onehot * mask[:, None]) / jnp.maximum(counts, 1.0)  # [B, K]

  if method == "per_example":

    def example_grad(xi, yi):
      return jax.grad(lambda p: losses.cross_entropy(apply_fn(p, xi[None]), yi[None])[0])(params)

    g = jax.vmap(example_grad)(x, y)
    return jax.tree.map(
      lambda a: jnp.tensordot(weights.T, a.astype(jnp.float32), axes=1).astype(a.dtype), g
    )

  _, vjp = jax.vjp(lambda p: losses.cross_entropy(apply_fn(p, x), y), params)
  if method == "vmap":
    return jax.vmap(lambda w: vjp(w)[0])(weights.T)
  grads = [vjp(weights[:, c])[0] for c in range(num_classes)]
  return jax.tree.map(lambda *a: jnp.stack(a), *grads)


def combine_class_grads(per_class, counts):
  """sum_c n_c g_c / sum_c n_c: the masked-mean batch gradient from per-class mean gradients.

  Zero when every count is zero (like `losses.masked_mean`).
  """
  return tu.tree_weighted_mean(per_class, counts)


# --------------------------------------------------------------------------- synthetic sets


def synthetic_sizes(
  counts_per_class, scale: float = 0.01, images_per_class: int | None = None
) -> np.ndarray:
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
    raise ValueError(f"counts_per_class must be >= 0, got min {n.min()}")
  if images_per_class is not None:
    if int(images_per_class) != images_per_class or images_per_class < 1:
      raise ValueError(f"images_per_class={images_per_class!r}; allowed: an integer >= 1 or None")
    sizes = np.minimum(n, int(images_per_class))
  else:
    if not 0.0 < scale <= 1.0:
      raise ValueError(f"scale={scale!r}; allowed: 0 < scale <= 1")
    # Integer-exact ceil for the common decimal scales (n * 0.01 must not become 1.0000001).
    sizes = np.array(
      [math.ceil(round(v * scale, 9)) for v in n.ravel().tolist()], np.int64
    ).reshape(n.shape)
  return sizes.astype(np.int32)


# A chunk costs like this many extra images in the image step (its VJP and second-order pass
# have a fixed per-op cost; fitted on CPU, BUILD.md). Only steers the automatic chunk size.
CHUNK_OVERHEAD_IMAGES = 4


def chunks_needed(sizes, chunk_size: int) -> np.ndarray:
  """int [...]: sum_c ceil(size_c / b) over the last axis: chunks a client's set occupies."""
  sizes = np.asarray(sizes, np.int64)
  return (-(-sizes // int(chunk_size))).sum(axis=-1)


def synthetic_layout(sizes, chunk_size: int | None = None) -> tuple[int, int]:
  """Host-side static layout (chunk size b, number of chunks C) for sizes [..., K].

  C = the largest number of chunks any client needs, so the sets of all clients stack.
  chunk_size None picks b in 1..max size minimising the image-step work summed over clients,
  each cut to the chunks it uses, sum_k chunks_k(b) * (b + CHUNK_OVERHEAD_IMAGES): large
  chunks waste slots on small classes, small ones pay the per-chunk cost on large classes.
  On balanced sizes that is b = max size, one chunk per class. Both are at least 1 (an empty
  set still has one all-padding chunk).
  """
  sizes = np.asarray(sizes, np.int64)
  largest = max(1, int(sizes.max(initial=0)))
  if chunk_size is None:
    cost = lambda b: int(chunks_needed(sizes, b).sum()) * (b + CHUNK_OVERHEAD_IMAGES)
    chunk_size = min(range(1, largest + 1), key=lambda b: (cost(b), -b))
  if int(chunk_size) != chunk_size or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r}; allowed: an integer >= 1 or None (automatic)")
  chunk_size = int(chunk_size)
  return chunk_size, max(1, int(chunks_needed(sizes, chunk_size).max(initial=0)))


def init_synthetic(
  x,
  y,
  valid,
  num_classes: int,
  *,
  key,
  scale: float = 0.01,
  images_per_class: int | None = None,
  chunk_size: int | None = None,
  num_chunks: int | None = None,
  sizes=None,
) -> SyntheticSet:
  """One client's synthetic set, initialised from distinct random real images of each class.

  Class c gets ceil(size_c / b) consecutive chunks (classes in increasing order, absent
  classes none), filled with distinct random real images of class c; the chunks after the
  last used one are padding. Sizes per class come from `synthetic_sizes` (computed
  host-side from the data), unless `sizes` is given. To build the sets of several clients
  under `vmap`/`jit`, compute sizes [clients, K] and `synthetic_layout(sizes)` host-side and
  pass sizes, chunk_size and num_chunks in: then the function is pure jnp.

  Args:
    x: [n, H, W, Ch] real images (padded rows allowed). y: int [n]. valid: bool [n].
    num_classes: K.
    key: PRNG key.
    scale, images_per_class: see `synthetic_sizes` (ignored when `sizes` is given).
    chunk_size: static b; default `synthetic_layout`'s choice (needs concrete sizes).
    num_chunks: static C, at least sum_c ceil(size_c / b); default exactly that (needs
      concrete sizes).
    sizes: optional int [K] synthetic sizes (may be traced); each must be <= n_c.

  Returns:
    SyntheticSet with x [C, b, H, W, Ch] (zeros on padding), y [C, b], valid [C, b].
  """
  if sizes is None:
    y_np, valid_np = np.asarray(y), np.asarray(valid, bool)
    counts = np.bincount(y_np[valid_np], minlength=num_classes)[:num_classes]
    sizes = synthetic_sizes(counts, scale, images_per_class)
  try:
    concrete = np.asarray(sizes)
  except jax.errors.TracerArrayConversionError:
    concrete = None  # under jit/vmap: the caller computed the layout host-side
  if concrete is None and (chunk_size is None or num_chunks is None):
    raise ValueError(
      "init_synthetic with traced sizes (under jit/vmap) needs chunk_size and "
      "num_chunks: compute them host-side with synthetic_layout"
    )
  if concrete is not None:
    chunk_size, needed = synthetic_layout(concrete, chunk_size)
    if num_chunks is None:
      num_chunks = needed
    elif needed > num_chunks:
      raise ValueError(
        f"num_chunks={num_chunks} < {needed}, the chunks of {chunk_size} images "
        f"these sizes need ({concrete.tolist()})"
      )
  if int(chunk_size) < 1 or int(num_chunks) < 1:
    raise ValueError(f"chunk_size={chunk_size}, num_chunks={num_chunks}; allowed: integers >= 1")
  return _sample_chunks(
    jnp.asarray(x),
    jnp.asarray(y),
    jnp.asarray(valid, bool),
    jnp.asarray(sizes, jnp.int32),
    key,
    num_classes=int(num_classes),
    chunk_size=int(chunk_size),
    num_chunks=int(num_chunks),
  )


@functools.partial(jax.jit, static_argnames=("num_classes", "chunk_size", "num_chunks"))
def _sample_chunks(x, y, valid, sizes, key, *, num_classes, chunk_size, num_chunks):
  n = x.shape[0]
  take = min(chunk_size * num_chunks, n)  # no class can have more images than that

  def picks(c, u):
    # Random priorities, -1 outside the class: the top `take` are distinct in-class examples
    # in random order (the first size_c of them are real because size_c <= n_c).
    return jax.lax.top_k(jnp.where(valid & (y == c), u, -1.0), take)[1]

  pick = jax.vmap(picks)(jnp.arange(num_classes), jax.random.uniform(key, (num_classes, n)))
  per_class = (sizes + chunk_size - 1) // chunk_size  # chunks of each class
  end = jnp.cumsum(per_class)
  j = jnp.arange(num_chunks)
  used = j < end[-1]
  cls = jnp.where(used, jnp.minimum(jnp.searchsorted(end, j, side="right"), num_classes - 1), 0)
  slot = (j - (end - per_class)[cls])[:, None] * chunk_size + jnp.arange(chunk_size)  # [C, b]
  ok = used[:, None] & (slot < sizes[cls][:, None])
  idx = pick[cls[:, None], jnp.minimum(slot, take - 1)]
  imgs = jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 1)), x[idx], 0.0)
  ys = jnp.broadcast_to(cls[:, None], ok.shape).astype(jnp.int32)
  return SyntheticSet(x=imgs.astype(jnp.float32), y=ys, valid=ok)


def flatten(syn: SyntheticSet):
  """(x [C*b, ...], y [C*b], valid [C*b]) for training a model on the synthetic set."""
  c, b = syn.y.shape[-2:]
  lead = syn.y.shape[:-2]
  return (
    syn.x.reshape(lead + (c * b,) + syn.x.shape[len(lead) + 2 :]),
    syn.y.reshape(lead + (c * b,)),
    syn.valid.reshape(lead + (c * b,)),
  )


def class_masks(syn: SyntheticSet, classes):
  """bool like syn.valid: the synthetic images of `classes`."""
  return syn.valid & jnp.isin(syn.y, jnp.asarray(classes, jnp.int32))


def images_by_class(syn: SyntheticSet, num_classes: int) -> list:
  """Host-side [(x [n_c, H, W, Ch]) for c in range(K)]: each class's images, for inspection."""
  x, y, valid = (np.asarray(a) for a in syn)
  return [x[valid & (y == c)] for c in range(num_classes)]


# --------------------------------------------------------------------------- synthetic update


def default_image_optimizer(learning_rate: float = 0.1, momentum: float = 0.5):
  """DC/QuickDrop's optimiser for the synthetic images: SGD, lr 0.1, momentum 0.5."""
  return optax.sgd(learning_rate, momentum=momentum)


def chunk_grads(apply_fn: ApplyFn, params, syn_x, syn_y, syn_valid, *, vectorize: str = "auto"):
  """Pytree like params with a leading axis C: grad_theta of the summed CE of each chunk's
  valid images, sum_{s valid} CE(f(x[j, s]; theta), y[j, s]). Differentiable in syn_x.

  vectorize: 'vmap' over chunks; 'unroll' (a Python loop over the C chunks inside the trace:
    C times the graph and a longer compile, but for a small CNN on CPU much faster per step
    than vmap, whose weight gradients become grouped convolutions); 'auto': unroll for
    models with conv kernels on CPU, else vmap.
  """
  vectorize = _resolve_vectorize(vectorize, params)

  def one_chunk(xj, yj, vj):
    summed = lambda p: jnp.sum(jnp.where(vj, losses.cross_entropy(apply_fn(p, xj), yj), 0.0))
    return jax.grad(summed)(params)

  if vectorize == "vmap":
    return jax.vmap(one_chunk)(syn_x, syn_y, syn_valid)
  grads = [one_chunk(syn_x[j], syn_y[j], syn_valid[j]) for j in range(syn_x.shape[0])]
  return jax.tree.map(lambda *a: jnp.stack(a), *grads)


def class_match_losses(
  apply_fn: ApplyFn,
  params,
  syn: SyntheticSet,
  g_real_per_class,
  *,
  metric: str = "ours",
  vectorize: str = "auto",
):
  """float32 [K]: match_loss(g_real_c, g_syn_c) per class, K = g_real_per_class's leading axis.

    g_syn_c = grad_theta (1 / n_c) sum_{i in S, y_i = c} CE(f(s_i; theta), c)
            = sum_{chunks j of class c} G_j / n_c,    G_j = `chunk_grads` (a summed CE),

  i.e. the masked-mean CE gradient of class c's synthetic images; 0 for a class without
  images. Differentiable in syn.x (second order: the gradient of a gradient). vectorize:
  how the chunks are batched, see `chunk_grads`.
  """
  num_classes = jax.tree.leaves(g_real_per_class)[0].shape[0]
  g_chunks = chunk_grads(apply_fn, params, syn.x, syn.y, syn.valid, vectorize=vectorize)
  counts = jnp.sum(syn.valid, axis=1).astype(jnp.float32)  # [C]
  member = jax.nn.one_hot(syn.y[:, 0], num_classes, dtype=jnp.float32) * (counts > 0)[:, None]
  weights = member / jnp.maximum(member.T @ counts, 1.0)  # [C, K]
  g_syn = jax.tree.map(lambda g: jnp.tensordot(weights.T, g, axes=1), g_chunks)
  return jax.vmap(functools.partial(match_loss, metric=metric))(g_real_per_class, g_syn)


def nonzero_classes(per_class):
  """bool [K]: classes whose per-class gradient (leading axis K) is not all zero.

  `per_class_grads` returns exact zeros for a class without examples, so this recovers which
  classes were present when the counts were not kept.
  """
  leaves = jax.tree.leaves(per_class)
  return jnp.stack([jnp.any(jnp.reshape(g, (g.shape[0], -1)) != 0, axis=1) for g in leaves]).any(
    axis=0
  )


def synthetic_update(
  apply_fn: ApplyFn,
  params,
  syn: SyntheticSet,
  g_real_per_class,
  opt_state,
  *,
  optimizer: optax.GradientTransformation | None = None,
  metric: str = "ours",
  real_counts=None,
  vectorize: str = "auto",
):
  """One gradient-matching step on the synthetic images of every class (DC Alg. 1, inner step).

    L(S) = sum_{c active} D(g_real_c, grad_theta CE(S_c; theta)),   S <- optimizer step on dL/dS

  with `params` fixed. A class is active iff it has real examples in the batch and at least one
  synthetic image. Inactive classes are frozen: their images do not change and the chunks of
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
    vectorize: how the chunks are batched, see `chunk_grads`.

  Returns:
    (new syn, new opt_state, loss): loss = sum over active classes of the match loss, before
    the step.

  Examples:
    One synthetic image per class learns to reproduce its class's gradient:

    >>> import jax, jax.numpy as jnp
    >>> from fu_jax import distill
    >>> apply_fn = lambda p, x: x.reshape(len(x), -1) @ p['w']   # 2x2 images, 2 classes
    >>> params = {'w': jax.random.normal(jax.random.key(0), (4, 2))}
    >>> x = jax.random.normal(jax.random.key(1), (16, 2, 2, 1))
    >>> y, valid = jnp.arange(16) % 2, jnp.ones(16, bool)
    >>> g_real = distill.per_class_grads(apply_fn, params, x, y, valid, 2)
    >>> syn = distill.init_synthetic(x, y, valid, 2, key=jax.random.key(2), images_per_class=1)
    >>> print(syn.x.shape, syn.y.tolist())             # 2 one-class chunks of 1 slot
    (2, 1, 2, 2, 1) [[0], [1]]
    >>> state = distill.default_image_optimizer().init(syn.x)
    >>> losses = []
    >>> for _ in range(30):
    ...   syn, state, loss = distill.synthetic_update(apply_fn, params, syn, g_real, state)
    ...   losses.append(float(loss))
    >>> losses[-1] < 0.1 * losses[0]
    True
  """
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r}; allowed: {METRICS}")
  if optimizer is None:
    optimizer = default_image_optimizer()
  num_classes = jax.tree.leaves(g_real_per_class)[0].shape[0]
  if real_counts is None:
    has_real = nonzero_classes(g_real_per_class)
  else:
    has_real = jnp.asarray(real_counts) > 0
  has_images = jnp.zeros(num_classes, bool).at[syn.y[:, 0]].max(jnp.any(syn.valid, axis=1))
  active = has_real & has_images

  def total_loss(sx):
    per_class = class_match_losses(
      apply_fn, params, syn._replace(x=sx), g_real_per_class, metric=metric, vectorize=vectorize
    )
    return jnp.sum(jnp.where(active, per_class, 0.0))

  loss, gx = jax.value_and_grad(total_loss)(syn.x)
  updates, new_state = optimizer.update(gx, opt_state, syn.x)
  chunk_active = active[syn.y[:, 0]] & jnp.any(syn.valid, axis=1)
  row = chunk_active.reshape((-1,) + (1,) * (syn.x.ndim - 1))
  # Padding slots get zero gradient (masked mean), but freeze them explicitly so no optimizer
  # (weight decay, adam eps) can move them away from zero.
  keep = row & syn.valid.reshape(syn.valid.shape + (1,) * (syn.x.ndim - 2))
  new_x = jnp.where(keep, optax.apply_updates(syn.x, updates), syn.x)

  def freeze_rows(new, old):
    if hasattr(new, "shape") and new.shape == syn.x.shape:
      return jnp.where(row, new, old)
    return new

  new_state = jax.tree.map(freeze_rows, new_state, opt_state)
  return syn._replace(x=new_x), new_state, loss
