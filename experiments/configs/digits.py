"""scikit-learn's digits (8x8, 1347 train / 450 test), 10 IID clients: the embedded default.

  python -m experiments.main --method=retrain --config=experiments/configs/digits.py \
      --workdir=/tmp/fu_digits

BUILD.md has its accuracy, timing and the table of every method on it (`--method=all`).
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "digits"
  c.data.num_clients = 10
  c.fl.rounds = 20
  c.fl.local_epochs = 1
  c.fl.batch_size = 16
  c.fl.client_lr = 0.05
  c.fl.client_momentum = 0.9
  c.model.name = "cnn"
  c.checkpoint_every = 5
  c.eval_every = 5
  # QuickDrop: the distilled sets hold 1 image per class and client here, and 5 recovery
  # rounds left retain accuracy well under retrain's (BUILD.md, QuickDrop on digits).
  c.quickdrop.recovery_rounds = 10
  return c
