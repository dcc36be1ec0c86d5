"""One copy of the training images: lookup-table normalisation, index blocks, runners."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fu_jax import data, fl, images, models


def _bits(a):
  return np.asarray(a, np.float32).view(np.uint32)


def _npz_dataset(tmp_path, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  path = str(tmp_path / "d.npz")
  np.savez(
    path,
    x=rng.integers(0, 256, (40, 5, 4, channels), dtype=np.uint8),
    y=np.arange(40) % 4,
    x_test=rng.integers(0, 256, (9, 5, 4, channels), dtype=np.uint8),
    y_test=np.arange(9) % 4,
  )
  return data.load_dataset("npz:" + path)


@pytest.mark.slow
def test_lookup_table_reproduces_the_float_images_bit_for_bit(tmp_path):
  for ds in (data.load_dataset("digits"), _npz_dataset(tmp_path)):
    assert ds.train_codes.dtype == np.uint8 and ds.train_lut.shape == (256, ds.x_train.shape[-1])
    # Independent of images.py: numpy fancy indexing per channel.
    by_hand = np.stack(
      [ds.train_lut[ds.train_codes[..., c], c] for c in range(ds.x_train.shape[-1])], -1
    )
    np.testing.assert_array_equal(_bits(by_hand), _bits(ds.x_train))
    table = images.dataset_table(ds)
    got = table.gather(jnp.arange(len(ds.y_train)))
    np.testing.assert_array_equal(_bits(got), _bits(ds.x_train))
  # digits' 1/16 scaling reproduces the former x / 16 exactly (multiplying by 2^-4 is exact).
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  assert np.all(datasets.load_digits().images == datasets.load_digits().images.astype(np.uint8))


def test_float_sources_keep_a_float_table(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "f.npz")
  np.savez(
    path,
    x=rng.normal(size=(20, 3, 3, 2)).astype(np.float32),
    y=np.arange(20) % 2,
    x_test=rng.normal(size=(4, 3, 3, 2)).astype(np.float32),
    y_test=np.arange(4) % 2,
  )
  ds = data.load_dataset("npz:" + path)
  assert ds.train_codes is None and ds.train_lut is None
  table = images.dataset_table(ds)
  assert table.lut is None and table.codes.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(table.gather(jnp.arange(20))), ds.x_train)


@pytest.mark.slow
def test_client_images_index_like_the_padded_block():
  ds = data.load_dataset("digits")
  parts = data.partition(
    ds.y_train, 7, kind="client_dirichlet", seed=0, alpha=0.3, size_sigma=1.0, min_size=1
  )
  old = data.stack_clients(ds.x_train, ds.y_train, parts)
  new = data.index_clients(ds.y_train, parts)
  for f in ("y", "valid", "count", "index"):
    np.testing.assert_array_equal(getattr(new, f), getattr(old, f))
  assert new.x is None
  x = images.ClientImages(jnp.asarray(new.index), images.dataset_table(ds))
  assert x.shape == old.x.shape and x.dtype == old.x.dtype and len(x) == 7
  np.testing.assert_array_equal(_bits(np.asarray(x)), _bits(old.x))  # padding rows: zeros
  np.testing.assert_array_equal(_bits(x[3]), _bits(old.x[3]))
  np.testing.assert_array_equal(_bits(x[0, :2]), _bits(old.x[0, :2]))
  mask = np.asarray(old.valid) & (np.asarray(old.y) == 2)
  np.testing.assert_array_equal(_bits(x[mask]), _bits(old.x[mask]))
  rows, cols = np.array([0, 6, 2]), np.array([1, 0, 3])
  np.testing.assert_array_equal(_bits(x[rows, cols]), _bits(old.x[rows, cols]))
  # Selecting clients by mapping over a data pytree selects index rows; the table rides along.
  idx = jnp.array([5, 1])
  took = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), (x, jnp.asarray(old.y)))
  assert isinstance(took[0], images.ClientImages) and took[0].table is x.table
  np.testing.assert_array_equal(_bits(np.asarray(took[0])), _bits(old.x[[5, 1]]))


def test_detach_attach_round_trip_and_shared_tables():
  ds = data.load_dataset("digits")
  table = images.dataset_table(ds)
  a = images.ClientImages(jnp.zeros((2, 3), jnp.int32), table)
  b = images.ClientImages(jnp.ones((2, 3), jnp.int32), table)
  tree, tables = images.detach({"a": a, "b": (b, jnp.ones(2))})
  assert len(tables) == 1 and tables[0][0] is table.codes  # one copy, passed once
  # Equal layouts give equal treedefs: jitted functions are reused, not retraced.
  again, _ = images.detach({"a": a, "b": (b, jnp.ones(2))})
  assert jax.tree.structure(tree) == jax.tree.structure(again)
  back = images.attach(tree, tables)
  np.testing.assert_array_equal(np.asarray(back["b"][0]), np.asarray(b))


@pytest.mark.slow
def test_map_client_blocks_equals_one_call_on_the_padded_block():
  from fu_jax import distill  # pylint: disable=g-import-not-at-top

  ds = data.load_dataset("digits")
  parts = data.partition(
    ds.y_train, 7, kind="client_dirichlet", seed=1, alpha=0.3, size_sigma=1.0, min_size=1
  )
  c = data.index_clients(ds.y_train, parts)
  x = images.ClientImages(jnp.asarray(c.index), images.dataset_table(ds))
  keys = jax.vmap(jax.random.key)(jnp.arange(7))
  counts = np.stack([np.bincount(c.y[k][c.valid[k]], minlength=10) for k in range(7)])
  sizes = distill.synthetic_sizes(counts, 0.05, None)
  b, nc = distill.synthetic_layout(sizes)
  seen = []

  @jax.jit
  def build(x, y, valid, keys, sizes):  # QuickDrop's init_sets: every client's synthetic set
    return jax.vmap(
      lambda *a: distill.init_synthetic(
        *a[:3], 10, key=a[3], chunk_size=b, num_chunks=nc, sizes=a[4]
      )
    )(x, y, valid, keys, sizes)

  def fn(imgs, *args):
    seen.append(imgs.shape[0])
    return build(imgs, *args)

  args = (jnp.asarray(c.y), jnp.asarray(c.valid), keys, jnp.asarray(sizes))
  whole = build(jnp.asarray(np.asarray(x)), *args)  # the padded block, one call
  blocks = images.map_client_blocks(fn, x, *args, block=3)
  assert seen == [3, 3, 3]  # the last block (one client) filled up to one shape
  chex.assert_trees_all_equal(blocks, whole)
  seen.clear()
  chex.assert_trees_all_equal(images.map_client_blocks(fn, x, *args, block=7), whole)
  assert seen == [7]


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loop", "vmap", "shard"])
def test_fedavg_rounds_bit_identical_to_the_padded_layout(kind):
  ds = data.load_dataset("digits")
  parts = data.partition(
    ds.y_train, 12, kind="client_dirichlet", seed=1, alpha=0.5, size_sigma=1.0, min_size=1
  )
  old = data.stack_clients(ds.x_train, ds.y_train, parts)
  x_new = images.ClientImages(jnp.asarray(old.index), images.dataset_table(ds))
  model = TinyCNN()
  params = model.init(jax.random.key(0), old.x[0, :1])["params"]
  runner = fl.ClientRunner(
    fl.sgd_program(models.logits_fn(model), optax.sgd(0.1)),
    kind=kind,
    epochs=2,
    batch_size=16,
    chunk_size=3,
  )
  out = []
  for x in (jnp.asarray(old.x), x_new):
    server = fl.server_init(params, optax.sgd(1.0))
    for r in range(2):
      res = fl.fedavg_round(
        server,
        runner,
        (x, jnp.asarray(old.y)),
        jnp.asarray(old.valid),
        None,
        seed=0,
        round_idx=r,
        client_weights=np.ones(12),
        num_sampled=5,
        server_opt=optax.sgd(1.0),
      )
      server = res.server
    out.append((server.params, res.metrics))
  chex.assert_trees_all_equal(out[0][0], out[1][0])
  assert out[0][1] == out[1][1]


@pytest.mark.slow
def test_runner_passes_the_table_as_an_argument_not_a_constant():
  """A ClientImages closed over by jit would embed the training set in the program."""
  codes = np.random.default_rng(0).integers(0, 256, (20000, 8, 8, 1), dtype=np.uint8)
  table = images.ImageTable(codes, np.linspace(-1, 1, 256, dtype=np.float32)[:, None])
  x = images.ClientImages(jnp.arange(64, dtype=jnp.int32).reshape(2, 32), table)
  y = jnp.zeros((2, 32), jnp.int32)
  valid = jnp.ones((2, 32), bool)
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
  apply = lambda p, xb: model.apply({"params": p}, xb.reshape((xb.shape[0], -1)))
  runner = fl.ClientRunner(
    fl.sgd_program(apply, optax.sgd(0.1)), kind="vmap", epochs=1, batch_size=8
  )
  data_d, tables = images.detach((x, y))
  state = runner._init(params, None, jnp.stack([jax.random.key(0)] * 2))
  order = jnp.tile(jnp.arange(32), (2, 1))
  keys = jnp.stack([jax.random.key(1)] * 2)
  hlo = runner._step.lower(state, data_d, valid, order, 0, keys, tables).as_text()
  assert len(hlo) < codes.nbytes / 10, len(hlo)  # the 1.3 MB table is not in the program
  res = runner.run(params, (x, y), valid, None, keys)  # and the public path runs
  assert np.all(np.isfinite(np.asarray(res.metrics["loss"])))
