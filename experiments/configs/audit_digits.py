"""The per-example audit's power check on digits: sample-wise forgetting from one of 3 clients.

  python -m experiments.audit --method=retrain --config=experiments/configs/audit_digits.py \
      --workdir=/tmp/fu_audit --models=16
  python -m experiments.audit --method=fedavg --config=experiments/configs/audit_digits.py \
      --workdir=/tmp/fu_audit --models=16

Few clients and many local epochs so that a trained model memorises its training samples:
3 IID clients (~449 digits each), 10 rounds of 5 local epochs, an MLP; the request forgets
5% of client 0's samples (22 digits), drawn from the seed.
"""
from experiments.configs import digits


def get_config():
  c = digits.get_config()
  c.data.num_clients = 3
  c.fl.rounds = 10
  c.fl.local_epochs = 5
  c.fl.batch_size = 16
  c.fl.client_lr = 0.05
  c.fl.client_momentum = 0.9
  c.model.name = "mlp"
  c.checkpoint_every = 10
  c.eval_every = 10
  c.unlearn.kind = "samples"
  c.unlearn.forget_client = 0
  c.unlearn.forget_fraction = 0.05
  c.mia.enabled = False
  return c
