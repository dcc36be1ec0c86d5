"""The idx:<dir> source: MNIST-format IDX files, raw or gzip."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from fu_jax import containers
from fu_jax.data._errors import DataError, DataNotFoundError
from fu_jax.data._normalise import check_labels, finish_dataset

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


def load_idx(directory: str, **kwargs) -> containers.Dataset:
  """The four MNIST-format IDX files of `directory` as a Dataset (see IDX_FILES)."""
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
    check_labels(y, py)
  return finish_dataset(
    f"idx:{directory}",
    arrays["x_train"],
    arrays["y_train"],
    arrays["x_test"],
    arrays["y_test"],
    **kwargs,
  )
