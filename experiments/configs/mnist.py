"""MNIST through TFDS (tfds.data_source: a prepared dataset in the TFDS data dir, no
TensorFlow, no download), CNN, 10 clients.

  python -m experiments.main --method=retrain --config=experiments/configs/mnist.py \
      --workdir=/tmp/fu_mnist --config.data.data_dir=<tfds data dir>

Not measured here: these machines have no prepared TFDS MNIST (only its mock is tested).
"""

from experiments.configs import fashion_mnist


def get_config(variant: str = "iid"):
  c = fashion_mnist.get_config(variant)
  c.data.source = "tfds:mnist"
  return c
