"""Tests for fu_jax.distill: gradient matching (DC, Zhao et al. 2021) as used by QuickDrop."""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fu_jax import distill, losses
from fu_jax import tree as tu


class TinyCNN(nn.Module):
  # tanh: smooth in the inputs, so finite differences of the second-order gradient are valid.
  num_classes: int = 3
  act: Callable = nn.tanh

  @nn.compact
  def __call__(self, x):
    x = self.act(nn.Conv(4, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  num_classes: int = 10
  width: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


def _init_params(module, input_shape, seed):
  """Random init in numpy (LeCun normal kernels, zero biases): jitting flax's init costs
  seconds of XLA compile on CPU for the threefry initialisers, for nothing a test needs."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))["params"]
  rng = np.random.default_rng(seed)

  def init(leaf):
    if len(leaf.shape) < 2:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  return jax.tree.map(init, shapes)


def _apply(module):
  return lambda p, x: module.apply({"params": p}, x)


def _random_grads(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  n = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
    "conv": {"kernel": scale * n(3, 3, 2, 4), "bias": n(4)},
    "dense": {"kernel": n(5, 3), "bias": n(3)},
    "norm_scale": n(4),
  }


@functools.partial(jax.jit, static_argnames="metric")
def _match(g_real, g_syn, metric="ours"):
  return distill.match_loss(g_real, g_syn, metric=metric)


def _np_ours(g_real, g_syn):
  """DC's distance_wb summed over layers, written on Flax layout without moveaxis."""
  total = 0.0
  for r, s in zip(jax.tree.leaves(g_real), jax.tree.leaves(g_syn)):
    r, s = np.asarray(r, np.float64), np.asarray(s, np.float64)
    if r.ndim < 2:
      continue
    for o in range(r.shape[-1]):
      a, b = r[..., o].ravel(), s[..., o].ravel()
      total += 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-6)
  return total


def _np_vec(g):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])


# ----------------------------------------------------------------------------- match_loss


def test_match_loss_ours_matches_numpy_reference():
  g_real = _random_grads(0)
  g_syn = _random_grads(1, scale=3.0)
  got = _match(g_real, g_syn)
  np.testing.assert_allclose(got, _np_ours(g_real, g_syn), rtol=1e-5)
  # Biases and norm scales are ignored: changing them changes nothing.
  g_syn2 = jax.tree.map(lambda x: x, g_syn)
  g_syn2["conv"]["bias"] = -g_syn["conv"]["bias"]
  g_syn2["norm_scale"] = 7.0 * g_syn["norm_scale"]
  np.testing.assert_allclose(_match(g_real, g_syn2), got, rtol=1e-6)


def test_match_loss_ours_uses_last_axis_as_output_channel():
  # Per-output-channel cosine is invariant to scaling one output channel of g_syn but not to
  # scaling one input channel: that distinguishes the Flax layout from PyTorch's [out, ...].
  g_real = _random_grads(0)
  g_syn = _random_grads(1)
  base = _match(g_real, g_syn)
  out_scaled = jax.tree.map(lambda x: x, g_syn)
  out_scaled["conv"]["kernel"] = g_syn["conv"]["kernel"] * jnp.array([1.0, 5.0, 0.2, 3.0])
  np.testing.assert_allclose(_match(g_real, out_scaled), base, rtol=1e-5)
  in_scaled = jax.tree.map(lambda x: x, g_syn)
  in_scaled["dense"]["kernel"] = (
    g_syn["dense"]["kernel"] * jnp.array([1.0, 5.0, 0.2, 3.0, 9.0])[:, None]
  )
  assert abs(float(_match(g_real, in_scaled)) - float(base)) > 1e-3


@pytest.mark.parametrize("metric", distill.METRICS)
def test_match_loss_zero_for_equal_gradients(metric):
  g = _random_grads(3)
  np.testing.assert_allclose(_match(g, g, metric=metric), 0.0, atol=1e-4)


