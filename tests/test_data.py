"""Tests for fu_jax.data: sources, partitioning, padded client blocks."""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fu_jax import containers, data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# --------------------------------------------------------------------------------------------
# Helpers (independent of the code under test)


def write_idx(path, array, code=0x08, gz=False, dims=None):
  """Writes an IDX file by hand: 0x0000, type code, ndim, big-endian uint32 dims, data."""
  array = np.asarray(array)
  dims = array.shape if dims is None else dims
  dtype = {0x08: ">u1", 0x09: ">i1", 0x0C: ">i4", 0x0D: ">f4"}[code]
  payload = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
  payload += array.astype(dtype).tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(payload) if gz else payload)
  return path


def make_idx_dir(directory, gz=False, n_train=12, n_test=5, hw=(4, 3), num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
    "x_train": rng.integers(0, 256, (n_train,) + hw, dtype=np.uint8),
    "y_train": np.arange(n_train) % num_classes,
    "x_test": rng.integers(0, 256, (n_test,) + hw, dtype=np.uint8),
    "y_test": np.arange(n_test) % (num_classes - 1),
  }
  os.makedirs(directory, exist_ok=True)
  suffix = ".gz" if gz else ""
  for key, stem in data.IDX_FILES.items():
    write_idx(os.path.join(directory, stem + suffix), arrays[key], gz=gz)
  return arrays


def ref_standardise(train, test):
  """Per-channel (x - mean) / std with train statistics, computed in float64."""
  train, test = train.astype(np.float64), test.astype(np.float64)
  if train.ndim == 3:
    train, test = train[..., None], test[..., None]
  mean = train.mean(axis=(0, 1, 2))
  std = train.std(axis=(0, 1, 2))
  return (train - mean) / std, (test - mean) / std


def assert_exact_cover(parts, n):
  allidx = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def class_labels(n, num_classes, seed=0):
  return np.random.default_rng(seed).integers(0, num_classes, n)


# --------------------------------------------------------------------------------------------
# Partitioning


def test_iid_covers_every_sample_once_and_is_balanced():
  labels = class_labels(103, 5)
  parts = data.partition_iid(labels, 7, seed=3)
  assert len(parts) == 7
  assert_exact_cover(parts, 103)
  sizes = [p.size for p in parts]
  assert max(sizes) - min(sizes) <= 1
  # Shuffled, not the identity order cut into blocks.
  assert not np.array_equal(np.concatenate(parts), np.arange(103))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_covers_every_sample_once_with_min_size(alpha):
  labels = class_labels(600, 10)
  parts = data.partition_dirichlet(labels, 10, alpha, seed=0, min_size=5)
  assert len(parts) == 10
  assert_exact_cover(parts, 600)
  assert min(p.size for p in parts) >= 5
  hist = data.label_histogram(parts, labels, 10)
  np.testing.assert_array_equal(hist.sum(0), np.bincount(labels, minlength=10))


def test_dirichlet_alpha_controls_label_skew():
  labels = class_labels(2000, 10)

  def top_class_share(alpha):
    hist = data.label_histogram(
      data.partition_dirichlet(labels, 10, alpha, seed=1, min_size=1), labels, 10
    )
    return np.mean(hist.max(1) / hist.sum(1))

  assert top_class_share(0.05) > 0.6  # nearly one class per client
  assert top_class_share(1000.0) < 0.2  # nearly the global mix (0.1 per class)


def test_dirichlet_tiny_alpha_many_clients_fails_fast_and_clearly():
  labels = class_labels(1000, 10)
  # alpha=0.01: every class lands almost entirely on one client, so with 100 clients at
  # least ~90 are empty and min_size=10 can never be met: bounded retries, then an error.
  with pytest.raises(ValueError, match=r"min_size=10.*alpha=0.01"):
    data.partition_dirichlet(labels, 100, 0.01, seed=0, min_size=10, max_retries=1000)
  # Without a minimum it succeeds and still assigns every sample once.
  parts = data.partition_dirichlet(labels, 100, 0.01, seed=0, min_size=0)
  assert len(parts) == 100
  assert_exact_cover(parts, 1000)


