"""Data for the simulation: sources, partitioning over clients, padded client blocks.

Three steps (docs/design.md §3.1):

1. `load_dataset(source)` -> `types.Dataset`: float32 NHWC images standardised per channel
   with TRAIN statistics, int32 labels in [0, num_classes). Sources:

     digits        scikit-learn's bundled 8x8 digits (offline), seeded stratified 75/25 split.
     idx:<dir>     MNIST-format IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
                   t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or gzip), e.g. the
                   full Fashion-MNIST in /usr/share/datasets/fashion-mnist.
     tfds:<name>   `tfds.data_source` (array_record, no TensorFlow): mnist, fashion_mnist,
                   cifar10, svhn_cropped, celeb_a (FedAF's 4 classes, 32x32, see below).
     npz:<file>    arrays x, y, x_test, y_test.

   Normalisation: x/255 for uint8 (x/16 for digits), then (x - mean_c) / std_c with the
   per-channel mean and std of the train split (std 0 -> 1). Anything missing, truncated or
   inconsistent raises `DataError` (a ValueError) naming the path and what was expected.

2. `partition(labels, num_clients, kind=iid|dirichlet|client_dirichlet|shards, seed=...)` ->
   list of index arrays into the train set, deterministic in `seed`, each already shuffled.
   `dirichlet` splits each class over the clients (needs every client to receive enough:
   fails at thousands of clients and small alpha); `client_dirichlet` gives each client its
   own mixture and a log-normal size (cross-device scale).

3. `index_clients(y, parts)` -> `types.ClientData` of [clients, max_n] index blocks into the
   training set (index=-1, valid=False on padding; fedjax-style, padding never changes a
   result); the images stay in one copy (`fu_jax.images`). `stack_clients(x, y, parts)`
   builds the padded image blocks [clients, max_n, H, W, C] instead (small tests, the
   before/after benchmark).

Heavy dependencies (scikit-learn, tensorflow_datasets) are imported lazily inside the loaders
that need them, so `import fu_jax.data` costs only numpy.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence

import numpy as np

from fu_jax import types

# --------------------------------------------------------------------------------------------
# Errors


class DataError(ValueError):
  """Missing, truncated or malformed data, or an unknown source. Names the path involved."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A file or directory a source needs does not exist (catchable as FileNotFoundError too)."""


SOURCES = ("digits", "idx:<dir>", "tfds:<name>", "npz:<file>")

# --------------------------------------------------------------------------------------------
# Normalisation and validation shared by all sources


