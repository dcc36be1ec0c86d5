"""Full Fashion-MNIST (60k/10k, 28x28) from Debian's dataset-fashion-mnist, CNN, 10 clients.

  apt-get install dataset-fashion-mnist
  python -m experiments.main --method=retrain --config=experiments/configs/fashion_mnist.py \
      --workdir=/tmp/fu_fmnist

Variants: `:dirichlet` (alpha 0.1), `:shards` (one class per client), `:fedaf` (the FedAF
setting: 4 clients, unlearn class 0 of client 0 with a backdoor), `:quickdrop5` (QuickDrop's
5-round table: 10 IID clients, 5 rounds, forget class 9, no MIA;
benchmarks/quickdrop_5round.py).
BUILD.md has its FedAvg accuracy, timing and every method on it.
"""

from experiments.configs import default


def get_config(variant: str = "iid"):
  c = default.get_config()
  c.data.source = "idx:/usr/share/datasets/fashion-mnist"
  c.data.num_clients = 10
  c.fl.rounds = 20
  c.fl.local_epochs = 1
  c.fl.batch_size = 64
  c.fl.client_lr = 0.05
  c.fl.client_momentum = 0.9
  c.model.name = "cnn"
  c.eval_every = 2
  c.checkpoint_every = 2
  if variant in ("dirichlet", "shards"):
    # Xu et al.'s non-IID setting: plain SGD, lr 0.1. With the IID lr 0.05 and momentum 0.9
    # one-class clients (shards) drift so far that FedAvg diverged at round 9 (NaN,
    # measured); Dirichlet 0.1 clients hold 1-3 classes, so they get the same.
    c.fl.client_lr = 0.1
    c.fl.client_momentum = 0.0
  if variant == "dirichlet":
    c.data.partition = "dirichlet"
    c.data.alpha = 0.1
  elif variant == "shards":
    c.data.partition = "shards"
    c.data.classes_per_client = 1
  elif variant == "fedaf":
    c.data.num_clients = 4
    c.fl.rounds = 5
    c.unlearn.kind = "client_class"
    c.backdoor.enabled = True
  elif variant == "quickdrop5":
    c.fl.rounds = 5
    c.eval_every = c.checkpoint_every = 5
    c.unlearn.forget_class = 9
    c.mia.enabled = False
  elif variant != "iid":
    raise ValueError(f"variant {variant!r}: allowed iid, dirichlet, shards, fedaf, quickdrop5")
  return c