def test_dirichlet_impossible_min_size_raises_before_sampling():
  with pytest.raises(ValueError, match=r"min_size=11 with num_clients=10 needs 110"):
    data.partition_dirichlet(class_labels(100, 3), 10, 1.0, seed=0, min_size=11)


@pytest.mark.parametrize(
  "kind,kw",
  [
    ("iid", {}),
    ("dirichlet", dict(alpha=0.3, min_size=2)),
    ("client_dirichlet", dict(alpha=0.3, size_sigma=1.0, min_size=1)),
    ("shards", dict(classes_per_client=2)),
  ],
)
def test_partition_is_deterministic_in_seed(kind, kw):
  labels = class_labels(300, 10)
  a = data.partition(labels, 8, kind=kind, seed=5, **kw)
  b = data.partition(labels, 8, kind=kind, seed=5, **kw)
  c = data.partition(labels, 8, kind=kind, seed=6, **kw)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(x.size == y.size and np.array_equal(x, y) for x, y in zip(a, c))
  assert all(p.dtype == np.int64 for p in a)


@pytest.mark.parametrize("alpha,sigma", [(0.05, 0.0), (0.1, 1.0), (1.0, 2.0), (100.0, 0.5)])
def test_client_dirichlet_covers_every_sample_once(alpha, sigma):
  # Imbalanced classes (one nearly empty) so classes run out while clients still need data.
  labels = np.repeat(np.arange(6), [400, 250, 150, 120, 70, 3])
  labels = labels[np.random.default_rng(0).permutation(labels.size)]
  parts = data.partition_client_dirichlet(labels, 37, alpha, seed=2, size_sigma=sigma, min_size=4)
  assert len(parts) == 37
  assert_exact_cover(parts, labels.size)
  sizes = np.array([p.size for p in parts])
  assert sizes.sum() == labels.size and sizes.min() >= 4
  hist = data.label_histogram(parts, labels, 6)
  np.testing.assert_array_equal(hist.sum(0), np.bincount(labels))
  for p in parts:  # shuffled within the client, not grouped by class
    assert p.dtype == np.int64
  if sigma == 0:
    assert sizes.max() - sizes.min() <= 1


def test_client_dirichlet_size_sigma_spreads_sizes_around_the_mean():
  labels = class_labels(20000, 10)

  def cv(sigma):  # coefficient of variation of the client sizes
    parts = data.partition_client_dirichlet(labels, 400, 1.0, seed=0, size_sigma=sigma)
    sizes = np.array([p.size for p in parts])
    assert sizes.sum() == 20000  # mean exactly n / N
    return sizes.std() / sizes.mean()

  cvs = [cv(s) for s in (0.0, 0.5, 1.0)]
  assert cvs[0] < 0.01
  # Log-normal: cv = sqrt(exp(sigma^2) - 1) = 0.53 at 0.5, 1.31 at 1.0 (sampling noise aside).
  assert 0.4 < cvs[1] < 0.7 and 0.9 < cvs[2] < 1.8, cvs


def test_client_dirichlet_alpha_controls_label_skew():
  labels = class_labels(20000, 10)

  def top_class_share(alpha):  # mean over clients of the largest class's share
    parts = data.partition_client_dirichlet(labels, 40, alpha, seed=1)
    hist = data.label_histogram(parts, labels, 10)
    return np.mean(hist.max(1) / hist.sum(1))

  shares = [top_class_share(a) for a in (0.05, 0.3, 3.0, 1000.0)]
  assert all(a > b for a, b in zip(shares, shares[1:])), shares  # skew grows as alpha falls
  assert shares[0] > 0.55 and shares[-1] < 0.15, shares


def test_client_dirichlet_follows_each_clients_mixture_while_classes_last():
  # Independent check of the rule: with one client the only constraint is supply, so the
  # client simply gets everything; with two equal clients at huge alpha, each gets close to
  # half of every class (the mixtures are ~uniform and supply is shared fairly).
  labels = class_labels(4000, 4)
  (only,) = data.partition_client_dirichlet(labels, 1, 0.1, seed=0)
  assert_exact_cover([only], 4000)
  hist = data.label_histogram(data.partition_client_dirichlet(labels, 2, 1e4, seed=0), labels, 4)
  np.testing.assert_allclose(hist[0] / hist.sum(0), 0.5, atol=0.05)


