"""The digits source: scikit-learn's bundled 8x8 digits, a seeded stratified split."""

from __future__ import annotations

import numpy as np

from fu_jax import containers
from fu_jax.data._normalise import finish_dataset


def load_digits(seed: int, test_fraction: float = 0.25, **caps) -> containers.Dataset:
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
  return finish_dataset(
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