def test_match_loss_mse_and_cos_references():
  g_real = _random_grads(4)
  g_syn = _random_grads(5)
  r, s = _np_vec(g_real), _np_vec(g_syn)
  np.testing.assert_allclose(_match(g_real, g_syn, metric="mse"), np.sum((r - s) ** 2), rtol=1e-5)
  np.testing.assert_allclose(
    _match(g_real, g_syn, metric="cos"),
    1 - r @ s / (np.linalg.norm(r) * np.linalg.norm(s) + 1e-6),
    rtol=1e-5,
  )


def test_match_loss_bad_input():
  g = _random_grads(0)
  with pytest.raises(ValueError, match="ours"):
    distill.match_loss(g, g, metric="l1")
  with pytest.raises(ValueError, match="structure"):
    distill.match_loss(g, {"a": g["conv"]})


@pytest.mark.slow
def test_match_loss_gradient_finite_at_zero():
  g_real = _random_grads(0)
  zeros = jax.tree.map(jnp.zeros_like, g_real)
  for metric in distill.METRICS:
    grad = jax.jit(jax.grad(lambda s: distill.match_loss(g_real, s, metric=metric)))(zeros)
    assert bool(tu.tree_all_finite(grad)), metric


# ---------------------------------------------------------------------- per-class gradients


def _cnn_setup(act=nn.tanh):
  module = TinyCNN(3, act)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(12, 6, 6, 2)), jnp.float32)
  # Class 2 absent; the last two rows are padding (label 2 would otherwise count).
  y = jnp.array([0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 2, 2])
  mask = jnp.arange(12) < 10
  params = _init_params(module, (1, 6, 6, 2), seed=0)
  return _apply(module), params, x, y, mask


@pytest.fixture(scope="module")
def cnn():
  return _cnn_setup()


@pytest.mark.slow
def test_per_class_grads_equals_loop_and_combines_to_batch_gradient(cnn):
  apply_fn, params, x, y, mask = cnn

  @jax.jit
  def everything(p):
    by_method = {
      m: distill.per_class_grads(apply_fn, p, x, y, mask, 3, method=m)
      for m in ("per_example", "vmap", "unroll")
    }
    loop = [
      jax.grad(lambda q, c=c: losses.masked_ce(apply_fn(q, x), y, mask & (y == c)))(p)
      for c in range(3)
    ]
    full = jax.grad(lambda q: losses.masked_ce(apply_fn(q, x), y, mask))(p)
    counts = distill.class_counts(y, mask, 3)
    combined = distill.combine_class_grads(by_method["per_example"], counts)
    return by_method, loop, full, combined, counts

  by_method, loop, full, combined, counts = everything(params)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for method, got in by_method.items():
    for c in range(3):
      jax.tree.map(lambda a, b, c=c: close(a[c], b), got, loop[c])
    # Absent class: exactly zero.
    assert all(float(jnp.abs(a[2]).max()) == 0.0 for a in jax.tree.leaves(got)), method
  np.testing.assert_array_equal(counts, [5, 5, 0])
  jax.tree.map(close, combined, full)
  with pytest.raises(ValueError, match="per_example"):
    distill.per_class_grads(apply_fn, params, x, y, mask, 3, method="loop")


# --------------------------------------------------------------------------- synthetic sets


def test_synthetic_sizes():
  counts = np.array([0, 1, 99, 100, 101, 250, 1000])
  np.testing.assert_array_equal(distill.synthetic_sizes(counts, 0.01), [0, 1, 1, 1, 2, 3, 10])
  ref = [math.ceil(n * 0.1 - 1e-9) if n else 0 for n in counts]
  np.testing.assert_array_equal(distill.synthetic_sizes(counts, 0.1), ref)
  np.testing.assert_array_equal(
    distill.synthetic_sizes(counts, images_per_class=5), [0, 1, 5, 5, 5, 5, 5]
  )
  per_client = np.array([[3, 0, 250], [1000, 7, 0]])
  assert distill.synthetic_sizes(per_client, 0.01).shape == (2, 3)
  with pytest.raises(ValueError, match="scale"):
    distill.synthetic_sizes(counts, 0.0)
  with pytest.raises(ValueError, match="images_per_class"):
    distill.synthetic_sizes(counts, images_per_class=0)