def test_client_dirichlet_ten_thousand_clients():
  labels = np.repeat(np.arange(10), 6000)  # Fashion-MNIST's train label counts
  parts = data.partition(
    labels, 10000, kind="client_dirichlet", seed=0, alpha=0.1, size_sigma=1.0, min_size=1
  )
  assert len(parts) == 10000
  assert_exact_cover(parts, 60000)
  assert min(p.size for p in parts) >= 1


def test_shards_one_class_per_client():
  labels = np.repeat(np.arange(10), [30, 31, 32, 33, 34, 35, 36, 37, 38, 39])
  parts = data.partition_shards(labels, 10, 1, seed=0)
  assert_exact_cover(parts, labels.size)
  owned = [np.unique(labels[p]) for p in parts]
  assert all(o.size == 1 for o in owned)
  assert sorted(int(o[0]) for o in owned) == list(range(10))  # each class to one client
  for p, o in zip(parts, owned):
    assert p.size == np.sum(labels == o[0])


def test_shards_k_classes_balanced_holders_even_split():
  labels = class_labels(700, 10)
  parts = data.partition_shards(labels, 7, 2, seed=4)
  assert_exact_cover(parts, 700)
  hist = data.label_histogram(parts, labels, 10)
  assert np.all((hist > 0).sum(1) == 2)  # exactly two classes each
  holders = (hist > 0).sum(0)
  assert set(holders.tolist()) <= {1, 2}  # 7*2=14 slots over 10 classes
  for c in range(10):
    shares = hist[hist[:, c] > 0, c]
    assert shares.max() - shares.min() <= 1


def test_shards_many_clients_one_class():
  labels = np.repeat(np.arange(4), 25)
  parts = data.partition_shards(labels, 8, 1, seed=0)
  hist = data.label_histogram(parts, labels, 4)
  np.testing.assert_array_equal((hist > 0).sum(0), [2, 2, 2, 2])
  assert sorted(hist[hist > 0].tolist()) == [12] * 4 + [13] * 4  # 25 split 13 + 12


def test_shards_uncovered_classes_and_tiny_classes_raise():
  labels = np.repeat(np.arange(10), 5)
  with pytest.raises(ValueError, match=r"= 4 < 10 classes"):
    data.partition_shards(labels, 4, 1, seed=0)
  tiny = np.concatenate([np.repeat(np.arange(3), 20), [3]])
  with pytest.raises(ValueError, match=r"class 3 has 1 examples for 2"):
    data.partition_shards(tiny, 8, 1, seed=0)


@pytest.mark.parametrize(
  "kwargs,pattern",
  [
    (dict(num_clients=0, kind="iid"), r"num_clients.*>= 1.*got 0"),
    (dict(num_clients=-3, kind="dirichlet"), r"num_clients.*got -3"),
    (dict(num_clients=2.5, kind="iid"), r"num_clients.*got 2.5"),
    (dict(num_clients=51, kind="iid"), r"num_clients=51 exceeds.*50"),
    (dict(num_clients=4, kind="dirichlet", alpha=0.0), r"alpha.*> 0.*got 0.0"),
    (dict(num_clients=4, kind="dirichlet", alpha=-1.0), r"alpha.*got -1.0"),
    (dict(num_clients=4, kind="dirichlet", alpha=float("nan")), r"alpha.*got nan"),
    (dict(num_clients=4, kind="shards", classes_per_client=0), r"classes_per_client.*\[1, 5\].*0"),
    (dict(num_clients=4, kind="shards", classes_per_client=6), r"classes_per_client.*\[1, 5\].*6"),
    (dict(num_clients=4, kind="pathological"), r"'pathological'.*iid.*dirichlet.*shards"),
    (dict(num_clients=4, kind="client_dirichlet", size_sigma=-0.5), r"size_sigma.*>= 0.*-0.5"),
    (dict(num_clients=4, kind="client_dirichlet", alpha=0.0), r"alpha.*got 0.0"),
    (
      dict(num_clients=4, kind="client_dirichlet", min_size=13),
      r"min_size=13 with num_clients=4 needs 52 examples, only 50",
    ),
  ],
)
def test_partition_rejects_bad_arguments(kwargs, pattern):
  labels = np.arange(50) % 5
  with pytest.raises(ValueError, match=pattern):
    data.partition(labels, seed=0, **kwargs)


