"""Data for the simulation: sources, partitioning over clients, padded client blocks.

Three steps (docs/design.md §3.1):

1. `load_dataset(source)` -> `containers.Dataset`: float32 NHWC images standardised per channel
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

3. `index_clients(y, parts)` -> `containers.ClientData` of [clients, max_n] index blocks into the
   training set (index=-1, valid=False on padding; fedjax-style, padding never changes a
   result); the images stay in one copy (`fu_jax.images`). `stack_clients(x, y, parts)`
   builds the padded image blocks [clients, max_n, H, W, C] instead (small tests, the
   before/after benchmark).

The public surface of a private tree, one concept per module (as optax): _errors, _normalise
(validation and standardisation), the sources _digits, _idx, _npz and _tfds, _sources
(load_dataset), _subsets (train subsample, calibration split), _partition and _blocks (padded
client blocks). Import this package, not its modules.

Heavy dependencies (scikit-learn, tensorflow_datasets) are imported lazily inside the loaders
that need them, so `import fu_jax.data` costs only numpy.
"""

from __future__ import annotations

from fu_jax.data._blocks import index_clients, stack_clients
from fu_jax.data._errors import DataError, DataNotFoundError
from fu_jax.data._idx import IDX_FILES, read_idx
from fu_jax.data._normalise import standardise
from fu_jax.data._partition import (
  PARTITIONS,
  client_sizes,
  label_histogram,
  partition,
  partition_client_dirichlet,
  partition_dirichlet,
  partition_iid,
  partition_shards,
)
from fu_jax.data._sources import SOURCES, load_dataset
from fu_jax.data._subsets import (
  STREAM_CALIBRATION,
  STREAM_TRAIN_SIZE,
  split_calibration,
  stratified_subset,
  subsample_train,
)
from fu_jax.data._tfds import (
  CELEB_A_ATTRIBUTES,
  CELEB_A_SIZE,
  TFDS_DATASETS,
  area_resize,
  celeb_a_image,
  celeb_a_label,
)

__all__ = [
  "DataError",
  "DataNotFoundError",
  "SOURCES",
  "standardise",
  "IDX_FILES",
  "read_idx",
  "CELEB_A_SIZE",
  "CELEB_A_ATTRIBUTES",
  "TFDS_DATASETS",
  "area_resize",
  "celeb_a_image",
  "celeb_a_label",
  "load_dataset",
  "STREAM_TRAIN_SIZE",
  "STREAM_CALIBRATION",
  "stratified_subset",
  "subsample_train",
  "split_calibration",
  "partition_iid",
  "partition_dirichlet",
  "client_sizes",
  "partition_client_dirichlet",
  "partition_shards",
  "PARTITIONS",
  "partition",
  "label_histogram",
  "index_clients",
  "stack_clients",
]
