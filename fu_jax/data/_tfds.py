"""The tfds:<name> source: tfds.data_source (array_record, no TensorFlow), CelebA's FedAF task."""

from __future__ import annotations

import numpy as np

from fu_jax.data._errors import DataError
from fu_jax.data._normalise import capped_subset, finish_dataset

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


def load_tfds(name: str, data_dir: str | None, seed: int, max_test=None):
  """A prepared TFDS data set (TFDS_DATASETS) read through tfds.data_source as a Dataset."""
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
    out.extend(_read_tfds_split(source, name, capped_subset(n, cap, rng, cap_name)))
  return finish_dataset(
    f"tfds:{name}", *out, num_classes=num_classes, seed=seed, scaled=name == "celeb_a"
  )