def _client(n_per_class=(7, 0, 3), pad=2, shape=(4, 4, 1)):
  y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)] + [np.zeros(pad, int)])
  valid = np.arange(len(y)) < sum(n_per_class)
  # Image i is constant i+1 so every selected image can be traced back to its source row.
  x = np.broadcast_to((np.arange(len(y)) + 1.0).reshape(-1, 1, 1, 1), (len(y),) + shape).astype(
    np.float32
  )
  x = np.where(valid.reshape(-1, 1, 1, 1), x, 0.0)
  return x, y.astype(np.int32), valid


def test_init_synthetic_layout_and_sources():
  x, y, valid = _client()
  syn = distill.init_synthetic(x, y, valid, 3, scale=0.5, key=jax.random.PRNGKey(0))
  # sizes ceil(7*.5)=4, 0, ceil(3*.5)=2 -> one chunk of 4 per present class
  assert syn.x.shape == (2, 4, 4, 4, 1)
  np.testing.assert_array_equal(syn.valid, [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(syn.y, [[0] * 4, [2] * 4])
  _assert_distinct_sources(syn, x, y, valid, [4, 0, 2])
  fx, fy, fv = distill.flatten(syn)
  assert fx.shape == (8, 4, 4, 1) and fy.shape == (8,) and fv.shape == (8,)
  np.testing.assert_array_equal(fy[fv], [0, 0, 0, 0, 2, 2])


def _assert_distinct_sources(syn, x, y, valid, sizes):
  """Every valid slot holds a distinct real image of its chunk's class; padding is zero."""
  src = np.asarray(syn.x[..., 0, 0, 0]).astype(int) - 1  # source row per slot, -1 on padding
  sv, sy = np.asarray(syn.valid), np.asarray(syn.y)
  for c, size in enumerate(sizes):
    rows = src[sv & (sy == c)]
    assert len(rows) == size and len(set(rows.tolist())) == size
    assert all(valid[r] and y[r] == c for r in rows)
  assert np.all(np.asarray(syn.x)[~sv] == 0)


def test_init_synthetic_splits_large_classes_into_chunks():
  x, y, valid = _client((9, 0, 3, 1))
  syn = distill.init_synthetic(
    x, y, valid, 4, images_per_class=9, chunk_size=4, num_chunks=6, key=jax.random.PRNGKey(3)
  )
  # class 0: 9 images -> chunks of 4, 4, 1; class 2: 3; class 3: 1; one padding chunk
  np.testing.assert_array_equal(np.asarray(syn.valid).sum(1), [4, 4, 1, 3, 1, 0])
  np.testing.assert_array_equal(np.asarray(syn.y)[:, 0], [0, 0, 0, 2, 3, 0])
  assert (np.asarray(syn.y) == np.asarray(syn.y)[:, :1]).all()
  _assert_distinct_sources(syn, x, y, valid, [9, 0, 3, 1])
  np.testing.assert_array_equal(
    distill.class_masks(syn, (2, 3)), np.asarray(syn.valid) & np.isin(np.asarray(syn.y), (2, 3))
  )
  by_class = distill.images_by_class(syn, 4)
  assert [len(a) for a in by_class] == [9, 0, 3, 1]
  with pytest.raises(ValueError, match="num_chunks=4 < 5"):
    distill.init_synthetic(
      x, y, valid, 4, images_per_class=9, chunk_size=4, num_chunks=4, key=jax.random.PRNGKey(3)
    )


def test_synthetic_layout_picks_the_cheapest_chunk_size():
  balanced = np.full((3, 10), 6)
  assert distill.synthetic_layout(balanced) == (6, 10)  # one chunk per class
  skewed = np.array([[60, 1, 1, 3, 0, 0, 25, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])

  # Work sum_k chunks_k(b) * (b + 4), by hand: b=4 (25+20)*8 = 360, b=5 (20+10)*9 = 270,
  # b=6 (18+10)*10 = 280, b=7 (16+10)*11 = 286, b=10 (12+10)*14 = 308, b=60 (5+10)*64 = 960.
  assert distill.CHUNK_OVERHEAD_IMAGES == 4
  assert distill.synthetic_layout(skewed) == (5, 20)  # C: the first client's 20 chunks
  assert distill.synthetic_layout(skewed, chunk_size=20) == (20, 10)
  assert distill.synthetic_layout(np.zeros((2, 3), int)) == (1, 1)
  with pytest.raises(ValueError, match="chunk_size"):
    distill.synthetic_layout(skewed, chunk_size=0)


@pytest.mark.slow
def test_init_synthetic_images_per_class_and_vmap_over_clients():
  clients = [_client((7, 0, 3)), _client((1, 5, 4))]
  counts = np.stack([np.bincount(y[v], minlength=3) for _, y, v in clients])
  sizes = distill.synthetic_sizes(counts, images_per_class=3)
  np.testing.assert_array_equal(sizes, [[3, 0, 3], [1, 3, 3]])
  b, c = distill.synthetic_layout(sizes, chunk_size=3)
  assert (b, c) == (3, 3)
  xs, ys, vs = (np.stack(a) for a in zip(*clients))
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  init = jax.jit(
    jax.vmap(
      lambda x, y, v, s, k: distill.init_synthetic(
        x, y, v, 3, sizes=s, chunk_size=b, num_chunks=c, key=k
      )
    )
  )
  syn = init(xs, ys, vs, jnp.asarray(sizes), keys)
  assert syn.x.shape == (2, 3, 3, 4, 4, 1)
  for k in range(2):
    one = jax.tree.map(lambda a, k=k: a[k], syn)
    _assert_distinct_sources(one, *clients[k], sizes[k])
  one = distill.init_synthetic(*clients[1], 3, images_per_class=3, chunk_size=3, key=keys[1])
  np.testing.assert_array_equal(one.x, syn.x[1])
  with pytest.raises(ValueError, match="synthetic_layout"):
    jax.vmap(lambda x, y, v, s, k: distill.init_synthetic(x, y, v, 3, sizes=s, key=k))(
      xs, ys, vs, jnp.asarray(sizes), keys
    )


# ------------------------------------------------------------------------- synthetic update


def _update_setup(setup):
  apply_fn, params, x, y, mask = setup
  g_real, counts = jax.jit(
    lambda p: (
      distill.per_class_grads(apply_fn, p, x, y, mask, 3),
      distill.class_counts(y, mask, 3),
    )
  )(params)
  syn_x = jnp.asarray(np.random.default_rng(11).normal(size=(3, 2, 6, 6, 2)), jnp.float32)
  syn_valid = jnp.array([[True, True], [True, False], [True, True]])
  syn = distill.SyntheticSet(syn_x, jnp.repeat(jnp.arange(3)[:, None], 2, 1), syn_valid)
  return apply_fn, params, g_real, counts, syn


@pytest.fixture(scope="module")
def update(cnn):
  """The CNN setup plus one compiled synthetic_update (SGD lr 0.05, momentum 0.5)."""
  apply_fn, params, g_real, counts, syn = _update_setup(cnn)
  opt = optax.sgd(0.05, momentum=0.5)
  step = jax.jit(
    lambda s, g, st, n: distill.synthetic_update(
      apply_fn, params, s, g, st, optimizer=opt, real_counts=n, vectorize="vmap"
    )
  )
  return apply_fn, params, g_real, counts, syn, opt, step


@pytest.mark.slow
def test_class_match_losses_vmap_equals_unroll_and_loop(update):
  apply_fn, params, g_real, counts, syn, opt, step = update

  @jax.jit
  def everything(sx):
    by = [
      distill.class_match_losses(apply_fn, params, syn._replace(x=sx), g_real, vectorize=v)
      for v in ("vmap", "unroll")
    ]
    g_syn = [
      jax.grad(lambda p, c=c: losses.masked_ce(apply_fn(p, sx[c]), syn.y[c], syn.valid[c]))(params)
      for c in range(3)
    ]
    return by, g_syn

  (by_vmap, by_unroll), g_syn = everything(syn.x)
  np.testing.assert_allclose(by_vmap, by_unroll, rtol=1e-5)
  for c in range(3):
    np.testing.assert_allclose(
      by_vmap[c], _np_ours(jax.tree.map(lambda a, c=c: a[c], g_real), g_syn[c]), rtol=1e-5
    )
  # synthetic_update reports the sum over active classes only (class 2 has no real data).
  _, _, loss = step(syn, g_real, opt.init(syn.x), counts)
  np.testing.assert_allclose(loss, by_vmap[0] + by_vmap[1], rtol=1e-5)
  with pytest.raises(ValueError, match="unroll"):
    distill.class_match_losses(apply_fn, params, syn, g_real, vectorize="pmap")


def test_synthetic_update_lowers_match_loss_and_masks_classes(update):
  _, _, g_real, counts, syn, opt, step = update
  state = opt.init(syn.x)
  s, state, loss0 = step(syn, g_real, state, counts)
  losses_ = [float(loss0)]
  for _ in range(4):
    s, state, loss = step(s, g_real, state, counts)
    losses_.append(float(loss))
  assert losses_[-1] < losses_[0] - 1e-2, losses_
  assert bool(tu.tree_all_finite(s.x))
  # Class 2 (no real data) and the padding slot of class 1 never change.
  np.testing.assert_array_equal(s.x[2], syn.x[2])
  np.testing.assert_array_equal(s.x[1, 1], syn.x[1, 1])
  assert float(jnp.abs(s.x[0] - syn.x[0]).max()) > 0


def _one_image_chunks(syn):
  """The same images re-laid as chunks of one slot each (valid ones in class order), plus
  one all-padding chunk; and the index of each original valid slot in it."""
  xs, ys, idx = [], [], {}
  for c in range(syn.y.shape[0]):
    for j in range(syn.y.shape[1]):
      if syn.valid[c, j]:
        idx[(c, j)] = len(xs)
        xs.append(syn.x[c, j])
        ys.append(c)
  xs.append(jnp.zeros_like(syn.x[0, 0]))
  ys.append(0)
  valid = jnp.arange(len(xs)) < len(xs) - 1
  return distill.SyntheticSet(jnp.stack(xs)[:, None], jnp.asarray(ys)[:, None], valid[:, None]), idx


@pytest.mark.slow
def test_chunked_layout_matches_one_chunk_per_class(update):
  # Class 0 and 2 span two chunks each: the per-class synthetic gradient, the match losses
  # and the image step must be those of the one-chunk-per-class layout.
  apply_fn, params, g_real, counts, syn, opt, step = update
  chunked, idx = _one_image_chunks(syn)
  for v in ("vmap", "unroll"):
    # Jitted, as the distilling program calls it (op by op, this test took a minute).
    match = jax.jit(
      lambda s, v=v: distill.class_match_losses(apply_fn, params, s, g_real, vectorize=v)
    )
    np.testing.assert_allclose(match(chunked), match(syn), rtol=1e-5)
  s_ref, st_ref, loss_ref = step(syn, g_real, opt.init(syn.x), counts)
  s_new, st_new, loss_new = step(chunked, g_real, opt.init(chunked.x), counts)
  np.testing.assert_allclose(loss_new, loss_ref, rtol=1e-5)
  for (c, j), i in idx.items():
    np.testing.assert_allclose(s_new.x[i, 0], s_ref.x[c, j], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(s_new.x[-1], chunked.x[-1])  # the padding chunk


def test_nonzero_classes(update):
  g_real, counts = update[2], update[3]
  np.testing.assert_array_equal(distill.nonzero_classes(g_real), np.asarray(counts) > 0)
  g = jax.tree.map(lambda a: a.at[0].set(0.0).at[2].set(1e-30), g_real)
  np.testing.assert_array_equal(distill.nonzero_classes(g), [False, True, True])


def test_synthetic_update_skipped_class_keeps_momentum_and_empty_set_no_nan(update):
  _, _, g_real, counts, syn, opt, step = update
  # Class 1 has no synthetic images at all.
  syn = syn._replace(valid=syn.valid.at[1].set(False))
  s1, st1, _ = step(syn, g_real, opt.init(syn.x), counts)
  assert bool(tu.tree_all_finite(s1.x)) and bool(tu.tree_all_finite(st1))
  np.testing.assert_array_equal(s1.x[1], syn.x[1])
  assert float(jnp.abs(s1.x[0] - syn.x[0]).max()) > 0
  # Next batch without real data of class 0: class 0 must not move by stale momentum.
  counts2 = counts.at[0].set(0)
  g_real2 = jax.tree.map(lambda a: a.at[0].set(0.0), g_real)
  s2, st2, loss2 = step(s1, g_real2, st1, counts2)
  assert float(loss2) == 0.0  # classes 0 and 2 lack real data, class 1 lacks images
  np.testing.assert_array_equal(s2.x, s1.x)
  jax.tree.map(np.testing.assert_array_equal, st2, st1)


def test_second_order_gradient_matches_finite_difference(update):
  _, _, g_real, counts, syn, opt, step = update
  lr = 0.05
  # From zero momentum the first SGD step is -lr * dL/dx: read the gradient off the step.
  grad = (step(syn, g_real, opt.init(syn.x), counts)[0].x - syn.x) / -lr
  loss = lambda sx: step(syn._replace(x=sx), g_real, opt.init(syn.x), counts)[2]
  # Active classes (0, 1) on valid slots only: the others are frozen by design.
  keep = (syn.valid & (jnp.arange(3) < 2)[:, None])[..., None, None, None]
  direction = jnp.asarray(np.random.default_rng(5).normal(size=syn.x.shape), jnp.float32) * keep
  eps = 1e-2
  fd = (loss(syn.x + eps * direction) - loss(syn.x - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=2e-2)
  # A padding slot gets no gradient.
  assert float(jnp.abs(grad[1, 1]).max()) == 0.0


# -------------------------------------------------------------- dataset-condensation check


def _digits():
  sklearn_datasets = pytest.importorskip("sklearn.datasets")
  d = sklearn_datasets.load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(y))
  te, tr = perm[:497], perm[497:]
  x = (x - x[tr].mean()) / x[tr].std()
  return x[tr], y[tr], x[te], y[te]


@pytest.mark.slow
def test_distilled_digits_beat_random_real_subset():
  """DC sanity check (Zhao et al. 2021, Table 1 in miniature): 10 images/class distilled by
  gradient matching over 10 random MLP inits (100 image steps) train a fresh model better
  than the 10 random real images/class they started from. benchmarks/distill_sanity.py runs
  the larger version (CNN too) and prints the accuracies."""
  xtr, ytr, xte, yte = _digits()
  module = MLP(width=64)
  apply_fn = _apply(module)
  net_opt = optax.sgd(0.01, momentum=0.9)
  img_opt = distill.default_image_optimizer()

  @jax.jit
  def distil_step(params, syn, state, x, y):
    valid = jnp.ones(y.shape, bool)
    g_real = distill.per_class_grads(apply_fn, params, x, y, valid, 10)
    return distill.synthetic_update(
      apply_fn,
      params,
      syn,
      g_real,
      state,
      optimizer=img_opt,
      real_counts=distill.class_counts(y, valid, 10),
    )

  @jax.jit
  def train(params, x, y, valid):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda q: losses.masked_ce(apply_fn(q, x), y, valid))(p)
      u, s = net_opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (params, net_opt.init(params)), None, length=10)[0][0]

  @jax.jit
  def accuracy(params):
    return jnp.mean(losses.correct(apply_fn(params, xte), yte))

  acc_syn, acc_rand = [], []
  for seed in range(3):
    syn0 = distill.init_synthetic(
      xtr, ytr, np.ones(len(ytr), bool), 10, images_per_class=10, key=jax.random.PRNGKey(seed)
    )
    syn, state = syn0, img_opt.init(syn0.x)
    rng = np.random.default_rng(seed)
    for it in range(10):
      params = _init_params(module, (1, 8, 8, 1), seed=1000 * seed + it)
      for ol in range(10):
        b = rng.choice(len(ytr), 256, replace=False)
        syn, state, _ = distil_step(params, syn, state, xtr[b], ytr[b])
        if ol < 9:
          params = train(params, *distill.flatten(syn))
    params0 = _init_params(module, (1, 8, 8, 1), seed=10**6 + seed)
    for s, out in ((syn, acc_syn), (syn0, acc_rand)):
      p = params0
      for _ in range(30):  # 300 steps
        p = train(p, *distill.flatten(s))
      out.append(float(accuracy(p)))
  print(f"distilled {acc_syn} random {acc_rand}")
  assert np.mean(acc_syn) > np.mean(acc_rand), (acc_syn, acc_rand)
