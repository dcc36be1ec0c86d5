"""One copy of the training images; clients as int32 index blocks into it.

The padded layout (`data.stack_clients`) copies every client's images into a
[clients, max_n, H, W, C] float32 block, so memory grows with the number of clients times
the LARGEST client (a skewed partition makes that large) and a FedAvg round gathers whole
image blocks for its cohort. Here the training set is stored once on the device and a
client is only the row of `ClientData.index` that lists its examples (-1 on padding):
padding costs 4 bytes a slot, not an image, and images exist only per mini-batch, gathered
inside the jitted step (`fl.take_batch`).

Storage: `ImageTable(codes, lut)`. For a uint8 source (IDX files, digits, uint8 npz, TFDS
except CelebA) `codes` are the source bytes [n, H, W, C] uint8 (4x smaller than float32)
and `lut` [256, C] float32 maps a byte value of channel c to its normalised value. The
lookup table is computed by `fu_jax.data` with the very numpy operations that normalise the
float copy (`x * 1/255` or `x / 16`, then `- mean_c`, then `/ std_c`), so
`lut[codes[..., c], c]` equals `Dataset.x_train[..., c]` bit for bit: normalising per batch
is a table lookup, not new arithmetic, and results are bit-identical to the padded layout.
Other sources (float images, CelebA's resampled faces) and images changed after loading (a
planted backdoor trigger) are stored as their normalised float32 values (`lut=None`).

`ClientImages(index, table)` stands where the padded block `ClientData.x` used to, so code
written for the block keeps working:

  * as a pytree its only leaf is `index` (the table is static aux data, compared by
    identity), so everything that selects clients by mapping over a data pytree
    (`jax.tree.map(lambda a: jnp.take(a, idx, 0), ...)`, vmap over the client axis,
    chunking in `fl.ClientRunner`) selects index rows and carries the table along;
  * `fl.take_batch` turns it into images after selecting a batch (`materialize`);
  * `x[key]` indexes the index block like the padded block and gathers only those rows
    (`x[forget_mask]`, `x[client]`, `x[rows, cols]`): the cheap way to read images;
  * `np.asarray(x)` builds the whole padded block (compatibility for code that has not
    been converted to `x[key]`; it costs the memory the padded layout did).

Jitted code must receive the table's arrays as ARGUMENTS: a ClientImages passed into
`jax.jit` carries its table as a closed-over constant, and XLA then embeds the whole
training set in the program (Fashion-MNIST: a 94 MB HLO, ~0.1 s per call). `detach` splits
a data pytree into (tree with placeholder tables, the tables' arrays) and `attach`, inside
the jitted function, joins them again; `fl.ClientRunner` does this for every step, so
methods never see it. Outside jit (`x[key]`, `np.asarray(x)`) the arrays are used eagerly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class ImageTable:
  """Training images stored once: codes [n, H, W, C] plus an optional lookup table.

  gather(index) -> float32 images [*index.shape, H, W, C]: lut[codes[index][..., c], c]
  (or codes[index] when lut is None), zeros where index < 0 (padding, as in the padded
  layout). Compared and hashed by identity (it is pytree aux data of `ClientImages`).
  """

  def __init__(self, codes, lut=None):
    codes = _to_device(codes)
    if codes.ndim != 4:
      raise ValueError(f"codes must be [n, H, W, C], got shape {codes.shape}")
    if lut is None and codes.dtype != jnp.float32:
      raise ValueError(f"codes of dtype {codes.dtype} need a lookup table (lut)")
    if lut is not None:
      lut = _to_device(lut, np.float32)
      if codes.dtype != jnp.uint8 or lut.shape != (256, codes.shape[-1]):
        raise ValueError(
          f"a lookup table needs uint8 codes and shape (256, C={codes.shape[-1]}),"
          f" got codes {codes.dtype}, lut {lut.shape}"
        )
    self.codes, self.lut = codes, lut

  @property
  def image_shape(self) -> tuple:
    return tuple(self.codes.shape[1:])

  @property
  def nbytes(self) -> int:
    return int(self.codes.nbytes) + (0 if self.lut is None else int(self.lut.nbytes))

  def gather(self, index):
    if _tracing(self.codes, self.lut, index):  # inside a jitted step: inline
      return _gather(self.codes, self.lut, index)
    return _gather_jit(self.codes, self.lut, np.asarray(index))

  def __repr__(self):
    kind = "uint8 + lookup table" if self.lut is not None else "float32"
    return f"ImageTable({self.codes.shape[0]} images {self.image_shape}, {kind})"


def _gather(codes, lut, index):
  """The images at `index` of a table (codes, lut): zeros where index < 0."""
  index = jnp.asarray(index)
  rows = jnp.take(codes, jnp.maximum(index, 0), axis=0, mode="clip")
  if lut is not None:
    rows = lut[rows.astype(jnp.int32), jnp.arange(rows.shape[-1])]
  real = (index >= 0).reshape(index.shape + (1,) * (codes.ndim - 1))
  return jnp.where(real, rows, jnp.zeros((), jnp.float32))


# Host-side gathers (evaluation, membership inference) as one program per index shape.
_gather_jit = jax.jit(_gather)


def _to_device(a, dtype=None):
  """`a` as a device array (a transfer; jnp.asarray would run a program per shape)."""
  if isinstance(a, jax.Array) and (dtype is None or a.dtype == dtype):
    return a
  return jax.device_put(np.asarray(a, dtype))


def _tracing(*xs) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


@jax.tree_util.register_pytree_node_class
class ClientImages:
  """Clients' images as an index block into one `ImageTable` (see the module docstring).

  index: int32 [..., max_n] (a leading client axis, or none inside a per-client function),
  -1 on padding. Behaves like the float32 block [..., max_n, H, W, C] it stands for.
  """

  def __init__(self, index, table: ImageTable):
    # No checks or conversions: jax rebuilds pytrees with placeholder leaves.
    self.index, self.table = index, table

  def tree_flatten(self):
    return (self.index,), self.table

  @classmethod
  def tree_unflatten(cls, table, children):
    return cls(children[0], table)

  @property
  def shape(self) -> tuple:
    return tuple(np.shape(self.index)) + self.table.image_shape

  @property
  def ndim(self) -> int:
    return len(self.shape)

  dtype = np.dtype(np.float32)

  def __len__(self):
    return self.shape[0]

  def images(self):
    """The float32 images [*index.shape, H, W, C] (zeros on padding)."""
    return self.table.gather(self.index)

  def __getitem__(self, key):
    if _tracing(self.index, key):
      return self.table.gather(self.index[key])
    # On the host (e.g. the forgotten rows for evaluation) the rows are chosen in numpy.
    return self.table.gather(np.asarray(self.index)[key])

  def __array__(self, dtype=None, copy=None):
    del copy  # always a new array
    return np.asarray(self.images(), dtype=dtype)

  def __repr__(self):
    return f"ClientImages(index {self.shape[:-3]} -> {self.table!r})"


class _Slot:
  """Placeholder aux data of a detached ClientImages: which table, and its static layout
  (equal slots give equal treedefs, so jitted functions are reused across calls)."""

  def __init__(self, i: int, image_shape: tuple, has_lut: bool):
    self.key = (i, tuple(image_shape), bool(has_lut))

  def __eq__(self, other):
    return isinstance(other, _Slot) and self.key == other.key

  def __hash__(self):
    return hash(self.key)

  def __repr__(self):
    return f"_Slot{self.key}"


def _is_images(a) -> bool:
  return isinstance(a, ClientImages)


def detach(tree: Any):
  """(tree with each ClientImages' table replaced by a placeholder, tables) where tables is
  a tuple of (codes, lut) pairs, one per distinct table: pass both to a jitted function and
  `attach` them inside."""
  tables = []

  def cut(a):
    if not _is_images(a) or isinstance(a.table, _Slot):
      return a
    for i, t in enumerate(tables):
      if t is a.table:
        break
    else:
      tables.append(a.table)
      i = len(tables) - 1
    return ClientImages(a.index, _Slot(i, a.table.image_shape, a.table.lut is not None))

  tree = jax.tree.map(cut, tree, is_leaf=_is_images)
  return tree, tuple((t.codes, t.lut) for t in tables)


def attach(tree: Any, tables):
  """Inverse of `detach`: placeholders replaced by ImageTables over `tables` (traced
  arguments inside jit)."""

  def join(a):
    if _is_images(a) and isinstance(a.table, _Slot):
      codes, lut = tables[a.table.key[0]]
      return ClientImages(a.index, ImageTable(codes, lut))
    return a

  return jax.tree.map(join, tree, is_leaf=_is_images)


def materialize(tree: Any):
  """`tree` with every ClientImages replaced by its images; other leaves unchanged."""
  return jax.tree.map(lambda a: a.images() if _is_images(a) else a, tree, is_leaf=_is_images)


def dataset_table(ds) -> ImageTable:
  """The training images of a `containers.Dataset` as one table: its uint8 codes and lookup
  table when the source had them, else its normalised float32 images."""
  if getattr(ds, "train_codes", None) is not None:
    return ImageTable(ds.train_codes, ds.train_lut)
  return ImageTable(np.asarray(ds.x_train, np.float32))


def map_client_blocks(fn, data, *args, block: int = 256):
  """fn(materialize(data), *args) computed over consecutive blocks of `block` clients and
  concatenated: only one block's images exist at a time.

  data: a pytree with a leading client axis (ClientImages or arrays); args: arrays or
  pytrees with the same leading axis. fn must treat clients independently (e.g. a vmap over
  them) and return a pytree with a leading client axis. With at most `block` clients it is
  one call on everything; otherwise the last block is filled up with copies of the last
  client (cut off again), so fn sees one shape and compiles once. Memory: block x max_n
  images instead of the padded block's clients x max_n.
  """
  n = jax.tree.leaves(data)[0].shape[0]
  if n <= block:
    return fn(materialize(data), *args)
  outs = []
  for start in range(0, n, block):
    idx = jnp.asarray(np.minimum(np.arange(start, start + block), n - 1))
    take = lambda a: jnp.take(a, idx, axis=0)
    out = fn(materialize(jax.tree.map(take, data)), *jax.tree.map(take, args))
    outs.append(jax.tree.map(lambda a: a[: min(block, n - start)], out))
  return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
