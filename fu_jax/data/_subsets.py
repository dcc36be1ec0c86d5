"""Seeded subsets of a loaded training set: a stratified subsample, the calibration split."""

from __future__ import annotations

import numpy as np

from fu_jax import containers
from fu_jax.data._normalise import check_int

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
  size = check_int(size, name, 1, n)
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


def subsample_train(ds: containers.Dataset, size: int, seed: int) -> containers.Dataset:
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
  ds: containers.Dataset, train_size: int, calibration_size: int, seed: int
) -> tuple[containers.Dataset, tuple[np.ndarray, np.ndarray] | None]:
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
  cal = check_int(calibration_size, "calibration_size", 0)
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