def test_label_histogram_matches_loop():
  labels = class_labels(90, 6)
  parts = data.partition_iid(labels, 4, seed=2)
  hist = data.label_histogram(parts, labels, 7)
  assert hist.shape == (4, 7)
  for i, p in enumerate(parts):
    for c in range(7):
      assert hist[i, c] == sum(1 for j in p if labels[j] == c)


# --------------------------------------------------------------------------------------------
# stack_clients


def test_stack_clients_padding_valid_count_index():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 3, 2, 1)).astype(np.float32)
  y = (np.arange(20) % 4).astype(np.int32)
  parts = [np.array([5, 1, 17]), np.array([], np.int64), np.array([0, 2, 4, 6, 8])]
  for pad_to in (None, 8):
    cd = data.stack_clients(x, y, parts, pad_to=pad_to)
    assert isinstance(cd, containers.ClientData)
    max_n = 5 if pad_to is None else 8
    assert cd.x.shape == (3, max_n, 3, 2, 1) and cd.x.dtype == np.float32
    assert cd.y.shape == (3, max_n) and cd.y.dtype == np.int32
    assert cd.valid.dtype == np.bool_ and cd.count.dtype == np.int32
    assert cd.index.dtype == np.int32
    np.testing.assert_array_equal(cd.count, [3, 0, 5])
    np.testing.assert_array_equal(cd.valid.sum(1), cd.count)
    for i, p in enumerate(parts):
      n = p.size
      np.testing.assert_array_equal(cd.index[i, :n], p)
      np.testing.assert_array_equal(cd.index[i, n:], -1)
      assert cd.valid[i, :n].all() and not cd.valid[i, n:].any()
      np.testing.assert_array_equal(cd.x[i, :n], x[p])
      np.testing.assert_array_equal(cd.y[i, :n], y[p])
      assert not cd.x[i, n:].any() and not cd.y[i, n:].any()


def test_stack_clients_rejects_bad_input():
  x, y = np.zeros((5, 2, 2, 1), np.float32), np.zeros(5, np.int32)
  with pytest.raises(ValueError, match=r"pad_to=2 is smaller than the largest client \(3\)"):
    data.stack_clients(x, y, [np.array([0, 1, 2])], pad_to=2)
  with pytest.raises(ValueError, match=r"parts\[1\] has indices outside \[0, 5\)"):
    data.stack_clients(x, y, [np.array([0]), np.array([5])])
  with pytest.raises(ValueError, match=r"x has 5 examples but y has 4"):
    data.stack_clients(x, y[:4], [np.array([0])])


def test_stack_clients_of_partition_roundtrip():
  labels = class_labels(64, 4)
  x = np.arange(64, dtype=np.float32).reshape(64, 1, 1, 1)
  parts = data.partition(labels, 5, kind="dirichlet", alpha=0.5, seed=0, min_size=2)
  cd = data.stack_clients(x, labels, parts)
  got = cd.index[cd.valid]
  np.testing.assert_array_equal(np.sort(got), np.arange(64))
  np.testing.assert_array_equal(cd.x[cd.valid][:, 0, 0, 0], got.astype(np.float32))
  np.testing.assert_array_equal(cd.y[cd.valid], labels[got])


