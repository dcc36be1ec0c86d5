"""CelebA through TFDS as FedAF's 4 classes (Male x Mouth_Slightly_Open), 32x32, ResNet-10,
4 clients, 10 rounds; unlearn one class of one client with a backdoor planted.

  python -m experiments.main --method=retrain --config=experiments/configs/celeba.py \
      --workdir=/tmp/fu_celeba --config.data.data_dir=<tfds data dir>

Not measured here: these machines have no prepared TFDS CelebA.
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "tfds:celeb_a"
  c.data.num_clients = 4
  c.fl.rounds = 10
  c.fl.batch_size = 64
  c.fl.client_lr = 0.05
  c.fl.client_momentum = 0.9
  c.model.name = "resnet10"
  c.unlearn.kind = "client_class"
  c.backdoor.enabled = True
  return c
