"""SVHN (cropped digits) through TFDS, ConvNet, 10 clients (QuickDrop's third data set).

  python -m experiments.main --method=retrain --config=experiments/configs/svhn.py \
      --workdir=/tmp/fu_svhn --config.data.data_dir=<tfds data dir>

Not measured here: these machines have no prepared TFDS SVHN.
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "tfds:svhn_cropped"
  c.data.num_clients = 10
  c.fl.rounds = 50
  c.fl.batch_size = 64
  c.fl.client_lr = 0.05
  c.fl.client_momentum = 0.9
  c.model.name = "convnet"
  return c