# --------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_split_and_standardisation():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  ds = data.load_dataset("digits", seed=0)
  assert ds.name == "digits" and ds.num_classes == 10
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_test.shape[1:] == (8, 8, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
  assert ds.x_train.shape[0] == ds.y_train.shape[0]
  full = np.bincount(datasets.load_digits().target, minlength=10)
  np.testing.assert_array_equal(
    np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10), full
  )
  # Stratified 25% test split.
  np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), np.round(0.25 * full))
  np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(), 1.0, atol=1e-5)
  assert abs(ds.x_test.mean()) < 0.1  # test uses train statistics: close, not exact
  again = data.load_dataset("digits", seed=0)
  np.testing.assert_array_equal(again.x_train, ds.x_train)
  other = data.load_dataset("digits", seed=1)
  assert not np.array_equal(other.y_train, ds.y_train)


# --------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_exact(tmp_path, gz):
  arrays = make_idx_dir(tmp_path / "d", gz=gz)
  ds = data.load_dataset(f"idx:{tmp_path / 'd'}")
  want_train, want_test = ref_standardise(arrays["x_train"] / 255.0, arrays["x_test"] / 255.0)
  assert ds.x_train.shape == (12, 4, 3, 1) and ds.x_test.shape == (5, 4, 3, 1)
  np.testing.assert_allclose(ds.x_train, want_train, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ds.x_test, want_test, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
  np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 4


def test_read_idx_dtypes_and_mixed_compression(tmp_path):
  ints = np.array([[-5, 7], [100000, 0]], np.int32)
  np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "a", ints, 0x0C)), ints)
  floats = np.array([1.5, -2.25], np.float32)
  np.testing.assert_array_equal(
    data.read_idx(write_idx(tmp_path / "b", floats, 0x0D, gz=True)), floats
  )
  # A directory mixing raw and gzip files loads too.
  arrays = make_idx_dir(tmp_path / "d", gz=False)
  stem = os.path.join(tmp_path / "d", data.IDX_FILES["x_test"])
  os.remove(stem)
  write_idx(stem + ".gz", arrays["x_test"], gz=True)
  ds = data.load_dataset(f"idx:{tmp_path / 'd'}")
  assert ds.x_test.shape == (5, 4, 3, 1)


def _corrupt(directory, key, how):
  """Rewrites one IDX file of a good directory in a broken way; returns its path."""
  path = os.path.join(directory, data.IDX_FILES[key])
  raw = open(path, "rb").read()
  if how == "missing":
    os.remove(path)
  elif how == "magic":
    open(path, "wb").write(b"\x08\x08" + raw[2:])
  elif how == "type":
    open(path, "wb").write(raw[:2] + b"\x07" + raw[3:])
  elif how == "truncated":
    open(path, "wb").write(raw[:-3])
  elif how == "trailing":
    open(path, "wb").write(raw + b"\x00")
  elif how == "header":
    open(path, "wb").write(raw[:9])
  elif how == "gz_truncated":
    os.remove(path)
    path += ".gz"
    open(path, "wb").write(gzip.compress(raw)[:-10])
  elif how == "count":
    write_idx(path, np.zeros(11, np.uint8))  # 11 labels for 12 images
  elif how == "negative":
    write_idx(path, -np.ones(12, np.int8), code=0x09)
  elif how == "label_rank":
    write_idx(path, np.zeros((12, 2, 2), np.uint8))
  elif how == "empty":
    open(path, "wb").write(b"")
  return path


@pytest.mark.parametrize(
  "key,how,pattern",
  [
    ("y_test", "missing", r"file not found"),
    ("x_train", "magic", r"bad IDX magic number 0x0808"),
    ("x_train", "type", r"bad IDX magic number"),
    ("x_train", "truncated", r"truncated, header says shape \(12, 4, 3\)"),
    ("y_train", "trailing", r"1 unexpected trailing bytes"),
    ("x_test", "header", r"truncated header"),
    ("x_test", "gz_truncated", r"corrupt or truncated gzip"),
    ("y_train", "count", r"has 12 images but .* has 11 labels"),
    ("y_train", "negative", r"labels must be >= 0"),
    ("y_test", "label_rank", r"expected labels \[n\]"),
    ("x_train", "empty", r"too short for an IDX header"),
  ],
)
def test_idx_malformed_raises_with_path(tmp_path, key, how, pattern):
  directory = str(tmp_path / "d")
  make_idx_dir(directory)
  path = _corrupt(directory, key, how)
  with pytest.raises(data.DataError, match=pattern) as err:
    data.load_dataset(f"idx:{directory}")
  assert os.path.join(directory, data.IDX_FILES[key]) in str(err.value)
  if how == "missing":
    assert isinstance(err.value, FileNotFoundError)
  assert path  # the corrupted file exists or was removed as intended