def _as_nhwc(x: np.ndarray, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise DataError(f"{what}: expected images [n, H, W] or [n, H, W, C], got shape {x.shape}")
  if x.shape[0] == 0:
    raise DataError(f"{what}: contains no examples (shape {x.shape})")
  if not (
    np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_
  ):
    raise DataError(f"{what}: expected integer or float images, got dtype {x.dtype}")
  return x


def _unit_scale(x: np.ndarray, top: int | None = None) -> np.ndarray:
  """A new float32 array, in [0, 1] for unsigned integer images (x * 1/top, top = the dtype's
  max unless given, e.g. 16 for digits).

  Float images keep their values. The per-channel standardisation that follows removes any
  constant scale, so this only keeps intermediate values small and makes the documented
  [0, 1] step explicit.
  """
  out = x.astype(np.float32)  # always a copy: later steps work in place
  if np.issubdtype(x.dtype, np.unsignedinteger):
    out *= np.float32(1.0 / (top or np.iinfo(x.dtype).max))
  return out


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std over (n, H, W), accumulated in float64 chunk by chunk."""
  total = np.zeros(x.shape[-1], np.float64)
  total_sq = np.zeros(x.shape[-1], np.float64)
  for i in range(0, x.shape[0], chunk):
    block = x[i : i + chunk].astype(np.float64)
    total += block.sum(axis=(0, 1, 2))
    total_sq += np.square(block).sum(axis=(0, 1, 2))
  count = x.shape[0] * x.shape[1] * x.shape[2]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  std = np.where(std > 1e-8, std, 1.0)  # a constant channel is centred, not blown up
  return mean, std


def _check_finite(x: np.ndarray, what: str):
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    raise DataError(f"{what}: images contain NaN or Inf values")


def _standardise_inplace(x_train: np.ndarray, *others: np.ndarray):
  """Standardises x_train and `others` in place with x_train's per-channel statistics."""
  mean, std = _channel_stats(x_train)
  for x in (x_train,) + others:
    x -= mean.astype(np.float32)
    x /= std.astype(np.float32)


def standardise(
  x_train: np.ndarray, x_test: np.ndarray, name: str = "images"
) -> tuple[np.ndarray, np.ndarray]:
  """(x - mean_c) / std_c for both splits (new float32 arrays) with the TRAIN split's
  per-channel mean and std over (n, H, W); a constant channel gets std 1."""
  x_train = np.array(x_train, np.float32)
  x_test = np.array(x_test, np.float32)
  _check_finite(x_train, name)
  _check_finite(x_test, name)
  _standardise_inplace(x_train, x_test)
  return x_train, x_test


def _check_labels(y, what: str, num_classes: int | None = None) -> np.ndarray:
  """int32 labels, 1-D, integral, >= 0 and (if given) < num_classes."""
  y = np.asarray(y)
  if y.ndim != 1:
    raise DataError(f"{what}: expected labels of shape [n], got shape {y.shape}")
  if np.issubdtype(y.dtype, np.floating):
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
      raise DataError(f"{what}: float labels must be whole numbers")
  elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
    raise DataError(f"{what}: expected integer labels, got dtype {y.dtype}")
  if y.size and y.min() < 0:
    raise DataError(f"{what}: labels must be >= 0, found {y.min()}")
  if y.size and y.max() >= np.iinfo(np.int32).max:
    raise DataError(f"{what}: label {y.max()} does not fit int32")
  if num_classes is not None and y.size and y.max() >= num_classes:
    raise DataError(f"{what}: labels must be < num_classes={num_classes}, found {y.max()}")
  return y.astype(np.int32)


def _subset(n: int, cap: int | None, rng: np.random.Generator, what: str) -> np.ndarray:
  """Sorted indices of a seeded random subset of size min(n, cap) (all of them if cap=None)."""
  if cap is None:
    return np.arange(n)
  if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
    raise ValueError(f"{what} must be a positive int or None, got {cap!r}")
  if cap >= n:
    return np.arange(n)
  return np.sort(rng.choice(n, size=int(cap), replace=False))


def _finish(
  name,
  x_train,
  y_train,
  x_test,
  y_test,
  *,
  num_classes=None,
  seed=0,
  max_test=None,
  scaled=False,
  top=None,
) -> types.Dataset:
  """Validate, optionally subsample, scale, standardise and pack a Dataset.

  uint8 training images are also kept as codes with the lookup table that normalises them
  (`Dataset.train_codes`, `train_lut`), computed by the same operations as x_train.
  """
  x_train = _as_nhwc(x_train, f"{name} train images")
  x_test = _as_nhwc(x_test, f"{name} test images")
  y_train = _check_labels(y_train, f"{name} train labels", num_classes)
  y_test = _check_labels(y_test, f"{name} test labels", num_classes)
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    if x.shape[0] != y.shape[0]:
      raise DataError(f"{name}: {split} has {x.shape[0]} images but {y.shape[0]} labels")
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(
      f"{name}: train images {x_train.shape[1:]} and test images "
      f"{x_test.shape[1:]} must have the same [H, W, C]"
    )
  rng = np.random.default_rng(seed)
  keep = _subset(x_test.shape[0], max_test, rng, "max_test")
  if keep.size < x_test.shape[0]:
    x_test, y_test = x_test[keep], y_test[keep]
  if num_classes is None:
    num_classes = int(max(y_train.max(), y_test.max())) + 1
  _check_finite(x_train, f"{name} train")
  _check_finite(x_test, f"{name} test")
  codes = lut = None
  if scaled:  # already float in [0, 1]; copy so the caller's arrays are never modified
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
  else:
    if x_train.dtype == np.uint8:
      codes = x_train
      values = np.arange(256, dtype=np.uint8)[:, None, None, None]
      lut = _unit_scale(np.broadcast_to(values, (256, 1, 1, x_train.shape[-1])), top)
    x_train, x_test = _unit_scale(x_train, top), _unit_scale(x_test, top)
  _standardise_inplace(x_train, x_test, *(() if lut is None else (lut,)))
  if lut is not None:
    lut = lut.reshape(256, -1)
  return types.Dataset(
    x_train, y_train, x_test, y_test, int(num_classes), name, train_codes=codes, train_lut=lut
  )


# --------------------------------------------------------------------------------------------
# digits


def _load_digits(seed: int, test_fraction: float = 0.25, **caps) -> types.Dataset:
  """sklearn's 8x8 digits (values 0..16) with a seeded split stratified by class."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  bunch = datasets.load_digits()
  images = bunch.images.astype(np.uint8)  # whole numbers 0..16, scaled by 1/16 in _finish
  labels = bunch.target.astype(np.int64)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * idx.size))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  train = rng.permutation(np.concatenate(train))
  test = rng.permutation(np.concatenate(test))
  return _finish(
    "digits",
    images[train],
    labels[train],
    images[test],
    labels[test],
    num_classes=10,
    seed=seed,
    top=16,
    **caps,
  )


# --------------------------------------------------------------------------------------------
# IDX (MNIST format)

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (raw or gzip, detected from the content) into a native-endian array.

  Layout: 2 zero bytes, a type code, the number of dimensions d, d big-endian uint32 sizes,
  then the data, big-endian, row-major. The data must be exactly as long as the sizes say.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError as e:
    raise DataNotFoundError(f"{path}: file not found") from e
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e})") from e
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e
  if len(raw) < 4:
    raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header (4 bytes magic)")
  zero, code, ndim = raw[:2], raw[2], raw[3]
  if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
    raise DataError(
      f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x0000TTDD "
      f"with type TT in {{{', '.join(f'{k:02x}' for k in _IDX_DTYPES)}}} and "
      f"DD >= 1 dimensions"
    )
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(
      f"{path}: truncated header, {len(raw)} bytes, expected {header} for {ndim} dimensions"
    )
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[code])
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  got = len(raw) - header
  if got < expected:
    raise DataError(
      f"{path}: truncated, header says shape {shape} ({expected} data bytes) but the file has {got}"
    )
  if got > expected:
    raise DataError(
      f"{path}: {got - expected} unexpected trailing bytes after shape {shape} "
      f"({expected} data bytes)"
    )
  data = np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise DataNotFoundError(
    f"{os.path.join(directory, stem)}[.gz]: file not found; an idx: "
    f"directory must hold {', '.join(IDX_FILES.values())} (each raw or .gz)"
  )


def _load_idx(directory: str, **kwargs) -> types.Dataset:
  if not os.path.isdir(directory):
    raise DataNotFoundError(f"{directory}: no such directory (source idx:<dir>)")
  arrays, paths = {}, {}
  for key, stem in IDX_FILES.items():
    paths[key] = _find_idx(directory, stem)
    arrays[key] = read_idx(paths[key])
  for split in ("train", "test"):
    x, y = arrays["x_" + split], arrays["y_" + split]
    px, py = paths["x_" + split], paths["y_" + split]
    if x.ndim not in (3, 4):
      raise DataError(f"{px}: expected images [n, rows, cols], got shape {x.shape}")
    if y.ndim != 1:
      raise DataError(f"{py}: expected labels [n], got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
      raise DataError(f"{px} has {x.shape[0]} images but {py} has {y.shape[0]} labels")
    _check_labels(y, py)
  return _finish(
    f"idx:{directory}",
    arrays["x_train"],
    arrays["y_train"],
    arrays["x_test"],
    arrays["y_test"],
    **kwargs,
  )


# --------------------------------------------------------------------------------------------
# npz


def _load_npz(path: str, **kwargs) -> types.Dataset:
  keys = ("x", "y", "x_test", "y_test")
  if not os.path.isfile(path):
    raise DataNotFoundError(
      f"{path}: file not found (source npz:<file> with arrays {', '.join(keys)})"
    )
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in keys if k not in f.files]
      if missing:
        raise DataError(
          f"{path}: missing arrays {missing}; expected {list(keys)}, found {sorted(f.files)}"
        )
      arrays = {k: f[k] for k in keys}
  except DataError:
    raise
  except Exception as e:  # zipfile.BadZipFile, pickled objects, truncated members, ...
    raise DataError(f"{path}: not a readable .npz with arrays {list(keys)} ({e!r})") from e
  return _finish(
    f"npz:{path}", arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], **kwargs
  )


# --------------------------------------------------------------------------------------------
# TFDS (array_record data sources, no TensorFlow)

CELEB_A_SIZE = 32
CELEB_A_ATTRIBUTES = ("Male", "Mouth_Slightly_Open")  # label = 2 * Male + Mouth_Slightly_Open

# name -> (train split, test split, num_classes)
TFDS_DATASETS = {
  "mnist": ("train", "test", 10),
  "fashion_mnist": ("train", "test", 10),
  "cifar10": ("train", "test", 10),
  "svhn_cropped": ("train", "test", 10),
  "celeb_a": ("train", "test", 4),
}


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of area (box) resampling: overlap of each input pixel with the
  output pixel's footprint [o s, (o+1) s), s = n_in / n_out, divided by s; rows sum to 1."""
  scale = n_in / n_out
  lo = np.arange(n_out)[:, None] * scale
  pix = np.arange(n_in)[None, :]
  overlap = np.clip(np.minimum(pix + 1, lo + scale) - np.maximum(pix, lo), 0.0, None)
  return overlap / scale


def area_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """Area-average resize of float/int images [n, H, W, C] -> float32 [n, height, width, C].

  out[o, p] = sum_{h,w} A_h[o, h] A_w[p, w] x[h, w]: each output pixel is the mean of the input
  area it covers (fractional overlaps weighted), i.e. what PIL's BOX filter or OpenCV's
  INTER_AREA do for downscaling. For integer factors it is exactly the block mean.
  """
  images = np.asarray(images)
  a_h = _area_matrix(images.shape[1], height).astype(np.float32)
  a_w = _area_matrix(images.shape[2], width).astype(np.float32)
  return np.einsum("oh,nhwc,pw->nopc", a_h, images.astype(np.float32), a_w, optimize=True)


def celeb_a_image(images: np.ndarray, size: int = CELEB_A_SIZE) -> np.ndarray:
  """CelebA's 218x178 faces -> centre square crop (178x178) -> area resize to size x size."""
  h, w = images.shape[1:3]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return area_resize(images[:, top : top + s, left : left + s], size, size)


def celeb_a_label(attributes) -> int:
  """FedAF's 4 CelebA classes: 2 * Male + Mouth_Slightly_Open (0 neither, 1 mouth only,
  2 male only, 3 both)."""
  return 2 * int(bool(attributes["Male"])) + int(bool(attributes["Mouth_Slightly_Open"]))


def _read_tfds_split(source, name: str, keys: np.ndarray, chunk: int = 256):
  """Reads records `keys` of one split; images are converted chunk by chunk so CelebA's
  full-size faces never sit in memory all at once."""
  xs, ys = [], []
  for i in range(0, keys.size, chunk):
    # Per-item reads: `__getitems__` is broken under tfds.testing.mock_data (4.9.10), and
    # decoding, not reading, dominates the cost anyway.
    records = [source[int(k)] for k in keys[i : i + chunk]]
    images = np.stack([np.asarray(r["image"]) for r in records])
    if name == "celeb_a":
      xs.append(celeb_a_image(images) / np.float32(255.0))
      ys.append(np.array([celeb_a_label(r["attributes"]) for r in records], np.int64))
    else:  # raw: _finish scales (and keeps uint8 codes)
      xs.append(images)
      ys.append(np.array([int(r["label"]) for r in records], np.int64))
  return np.concatenate(xs), np.concatenate(ys)


def _tfds_hint(tfds, name: str, data_dir: str | None) -> str:
  """Why a data source failed to open, in words a user can act on (best effort)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      return (
        f"the dataset is not prepared in {builder.data_dir} (fu_jax never downloads); "
        f'prepare it elsewhere with file_format="array_record" and copy it there'
      )
    return (
      f"prepared in {builder.data_dir} but not readable as array_record; "
      f're-prepare it with file_format="array_record"'
    )
  except Exception:  # pylint: disable=broad-except
    return 'prepare it with file_format="array_record"'


def _load_tfds(name: str, data_dir: str | None, seed: int, max_test=None):
  if name not in TFDS_DATASETS:
    raise DataError(f"tfds:{name}: unsupported dataset; supported: {sorted(TFDS_DATASETS)}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  train_split, test_split, num_classes = TFDS_DATASETS[name]
  rng = np.random.default_rng(seed)
  out = []
  for split, cap, cap_name in ((train_split, None, "train"), (test_split, max_test, "max_test")):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # not prepared, prepared as tfrecord, unknown version, ...
      raise DataError(
        f"tfds:{name} split {split!r} (data_dir={data_dir}): cannot open an "
        f"array_record data source; {_tfds_hint(tfds, name, data_dir)} "
        f"({type(e).__name__}: {e})"
      ) from e
    n = len(source)
    if n == 0:
      raise DataError(f"tfds:{name} split {split!r} (data_dir={data_dir}) is empty")
    out.extend(_read_tfds_split(source, name, _subset(n, cap, rng, cap_name)))
  return _finish(f"tfds:{name}", *out, num_classes=num_classes, seed=seed, scaled=name == "celeb_a")


# --------------------------------------------------------------------------------------------
# Entry point


def load_dataset(
  source: str, *, seed: int = 0, data_dir: str | None = None, max_test: int | None = None
) -> types.Dataset:
  """Loads, validates and normalises a data set.

  Args:
    source: 'digits' | 'idx:<dir>' | 'tfds:<name>' | 'npz:<file>' (see the module docstring).
    seed: the digits train/test split and the max_test subset derive from it.
    data_dir: TFDS data directory (tfds: only; None = TFDS's default).
    max_test: optional cap on the test split; a seeded random subset (kept in file order)
      is used. For tfds: only the selected records are read and decoded. (A training-set
      subsample is `subsample_train`: class-stratified, statistics of the full set.)

  Returns:
    `types.Dataset` with float32 [n, H, W, C] images standardised with train statistics,
    int32 labels and num_classes (known for digits/tfds, max label + 1 for idx/npz).

  Raises:
    DataError (ValueError; DataNotFoundError is also a FileNotFoundError) naming the path.
  """
  if not isinstance(source, str):
    raise DataError(f"source must be a string, one of {SOURCES}, got {source!r}")
  caps = dict(max_test=max_test)
  if source == "digits":
    return _load_digits(seed, **caps)
  prefix, sep, rest = source.partition(":")
  if sep and rest and prefix == "idx":
    return _load_idx(rest, seed=seed, **caps)
  if sep and rest and prefix == "npz":
    return _load_npz(rest, seed=seed, **caps)
  if sep and rest and prefix == "tfds":
    return _load_tfds(rest, data_dir, seed, **caps)
  raise DataError(f"unknown data source {source!r}; expected one of {SOURCES}")


# --------------------------------------------------------------------------------------------
# Training-set subsample

# Independent numpy stream for the subsample (SeedSequence spawn key), so changing
# data.train_size never shifts any other draw made from the seed.
STREAM_TRAIN_SIZE = 1
# ... and the calibration split (`split_calibration`) its own.
STREAM_CALIBRATION = 2


def stratified_subset(
  labels, size: int, seed: int, stream: int = STREAM_TRAIN_SIZE, name: str = "train_size"
) -> np.ndarray:
  """Sorted indices of a seeded class-stratified subset of `size` examples.

  Class c keeps floor(size * n_c / n) examples plus one for the classes with the largest
  remainders (ties broken at random), so the class proportions of the subset match the
  full set's to within one example and the sizes sum to `size` exactly; within a class
  the examples are drawn uniformly without replacement. The draw comes from
  SeedSequence(seed, spawn_key=(stream,)): its own stream of the seed (STREAM_TRAIN_SIZE
  for the training subsample; `name` names the size in errors).

  Raises:
    ValueError: size outside [1, n].
  """
  labels = np.asarray(labels)
  n = labels.size
  size = _check_int(size, name, 1, n)
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
  classes, counts = np.unique(labels, return_counts=True)
  quota = size * counts / n
  take = np.floor(quota).astype(np.int64)
  short = size - int(take.sum())
  if short:
    frac = quota - take
    order = np.lexsort((rng.random(classes.size), -frac))
    take[order[:short]] += 1
  keep = [
    rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take)
  ]
  return np.sort(np.concatenate(keep)).astype(np.int64)


def subsample_train(ds: types.Dataset, size: int, seed: int) -> types.Dataset:
  """`ds` with its training split cut to a seeded class-stratified subset (`stratified_subset`,
  kept in file order); size 0 keeps everything. The test split and the normalisation
  (statistics of the full training split) are unchanged, so a kept image has exactly the
  values it has in the full set."""
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size == 0:
    return ds
  keep = stratified_subset(ds.y_train, size, seed)
  codes = None if ds.train_codes is None else ds.train_codes[keep]
  return ds._replace(x_train=ds.x_train[keep], y_train=ds.y_train[keep], train_codes=codes)


def split_calibration(
  ds: types.Dataset, train_size: int, calibration_size: int, seed: int
) -> tuple[types.Dataset, tuple[np.ndarray, np.ndarray] | None]:
  """(training data, calibration split (x, y) or None): `subsample_train`, plus a
  class-stratified split of `calibration_size` training images that no client trains on
  (held by the server, e.g. to estimate the confidence of a model on data it never saw:
  fu_jax.calibration).

  Where it comes from: with a training subsample (train_size > 0) from the training images
  outside it (its own seeded stream, STREAM_CALIBRATION), so the training data, and every
  model trained on it, are exactly those without a calibration split; with the whole
  training split (train_size 0) it is carved off the training split before partitioning
  (the clients then hold the other images, and the trained model changes). The test split
  is never used: it is the evaluation's. calibration_size 0 = no split (returns `ds`
  subsampled as `subsample_train` does, and None).

  Raises:
    ValueError: calibration_size larger than the images left outside the subsample (or, for
      train_size 0, not smaller than the training split).
  """
  cal = _check_int(calibration_size, "calibration_size", 0)
  if cal == 0:
    return subsample_train(ds, train_size, seed), None
  y = np.asarray(ds.y_train)
  if train_size:
    keep = stratified_subset(y, train_size, seed)
    pool = np.setdiff1d(np.arange(y.size), keep)
    if cal > pool.size:
      raise ValueError(
        f"calibration_size={cal}: only {pool.size} training images lie outside the "
        f"train_size={train_size} subsample"
      )
  else:
    keep = None
    pool = np.arange(y.size)
    if cal >= pool.size:
      raise ValueError(f"calibration_size={cal}: must be < the {pool.size} training images")
  held = pool[stratified_subset(y[pool], cal, seed, STREAM_CALIBRATION, "calibration_size")]
  if keep is None:
    keep = np.setdiff1d(np.arange(y.size), held)
  calibration = (np.asarray(ds.x_train[held], np.float32), y[held].astype(np.int32))
  codes = None if ds.train_codes is None else ds.train_codes[keep]
  return ds._replace(x_train=ds.x_train[keep], y_train=y[keep], train_codes=codes), calibration


# --------------------------------------------------------------------------------------------
# Partitioning


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < low or (high is not None and value > high):
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")
  return int(value)


def _check_partition_labels(labels, num_clients) -> tuple[np.ndarray, int]:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
    )
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be >= 0, found {labels.min()}")
  num_clients = _check_int(num_clients, "num_clients", 1)
  if num_clients > labels.size:
    raise ValueError(
      f"num_clients={num_clients} exceeds the number of examples "
      f"({labels.size}); some clients would be empty"
    )
  return labels, num_clients


def partition_iid(labels, num_clients: int, seed: int) -> list[np.ndarray]:
  """A seeded permutation cut into num_clients near-equal parts (sizes differ by <= 1)."""
  labels, num_clients = _check_partition_labels(labels, num_clients)
  rng = np.random.default_rng(seed)
  return [p.astype(np.int64) for p in np.array_split(rng.permutation(labels.size), num_clients)]


def partition_dirichlet(
  labels, num_clients: int, alpha: float, seed: int, min_size: int = 10, max_retries: int = 1000
) -> list[np.ndarray]:
  """Label-skewed split (Hsu et al. 2019; NIID-Bench, Li et al. 2022).

  For every class c, proportions p_c ~ Dirichlet(alpha 1_N) over the N clients; the class's
  shuffled samples are cut at floor(cumsum(p_c) n_c). Redrawn (all classes) until every client
  holds >= min_size samples, at most max_retries draws; each draw costs O(classes * N), so even
  alpha=0.01 with 100 clients fails fast. Small alpha -> each client sees few classes.

  Raises:
    ValueError: bad arguments, min_size * N > n (impossible), or no draw met min_size (the
      message gives the best smallest client reached).
  """
  labels, num_clients = _check_partition_labels(labels, num_clients)
  alpha = _check_alpha(alpha)
  min_size = _check_int(min_size, "min_size", 0)
  max_retries = _check_int(max_retries, "max_retries", 1)
  if min_size * num_clients > labels.size:
    raise ValueError(
      f"min_size={min_size} with num_clients={num_clients} needs "
      f"{min_size * num_clients} examples, only {labels.size} available"
    )
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  counts = np.array([np.sum(labels == c) for c in classes])
  best = -1
  for _ in range(max_retries):
    props = rng.dirichlet(np.full(num_clients, alpha), size=classes.size)  # [C, N]
    cuts = np.floor(np.cumsum(props, axis=1) * counts[:, None]).astype(np.int64)
    cuts[:, -1] = counts  # cumsum can end at 1 - eps
    cuts = np.minimum(cuts, counts[:, None])
    sizes = np.diff(cuts, axis=1, prepend=0)  # [C, N]
    smallest = int(sizes.sum(0).min())
    best = max(best, smallest)
    if smallest >= min_size:
      break
  else:
    raise ValueError(
      f"partition_dirichlet: no draw in max_retries={max_retries} gave every "
      f"one of {num_clients} clients >= min_size={min_size} examples (best "
      f"smallest client: {best}) with alpha={alpha}; raise alpha, lower min_size "
      f"or num_clients"
    )
  parts = [[] for _ in range(num_clients)]
  for c, cut in zip(classes, cuts):
    idx = rng.permutation(np.flatnonzero(labels == c))
    for k, chunk in enumerate(np.split(idx, cut[:-1])):
      parts[k].append(chunk)
  return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts]


def _largest_remainder(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """int64 counts proportional to `weights` summing to `total` exactly: floor of the quota,
  plus one for the largest remainders (ties broken at random)."""
  quota = total * weights / weights.sum()
  out = np.floor(quota).astype(np.int64)
  short = total - int(out.sum())
  if short:
    order = np.lexsort((rng.random(weights.size), -(quota - out)))
    out[order[:short]] += 1
  return out


def client_sizes(
  n: int, num_clients: int, size_sigma: float, rng: np.random.Generator, min_size: int = 1
) -> np.ndarray:
  """int64 [N] client sizes summing to n exactly, each >= min_size.

  Every client gets min_size, and the remaining n - N min_size examples are shared in
  proportion to w_k = exp(size_sigma z_k), z_k ~ N(0, 1) (largest-remainder rounding): a
  log-normal spread of scale size_sigma around the mean n / N. size_sigma = 0 gives equal
  sizes (differing by <= 1).
  """
  extra = n - num_clients * min_size
  if extra < 0:
    raise ValueError(
      f"min_size={min_size} with num_clients={num_clients} needs "
      f"{num_clients * min_size} examples, only {n} available"
    )
  z = rng.standard_normal(num_clients)
  w = np.exp(size_sigma * (z - z.max()))  # shifted: the same proportions, no overflow
  return min_size + _largest_remainder(extra, w, rng)


def partition_client_dirichlet(
  labels, num_clients: int, alpha: float, seed: int, *, size_sigma: float = 0.0, min_size: int = 1
) -> list[np.ndarray]:
  """Cross-device label skew: each client draws its own class mixture (Hsu et al. 2019's
  per-client Dirichlet, as in FedLab's client-side Dirichlet partition; sizes log-normal as in
  FedLab's unbalanced split).

  Client k has size s_k (`client_sizes`: log-normal with size_sigma around n / N, sizes sum
  to n exactly, each >= min_size) and mixture p_k ~ Dirichlet(alpha 1_C) over the C classes
  present. Its examples are drawn without replacement from what is left of each class:

    1. every client still short of its size demands r_k examples split
       r_k ~ Multinomial(r_k, q_k), q_k = p_k restricted to the classes with data left and
       renormalised (p_k itself while every class has data; if p_k puts no mass on any class
       with data left, which Dirichlet underflow at tiny alpha can cause, q_k = the
       remaining class proportions);
    2. a class with enough left serves every demand; a class demanded beyond what is left
       is shared out at random between the demanding units (multivariate hypergeometric:
       every unit of demand equally likely to be served) and is then exhausted;
    3. repeat with the unserved demand. Each pass serves everything or exhausts a class, so
       at most C + 1 passes; total demand always equals total supply, so every client
       ends at exactly s_k.

  When a class runs out, a client's unserved demand for it is thus re-drawn from its own
  mixture renormalised over the classes with data left. All clients compete in the same
  pass (no client order), and every step is vectorised over clients: 10,000 clients take
  well under a second. Small alpha -> each client holds few classes.

  Returns num_clients int64 index arrays (each in a seeded shuffled order).
  """
  labels, num_clients = _check_partition_labels(labels, num_clients)
  alpha = _check_alpha(alpha)
  ok = (
    isinstance(size_sigma, (int, float, np.integer, np.floating))
    and not isinstance(size_sigma, bool)
    and np.isfinite(size_sigma)
    and size_sigma >= 0
  )
  if not ok:
    raise ValueError(f"size_sigma must be a finite number >= 0, got {size_sigma!r}")
  min_size = _check_int(min_size, "min_size", 1)
  rng = np.random.default_rng(seed)
  classes, class_of, supply = np.unique(labels, return_inverse=True, return_counts=True)
  num_classes = classes.size
  sizes = client_sizes(labels.size, num_clients, float(size_sigma), rng, min_size)
  mix = rng.dirichlet(np.full(num_classes, alpha), size=num_clients)  # [N, C]
  need = sizes.copy()
  left = supply.astype(np.int64)
  held = np.zeros((num_clients, num_classes), np.int64)
  for _ in range(num_classes + 1):
    if not need.any():
      break
    q = mix * (left > 0)
    mass = q.sum(1, keepdims=True)
    fallback = (left / left.sum())[None]
    q = np.where(mass > 0, q / np.where(mass > 0, mass, 1.0), fallback)
    q[:, left == 0] = 0.0  # exact zeros: the fallback rows are renormalised already
    want = rng.multinomial(need, q)  # [N, C]
    grant = want
    for c in np.flatnonzero(want.sum(0) > left):
      grant[:, c] = rng.multivariate_hypergeometric(want[:, c], int(left[c]))
    held += grant
    need -= grant.sum(1)
    left -= grant.sum(0)
  assert not need.any() and not left.any(), "client_dirichlet did not place every example"
  # Deal each class's shuffled examples to its holders, then shuffle within each client.
  owner = np.empty(labels.size, np.int64)
  for c in range(num_classes):
    idx = rng.permutation(np.flatnonzero(class_of == c))
    owner[idx] = np.repeat(np.arange(num_clients), held[:, c])
  order = np.lexsort((rng.random(labels.size), owner))
  return np.split(order.astype(np.int64), np.cumsum(sizes)[:-1])


def partition_shards(
  labels, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
  """Each client holds exactly k = classes_per_client distinct classes (pathological non-IID,
  McMahan et al. 2017; k=1 is "one class per user").

  Classes are dealt greedily: client i takes the k classes held by the fewest clients so far,
  ties broken at random, so every class is held by floor(N k / C) or ceil(N k / C) clients
  (N=10, k=1, C=10: each client a distinct class). A class's shuffled samples are split
  evenly (sizes differ by <= 1) among its holders: every sample is assigned exactly once.
  C counts the classes present in `labels`.

  Raises:
    ValueError: k outside [1, C]; N k < C (some class would be held by nobody and its
      samples dropped; refused rather than silently shrinking the data); or a class with
      fewer samples than holders (a holder would get none of it).
  """
  labels, num_clients = _check_partition_labels(labels, num_clients)
  classes = np.unique(labels)
  k = _check_int(classes_per_client, "classes_per_client", 1, classes.size)
  if num_clients * k < classes.size:
    raise ValueError(
      f"num_clients * classes_per_client = {num_clients * k} < "
      f"{classes.size} classes: some classes would belong to no client"
    )
  rng = np.random.default_rng(seed)
  holders = [[] for _ in classes]
  load = np.zeros(classes.size, np.int64)
  for client in range(num_clients):
    pick = np.lexsort((rng.random(classes.size), load))[:k]
    load[pick] += 1
    for j in pick:
      holders[j].append(client)
  parts = [[] for _ in range(num_clients)]
  for c, owners in zip(classes, holders):
    idx = rng.permutation(np.flatnonzero(labels == c))
    if idx.size < len(owners):
      raise ValueError(f"class {c} has {idx.size} examples for {len(owners)} holding clients")
    for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
      parts[owner].append(chunk)
  return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts]


def _check_alpha(alpha) -> float:
  ok = isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(alpha, bool)
  if not ok or not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
  return float(alpha)


PARTITIONS = ("iid", "dirichlet", "client_dirichlet", "shards")


def partition(
  labels,
  num_clients: int,
  *,
  kind: str,
  seed: int,
  alpha: float = 0.5,
  classes_per_client: int = 2,
  min_size: int = 10,
  max_retries: int = 1000,
  size_sigma: float = 0.0,
) -> list[np.ndarray]:
  """Dispatches to partition_{iid, dirichlet, client_dirichlet, shards}; unused arguments
  are ignored.

  Returns num_clients int64 index arrays into `labels` (each in a seeded shuffled order).
  """
  if kind == "iid":
    return partition_iid(labels, num_clients, seed)
  if kind == "dirichlet":
    return partition_dirichlet(
      labels, num_clients, alpha, seed, min_size=min_size, max_retries=max_retries
    )
  if kind == "client_dirichlet":
    return partition_client_dirichlet(
      labels, num_clients, alpha, seed, size_sigma=size_sigma, min_size=min_size
    )
  if kind == "shards":
    return partition_shards(labels, num_clients, classes_per_client, seed)
  raise ValueError(f"unknown partition kind {kind!r}; expected one of {PARTITIONS}")


def label_histogram(parts: Sequence[np.ndarray], labels, num_classes: int) -> np.ndarray:
  """int64 [clients, num_classes]: how many examples of each class each client holds."""
  labels = np.asarray(labels)
  num_classes = _check_int(num_classes, "num_classes", 1)
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f"labels must be < num_classes={num_classes}, found {labels.max()}")
  return np.stack(
    [np.bincount(labels[np.asarray(p, np.int64)], minlength=num_classes) for p in parts]
  ).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Padded client blocks


def index_clients(y, parts: Sequence[np.ndarray], *, pad_to: int | None = None) -> types.ClientData:
  """Clients as [clients, max_n] index blocks into the training set, without images.

  max_n = pad_to or the largest client. index[i, j] = parts[i][j] (order kept), -1 past
  count[i]; y, valid and count as in `stack_clients`; x is None: the images stay in one
  copy (`fu_jax.images.ClientImages(index, table)` takes x's place). Vectorised: cost
  O(examples), not a Python loop over clients' rows.
  """
  y = np.asarray(y)
  if len(parts) == 0:
    raise ValueError("parts must hold at least one client")
  parts = [np.asarray(p) for p in parts]
  for i, p in enumerate(parts):
    if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
      raise ValueError(
        f"parts[{i}] must be a 1-D integer index array, got shape {p.shape} dtype {p.dtype}"
      )
    if p.size and (p.min() < 0 or p.max() >= y.shape[0]):
      raise ValueError(f"parts[{i}] has indices outside [0, {y.shape[0]})")
  count = np.array([p.size for p in parts], np.int32)
  max_n = int(count.max())
  if pad_to is not None:
    pad_to = _check_int(pad_to, "pad_to", 0)
    if pad_to < max_n:
      raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({max_n})")
    max_n = pad_to
  index = np.full((len(parts), max_n), -1, np.int32)
  rows = np.repeat(np.arange(len(parts)), count)
  cols = np.arange(rows.size) - np.repeat(np.cumsum(count) - count, count)
  index[rows, cols] = np.concatenate(parts) if rows.size else []
  valid = index >= 0
  ys = np.where(valid, y[np.where(valid, index, 0)], 0).astype(np.int32)
  return types.ClientData(x=None, y=ys, valid=valid, count=count, index=index)


def stack_clients(
  x, y, parts: Sequence[np.ndarray], *, pad_to: int | None = None
) -> types.ClientData:
  """Gathers each client's examples into [clients, max_n, ...] numpy blocks.

  max_n = pad_to or the largest client. Row j of client i is x[parts[i][j]] (order kept);
  rows past count[i] are zeros with valid=False, y=0 and index=-1. The padded layout:
  memory clients x max_n images (experiments use `index_clients` + `fu_jax.images`).
  """
  x, y = np.asarray(x), np.asarray(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
  clients = index_clients(y, parts, pad_to=pad_to)
  valid = clients.valid
  safe = np.where(valid, clients.index, 0)
  xs = np.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x[safe], 0).astype(x.dtype)
  return clients._replace(x=xs)
