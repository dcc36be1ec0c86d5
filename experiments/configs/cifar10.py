"""CIFAR-10 through TFDS (prepared in the TFDS data dir; nothing downloaded), ResNet-20,
10 IID clients: the channel-explanation paper's setting scaled to CPU (50 rounds, 5 local
epochs, batch 128, lr 0.1 in the paper).

  python -m experiments.main --method=retrain --config=experiments/configs/cifar10.py \
      --workdir=/tmp/fu_cifar10 --config.data.data_dir=<tfds data dir>

Not measured here: these machines have no prepared TFDS CIFAR-10.
"""

from experiments.configs import default


def get_config(variant: str = "iid"):
  c = default.get_config()
  c.data.source = "tfds:cifar10"
  c.data.num_clients = 10
  c.fl.rounds = 50
  c.fl.local_epochs = 5
  c.fl.batch_size = 128
  c.fl.client_lr = 0.1
  c.fl.client_momentum = 0.9
  c.model.name = "resnet20"
  c.eval_every = 5
  c.checkpoint_every = 5
  if variant == "fedaf":
    c.data.num_clients = 4
    c.fl.rounds = 20
    c.fl.local_epochs = 1
    c.unlearn.kind = "client_class"
    c.backdoor.enabled = True
  elif variant != "iid":
    raise ValueError(f"variant {variant!r}: allowed iid, fedaf")
  return c