def test_idx_missing_directory(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope: no such directory"):
    data.load_dataset(f"idx:{missing}")


@pytest.mark.slow
def test_idx_real_fashion_mnist():
  # Debian's dataset-fashion-mnist, installed by the README's test command (.ci/run).
  ds = data.load_dataset(f"idx:{FASHION_DIR}")
  assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 6000))
  np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(ds.x_train.std(), 1.0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# npz and source dispatch


def test_npz_round_trip_nhwc_float_and_nhw_uint16(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 3, 3, 2)).astype(np.float64) * 5 + 2
  xt = rng.normal(size=(4, 3, 3, 2)) * 5 + 2
  y, yt = np.arange(10) % 3, np.array([0, 6, 1, 2])
  path = str(tmp_path / "a.npz")
  np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
  ds = data.load_dataset(f"npz:{path}")
  want, want_t = ref_standardise(x, xt)
  np.testing.assert_allclose(ds.x_train, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ds.x_test, want_t, rtol=1e-5, atol=1e-5)
  assert ds.num_classes == 7 and ds.y_test.dtype == np.int32
  assert ds.name == f"npz:{path}"

  x16 = rng.integers(0, 60000, (6, 2, 5), dtype=np.uint16)
  path16 = str(tmp_path / "b.npz")
  np.savez(path16, x=x16, y=np.arange(6), x_test=x16[:2], y_test=np.array([1.0, 0.0]))
  ds = data.load_dataset(f"npz:{path16}")
  assert ds.x_train.shape == (6, 2, 5, 1) and ds.num_classes == 6
  want, _ = ref_standardise(x16, x16[:2])
  np.testing.assert_allclose(ds.x_train, want, rtol=1e-5, atol=1e-5)


def test_max_test_takes_a_seeded_subset(tmp_path):
  x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1)
  path = str(tmp_path / "a.npz")
  np.savez(path, x=x, y=np.arange(20) % 2, x_test=x[:8], y_test=np.zeros(8, int))
  a = data.load_dataset(f"npz:{path}", max_test=3, seed=1)
  b = data.load_dataset(f"npz:{path}", max_test=3, seed=1)
  full = data.load_dataset(f"npz:{path}", seed=1)
  assert a.x_train.shape == (20, 1, 1, 1) and a.x_test.shape == (3, 1, 1, 1)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  np.testing.assert_array_equal(a.x_train, full.x_train)  # the training split is untouched
  # Three distinct rows of the full test split, in file order, with their values.
  rows = [int(np.flatnonzero(full.x_test[:, 0, 0, 0] == v)[0]) for v in a.x_test[:, 0, 0, 0]]
  assert rows == sorted(set(rows)) and len(rows) == 3
  with pytest.raises(ValueError, match=r"max_test must be a positive int.*0"):
    data.load_dataset(f"npz:{path}", max_test=0)


