"""load_dataset: a source string to a standardised Dataset."""

from __future__ import annotations

from fu_jax import containers
from fu_jax.data._digits import load_digits
from fu_jax.data._errors import DataError
from fu_jax.data._idx import load_idx
from fu_jax.data._npz import load_npz
from fu_jax.data._tfds import load_tfds

SOURCES = ("digits", "idx:<dir>", "tfds:<name>", "npz:<file>")


def load_dataset(
  source: str, *, seed: int = 0, data_dir: str | None = None, max_test: int | None = None
) -> containers.Dataset:
  """Loads, validates and normalises a data set.

  Args:
    source: 'digits' | 'idx:<dir>' | 'tfds:<name>' | 'npz:<file>' (see the module docstring).
    seed: the digits train/test split and the max_test subset derive from it.
    data_dir: TFDS data directory (tfds: only; None = TFDS's default).
    max_test: optional cap on the test split; a seeded random subset (kept in file order)
      is used. For tfds: only the selected records are read and decoded. (A training-set
      subsample is `subsample_train`: class-stratified, statistics of the full set.)

  Returns:
    `containers.Dataset` with float32 [n, H, W, C] images standardised with train statistics,
    int32 labels and num_classes (known for digits/tfds, max label + 1 for idx/npz).

  Raises:
    DataError (ValueError; DataNotFoundError is also a FileNotFoundError) naming the path.
  """
  if not isinstance(source, str):
    raise DataError(f"source must be a string, one of {SOURCES}, got {source!r}")
  caps = dict(max_test=max_test)
  if source == "digits":
    return load_digits(seed, **caps)
  prefix, sep, rest = source.partition(":")
  if sep and rest and prefix == "idx":
    return load_idx(rest, seed=seed, **caps)
  if sep and rest and prefix == "npz":
    return load_npz(rest, seed=seed, **caps)
  if sep and rest and prefix == "tfds":
    return load_tfds(rest, data_dir, seed, **caps)
  raise DataError(f"unknown data source {source!r}; expected one of {SOURCES}")
