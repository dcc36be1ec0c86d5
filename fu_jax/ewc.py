"""FedAF's knowledge preserver: empirical Fisher (diagonal or CountSketch) and the EWC penalty.

FedAF (Li et al. 2023, "Federated Unlearning via Active Forgetting", Sec. 4.3, Eqs. 7-11)
keeps the knowledge of the retained data while unlearning with the penalty

    (lambda/2) (theta - theta*)^T F (theta - theta*),   F = (1/n) J^T J,

J the n x d matrix of the per-example gradients g_i of the loss at theta* (the empirical
Fisher). Two approximations, neither of which materialises J (examples run in chunks of
`chunk_size` under lax.scan, so memory is O(chunk * d) plus the accumulator):

  diag    F_diag = mean_i g_i ** 2 (a pytree like params): `fisher_diagonal`.
  sketch  S J, S a t x n CountSketch (example i -> bucket h(i) with sign s(i), both drawn
          from fold_in(key, i)): `count_sketch`; penalty (lambda/2) ||S J Delta||^2 / n.
          E[S^T S] = I_n, so this is an unbiased estimate of Delta^T F Delta (Li et al. 2021,
          "Lifelong learning with sketched structural regularization"; FedAF Eq. 11).

Labels (`model_labels`): J's rows are gradients of -log p(y_i | x_i) at theta*. With the
labels the client holds (FedAF's reading, "empirical") F is the empirical Fisher; at a
confident, converged theta* almost every g_i is tiny and so is F. With y_i drawn from the
model's own predictive distribution p(. | x_i; theta*) ("model") the mean over examples is
an unbiased one-sample estimate of the true Fisher E_x E_{y~p} g g^T, which keeps the
curvature of the directions the model is uncertain about (Kunstner et al. 2019, "Limitations
of the empirical Fisher approximation for natural gradient descent"). Both forms
below take the labels as given.

`add_ewc_gradient(lam)` is an optax GradientTransformation adding the penalty's gradient
lam F (theta - theta*) (diag) or lam (S J)^T S J Delta / n (sketch). Anchor and curvature
live in its STATE, so they differ per client under vmap and change without recompiling:
`set_ewc_state(opt_state, ewc_state_diag(anchor, fisher))` puts them into a chain's state.
`loss_fn(params, x, y)` is the loss of ONE example; `example_ce_loss(apply_fn)` builds the
cross-entropy one from apply_fn(params, x) -> logits.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from fu_jax import ewc
  >>> apply_fn = lambda p, x: x @ p['w']              # a linear model: 2 features, 2 classes
  >>> anchor = {'w': jnp.zeros((2, 2))}
  >>> x, y, valid = jnp.eye(2), jnp.array([0, 1]), jnp.ones(2, bool)
  >>> fisher = ewc.fisher_diagonal(ewc.example_ce_loss(apply_fn), anchor, x, y, valid)
  >>> print(fisher['w'])                              # mean of g_i**2; g_i = x_i (p - onehot)
  [[0.125 0.125]
   [0.125 0.125]]
  >>> tx = optax.chain(ewc.add_ewc_gradient(lam=4.0), optax.sgd(1.0))
  >>> state = ewc.set_ewc_state(tx.init(anchor), ewc.ewc_state_diag(anchor, fisher))
  >>> params = {'w': jnp.ones((2, 2))}                # moved away from the anchor
  >>> updates, state = tx.update({'w': jnp.zeros((2, 2))}, state, params)
  >>> print(optax.apply_updates(params, updates)['w'])   # pulled back: 1 - 4 * 0.125 * 1
  [[0.5 0.5]
   [0.5 0.5]]
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fu_jax import losses

__all__ = [
  "KINDS",
  "example_ce_loss",
  "per_example_grads",
  "fisher_diagonal",
  "sketch_hash",
  "count_sketch",
  "ewc_penalty_diag",
  "ewc_penalty_sketch",
  "EwcDiagState",
  "EwcSketchState",
  "ewc_state_diag",
  "ewc_state_sketch",
  "set_ewc_state",
  "ewc_penalty",
  "ewc_gradient",
  "add_ewc_gradient",
]

KINDS = ("diag", "sketch")
FISHER_LABELS = ("empirical", "model")


def example_ce_loss(apply_fn: Callable[..., Any]):
  """Per-example cross-entropy loss_fn(params, x, y) for apply_fn(params, x) -> logits (x has
  no batch axis; y an int label or a [K] soft label)."""

  def loss_fn(params, x, y):
    logits = apply_fn(params, x[None])
    return losses.cross_entropy(logits, jnp.asarray(y)[None])[0]

  return loss_fn


def model_labels(apply_fn: Callable[..., Any], params, x, key):
  """int32 [n]: y_i ~ Categorical(softmax(f(x_i; params))), for the true Fisher.

  Example i draws from fold_in(key, i), so its label does not depend on n or on the other
  rows (padding appended at the end leaves the real rows' labels unchanged).
  `apply_fn(params, x) -> logits`.
  """
  logits = apply_fn(params, x)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def per_example_grads(loss_fn, params, x, y):
  """vmap(grad(loss_fn)) over the leading axis of x and y: leaves of shape (B,) + leaf.shape.

  Materialises B gradients; use it on chunks (the functions below do)."""
  return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, x, y)


def _chunks(x, y, mask, chunk_size: int | None):
  """Reshape to [num_chunks, chunk, ...], padding with masked-out copies of row 0."""
  n = x.shape[0]
  c = n if chunk_size is None else int(chunk_size)
  if c < 1:
    raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
  c = min(c, n)
  m = -(-n // c)
  pad = m * c - n
  mask = jnp.asarray(mask).astype(jnp.bool_)
  pos = jnp.arange(m * c)

  def prep(a):
    if pad:
      a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])], axis=0)
    return a.reshape((m, c) + a.shape[1:])

  mask_p = prep(mask)
  if pad:
    mask_p = jnp.where((pos < n).reshape(m, c), mask_p, False)
  return prep(x), prep(y), mask_p, pos.reshape(m, c)


def fisher_diagonal(loss_fn, params, x, y, mask, *, chunk_size: int | None = None):
  """Empirical diagonal Fisher F = mean over valid examples of g_i ** 2.

  Args:
    loss_fn: per-example loss_fn(params, x_i, y_i) -> scalar.
    params: theta* (the anchor).
    x, y: [n, ...] examples and labels; mask: bool [n] (False rows are ignored).
    chunk_size: examples per chunk (None: all n at once). Memory O(chunk_size * d).

  Returns:
    pytree like params (zeros when no example is valid).
  """
  xs, ys, ms, _ = _chunks(x, y, mask, chunk_size)

  def body(acc, inp):
    xc, yc, mc = inp
    g = per_example_grads(loss_fn, params, xc, yc)
    sq = jax.tree.map(
      lambda a: jnp.sum(jnp.where(mc.reshape((-1,) + (1,) * (a.ndim - 1)), a * a, 0.0), axis=0), g
    )
    return optax.tree.add(acc, sq), None

  acc, _ = jax.lax.scan(body, optax.tree.zeros_like(params), (xs, ys, ms))
  count = jnp.maximum(jnp.sum(jnp.asarray(mask).astype(jnp.float32)), 1.0)
  return jax.tree.map(lambda a: a / count.astype(a.dtype), acc)


def sketch_hash(key, n: int, width: int):
  """CountSketch hash of examples 0..n-1: (bucket int32 [n] in [0, width), sign f32 [n]).

  Example i draws 32 random bits from fold_in(key, i): the top bit gives the sign, the
  other 31 bits modulo width the bucket (modulo bias < width / 2**31, negligible). So the
  first n rows do not depend on the padded n, and bucket and sign are independent."""

  def one(i):
    bits = jax.random.bits(jax.random.fold_in(key, i), (), jnp.uint32)
    sign = jnp.where(bits >> 31 == 0, 1.0, -1.0).astype(jnp.float32)
    bucket = ((bits & jnp.uint32(0x7FFFFFFF)) % jnp.uint32(width)).astype(jnp.int32)
    return bucket, sign

  return jax.vmap(one)(jnp.arange(n))


def count_sketch(loss_fn, params, x, y, mask, key, *, width: int, chunk_size: int | None = None):
  """S J without forming J: leaves of shape (width,) + leaf.shape.

  Row r is sum over valid examples i with bucket h(i) = r of s(i) * g_i, where
  (h, s) = sketch_hash(key, n, width). Each chunk's per-example gradients are scatter-added
  into their buckets (segment_sum), so memory is O(width * d + chunk_size * d).
  The matching n for `ewc_penalty_sketch` is the number of valid examples, mask.sum().

  Examples:
    With one bucket per example (width = n) and distinct buckets the sketch holds +-g_i, so
    its squared rows average to the diagonal Fisher; with fewer buckets it does so in
    expectation over the hash.

    >>> import jax, jax.numpy as jnp
    >>> from fu_jax import ewc
    >>> loss_fn = ewc.example_ce_loss(lambda p, x: x @ p['w'])
    >>> params = {'w': jnp.zeros((2, 3))}
    >>> x, y, valid = jnp.eye(2), jnp.array([0, 2]), jnp.ones(2, bool)
    >>> sk = ewc.count_sketch(loss_fn, params, x, y, valid, jax.random.key(0), width=4)
    >>> print(sk['w'].shape)                             # (width,) + the parameter's shape
    (4, 2, 3)
    >>> state = ewc.ewc_state_sketch(params, sk, n=2)
    >>> float(ewc.ewc_penalty(params, state, lam=1.0))   # zero at the anchor
    0.0
  """
  width = int(width)
  if width < 1:
    raise ValueError(f"sketch width must be >= 1, got {width}")
  n = x.shape[0]
  bucket, sign = sketch_hash(key, n, width)
  xs, ys, ms, pos = _chunks(x, y, mask, chunk_size)
  # Padding positions (pos >= n) are masked out; clip just keeps the gather in range.
  idx = jnp.minimum(pos, n - 1)
  bs, ss = bucket[idx], jnp.where(ms, sign[idx], 0.0)

  def body(acc, inp):
    xc, yc, bc, sc = inp
    g = per_example_grads(loss_fn, params, xc, yc)

    def add(a, gl):
      w = sc.reshape((-1,) + (1,) * (gl.ndim - 1)).astype(gl.dtype)
      # where() so a non-finite gradient on a padding row cannot leak in as 0 * inf.
      contrib = jnp.where(w != 0, w * gl, 0.0)
      return a + jax.ops.segment_sum(contrib, bc, num_segments=width)

    return jax.tree.map(add, acc, g), None

  zeros = jax.tree.map(lambda p: jnp.zeros((width,) + p.shape, p.dtype), params)
  acc, _ = jax.lax.scan(body, zeros, (xs, ys, bs, ss))
  return acc


def _sketch_apply(sketch, delta):
  """(S J) Delta: float [t] = sum over leaves of <row_r, delta>."""

  def one(s, d):
    return jnp.tensordot(s.reshape(s.shape[0], -1), d.reshape(-1), axes=1)

  return sum(one(s, d) for s, d in zip(jax.tree.leaves(sketch), jax.tree.leaves(delta)))


def _safe_n(n):
  return jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)


def ewc_penalty_diag(params, anchor, fisher_diag, lam):
  """(lam/2) sum F (theta - theta*)^2."""
  delta = optax.tree.sub(params, anchor)
  return (
    0.5
    * lam
    * sum(jnp.sum(f * d * d) for f, d in zip(jax.tree.leaves(fisher_diag), jax.tree.leaves(delta)))
  )


def ewc_penalty_sketch(params, anchor, sketch, lam, n):
  """(lam/2) ||S J (theta - theta*)||^2 / n; unbiased for (lam/2) Delta^T (J^T J / n) Delta."""
  v = _sketch_apply(sketch, optax.tree.sub(params, anchor))
  return 0.5 * lam * jnp.sum(v * v) / _safe_n(n)


class EwcDiagState(NamedTuple):
  """anchor theta* and diagonal Fisher (both pytrees like params)."""

  anchor: Any
  fisher: Any


class EwcSketchState(NamedTuple):
  """anchor theta*, sketch S J (leaves (t,) + shape) and n, the examples it summarises."""

  anchor: Any
  sketch: Any
  n: Any


def ewc_state_diag(anchor, fisher) -> EwcDiagState:
  """The diagonal EWC state: anchor theta* and Fisher F (pytrees like params)."""
  return EwcDiagState(anchor=anchor, fisher=fisher)


def ewc_state_sketch(anchor, sketch, n) -> EwcSketchState:
  """The CountSketch EWC state: anchor theta*, S J (from count_sketch) and its n examples."""
  return EwcSketchState(anchor=anchor, sketch=sketch, n=jnp.asarray(n, jnp.float32))


def set_ewc_state(opt_state, state):
  """opt_state (e.g. of an optax.chain holding add_ewc_gradient) with its EWC state replaced.

  `state` replaces the EwcDiagState / EwcSketchState of the same kind inside opt_state,
  wherever the chain put it (optax.tree.set; no re-init, no indexing by position). Raises
  KeyError when opt_state holds no EWC state of that kind.
  """
  if not isinstance(state, (EwcDiagState, EwcSketchState)):
    raise ValueError(f"expected EwcDiagState or EwcSketchState, got {type(state).__name__}")
  return optax.tree.set(opt_state, **{type(state).__name__: state})


def ewc_penalty(params, state, lam):
  """The penalty for either state kind."""
  if isinstance(state, EwcDiagState):
    return ewc_penalty_diag(params, state.anchor, state.fisher, lam)
  if isinstance(state, EwcSketchState):
    return ewc_penalty_sketch(params, state.anchor, state.sketch, lam, state.n)
  raise ValueError(f"expected EwcDiagState or EwcSketchState, got {type(state).__name__}")


def ewc_gradient(params, state, lam):
  """Gradient of `ewc_penalty` in closed form.

  diag:   lam * F * (theta - theta*)
  sketch: lam * (S J)^T (S J Delta) / n  -- a contraction over the t rows, no JVP/VJP.
  """
  delta = optax.tree.sub(params, state.anchor)
  if isinstance(state, EwcDiagState):
    return jax.tree.map(lambda f, d: lam * f * d, state.fisher, delta)
  if isinstance(state, EwcSketchState):
    c = _sketch_apply(state.sketch, delta) * (lam / _safe_n(state.n))
    return jax.tree.map(lambda s: jnp.tensordot(c.astype(s.dtype), s, axes=1), state.sketch)
  raise ValueError(f"expected EwcDiagState or EwcSketchState, got {type(state).__name__}")


def add_ewc_gradient(
  lam, *, kind: str = "diag", width: int | None = None
) -> optax.GradientTransformation:
  """Adds grad of (lam/2) (theta - theta*)^T H (theta - theta*) to the updates.

  Use before the optimiser, e.g. `optax.chain(add_ewc_gradient(10.), optax.sgd(lr))`.
  `init(params)` returns a neutral state of the requested kind (anchor = params, zero
  curvature); put the real one in with `set_ewc_state(opt_state, ewc_state_diag(anchor,
  fisher))` or `ewc_state_sketch(anchor, sketch, n)` (same structure, so no retrace). `update` needs
  params (optax's third argument) and leaves the state unchanged.

  Args:
    lam: the EWC strength lambda (FedAF uses 10). It is closed over like a learning rate;
      to vary the strength per client without recompiling, scale the state instead
      (fisher by a, or sketch by sqrt(a)).
    kind: 'diag' or 'sketch' -- only shapes the neutral state returned by init; update
      dispatches on the state it is given.
    width: sketch rows t (required for kind='sketch').
  """
  if kind not in KINDS:
    raise ValueError(f"unknown EWC kind {kind!r}; allowed: {', '.join(KINDS)}")
  if kind == "sketch" and (width is None or int(width) < 1):
    raise ValueError(f"kind='sketch' needs width >= 1, got {width}")

  def init_fn(params):
    if kind == "diag":
      return EwcDiagState(anchor=params, fisher=optax.tree.zeros_like(params))
    sketch = jax.tree.map(lambda p: jnp.zeros((int(width),) + p.shape, p.dtype), params)
    return EwcSketchState(anchor=params, sketch=sketch, n=jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_ewc_gradient needs params: call update(updates, state, params)")
    g = ewc_gradient(params, state, lam)
    return optax.tree.add(updates, g), state

  return optax.GradientTransformation(init_fn, update_fn)