@pytest.mark.parametrize(
  "arrays,pattern",
  [
    (
      dict(x=np.zeros((3, 2, 2)), y=np.zeros(3, int), x_test=np.zeros((1, 2, 2))),
      r"missing arrays \['y_test'\]",
    ),
    (
      dict(
        x=np.zeros((3, 2, 2)),
        y=np.zeros(2, int),
        x_test=np.zeros((1, 2, 2)),
        y_test=np.zeros(1, int),
      ),
      r"train has 3 images but 2 labels",
    ),
    (
      dict(
        x=np.zeros((3, 2, 2)),
        y=np.array([0, -1, 2]),
        x_test=np.zeros((1, 2, 2)),
        y_test=np.zeros(1, int),
      ),
      r"labels must be >= 0, found -1",
    ),
    (
      dict(
        x=np.zeros((3, 2, 2)),
        y=np.array([0, 0.5, 2]),
        x_test=np.zeros((1, 2, 2)),
        y_test=np.zeros(1, int),
      ),
      r"whole numbers",
    ),
    (
      dict(
        x=np.zeros((3, 2, 2)),
        y=np.zeros(3, int),
        x_test=np.zeros((1, 2, 3)),
        y_test=np.zeros(1, int),
      ),
      r"same \[H, W, C\]",
    ),
    (
      dict(
        x=np.zeros((3, 2)), y=np.zeros(3, int), x_test=np.zeros((1, 2)), y_test=np.zeros(1, int)
      ),
      r"expected images \[n, H, W\]",
    ),
    (
      dict(
        x=np.full((3, 2, 2), np.nan),
        y=np.zeros(3, int),
        x_test=np.zeros((1, 2, 2)),
        y_test=np.zeros(1, int),
      ),
      r"NaN or Inf",
    ),
  ],
)
def test_npz_malformed_raises_with_path(tmp_path, arrays, pattern):
  path = str(tmp_path / "bad.npz")
  np.savez(path, **arrays)
  with pytest.raises(data.DataError, match=pattern) as err:
    data.load_dataset(f"npz:{path}")
  assert path in str(err.value)


def test_npz_missing_and_unreadable_files(tmp_path):
  missing = str(tmp_path / "none.npz")
  with pytest.raises(FileNotFoundError, match="none.npz: file not found"):
    data.load_dataset(f"npz:{missing}")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(data.DataError, match=r"garbage.npz: not a readable .npz"):
    data.load_dataset(f"npz:{garbage}")


@pytest.mark.parametrize("source", ["mnist", "foo:bar", "idx:", "npz:", "tfds:", "Digits", 3])
def test_unknown_source_lists_allowed(source):
  with pytest.raises(data.DataError, match=r"digits.*idx:<dir>.*tfds:<name>.*npz:<file>"):
    data.load_dataset(source)


# --------------------------------------------------------------------------------------------
# Area resize (used for CelebA)


def ref_area_resize(img, out_h, out_w):
  """Loop reference: each output pixel integrates the input over its footprint."""
  h, w = img.shape[:2]
  out = np.zeros((out_h, out_w) + img.shape[2:])
  sh, sw = h / out_h, w / out_w
  for o in range(out_h):
    for p in range(out_w):
      acc = 0.0
      for i in range(h):
        oy = max(0.0, min(i + 1, (o + 1) * sh) - max(i, o * sh))
        for j in range(w):
          ox = max(0.0, min(j + 1, (p + 1) * sw) - max(j, p * sw))
          acc = acc + oy * ox * img[i, j]
      out[o, p] = acc / (sh * sw)
  return out


def test_area_resize_block_mean_and_fractional_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 9, 3)).astype(np.float32)
  got = data.area_resize(x, 2, 3)
  block = x.reshape(2, 2, 3, 3, 3, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(got, block, rtol=1e-5, atol=1e-6)
  y = rng.normal(size=(1, 7, 5, 2)).astype(np.float32)
  got = data.area_resize(y, 3, 4)
  np.testing.assert_allclose(got[0], ref_area_resize(y[0], 3, 4), rtol=1e-5, atol=1e-5)
  const = np.full((1, 218, 178, 3), 7.0, np.float32)
  np.testing.assert_allclose(data.celeb_a_image(const), 7.0, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# TFDS through tfds.testing.mock_data (no TensorFlow, no prepared files)


@pytest.fixture
def tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")

  def mock(num_examples):
    # USE_CODE: feature specs come from the builder class; no metadata files are needed.
    return tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
    )

  return tfds, mock


def _raw_split(tfds, name, split):
  source = tfds.data_source(name, split=split, download=False)
  return [source[i] for i in range(len(source))]


def test_tfds_mnist_mock(tfds_mock):
  tfds, mock = tfds_mock
  with mock(12):
    ds = data.load_dataset("tfds:mnist", data_dir="/nonexistent/tfds")
    train = _raw_split(tfds, "mnist", "train")
    test = _raw_split(tfds, "mnist", "test")
  assert ds.name == "tfds:mnist" and ds.num_classes == 10
  assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_train.dtype == np.float32
  np.testing.assert_array_equal(ds.y_train, [int(r["label"]) for r in train])
  np.testing.assert_array_equal(ds.y_test, [int(r["label"]) for r in test])
  want, want_t = ref_standardise(
    np.stack([r["image"] for r in train]) / 255.0, np.stack([r["image"] for r in test]) / 255.0
  )
  np.testing.assert_allclose(ds.x_train, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ds.x_test, want_t, rtol=1e-4, atol=1e-4)


def test_tfds_celeb_a_mock_four_classes(tfds_mock):
  tfds, mock = tfds_mock
  with mock(10):
    ds = data.load_dataset("tfds:celeb_a", max_test=4, seed=0)
    train = _raw_split(tfds, "celeb_a", "train")
  assert ds.num_classes == 4
  assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
  want_y = [
    2 * bool(r["attributes"]["Male"]) + bool(r["attributes"]["Mouth_Slightly_Open"]) for r in train
  ]
  np.testing.assert_array_equal(ds.y_train, want_y)
  assert set(want_y) != {want_y[0]}  # the mock draws varied attributes, so this is a real test
  faces = np.stack([r["image"] for r in train]).astype(np.float64)
  crop = faces[:, 20:198]  # 218x178 -> centre 178x178; area_resize is checked on its own above
  resized = data.area_resize(crop, 32, 32)
  want, _ = ref_standardise(resized / 255.0, resized[:1] / 255.0)
  np.testing.assert_allclose(ds.x_train, want, rtol=1e-4, atol=1e-4)


def test_tfds_unknown_name_and_unprepared_dir(tfds_mock, tmp_path):
  del tfds_mock
  with pytest.raises(data.DataError, match=r"imagenet2012.*supported.*'celeb_a'.*'mnist'"):
    data.load_dataset("tfds:imagenet2012")
  with pytest.raises(data.DataError, match=r"not prepared") as err:
    data.load_dataset("tfds:mnist", data_dir=str(tmp_path))
  assert str(tmp_path) in str(err.value)


def test_module_is_import_light():
  code = (
    "import sys, fu_jax.data; "
    'print([m for m in ("tensorflow_datasets", "sklearn", "tensorflow", "jax") '
    "if m in sys.modules])"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Training-set subsample (data.train_size)


def test_stratified_subset_sizes_proportions_and_seed():
  labels = np.repeat(np.arange(4), [50, 30, 15, 5])
  rng = np.random.default_rng(3)
  labels = labels[rng.permutation(labels.size)]
  for size in (1, 7, 33, 99, 100):
    keep = data.stratified_subset(labels, size, seed=0)
    assert keep.size == size and np.unique(keep).size == size  # distinct
    assert np.all(np.diff(keep) > 0)  # file order
    got = np.bincount(labels[keep], minlength=4)
    want = size * np.bincount(labels) / labels.size
    assert np.all(np.abs(got - want) < 1), (size, got, want)  # within one example per class
  a = data.stratified_subset(labels, 40, seed=5)
  np.testing.assert_array_equal(a, data.stratified_subset(labels, 40, seed=5))
  assert not np.array_equal(a, data.stratified_subset(labels, 40, seed=6))
  for bad in (0, 101, -1, 2.5, True):
    with pytest.raises(ValueError, match=r"train_size must be an int in \[1, 100\]"):
      data.stratified_subset(labels, bad, seed=0)


def test_subsample_train_keeps_exact_values_and_test_split():
  ds = data.load_dataset("digits", seed=0)
  sub = data.subsample_train(ds, 300, seed=0)
  keep = data.stratified_subset(ds.y_train, 300, seed=0)
  np.testing.assert_array_equal(sub.x_train, ds.x_train[keep])  # same normalisation
  np.testing.assert_array_equal(sub.y_train, ds.y_train[keep])
  assert sub.x_test is ds.x_test and sub.y_test is ds.y_test
  assert data.subsample_train(ds, 0, seed=0) is ds
