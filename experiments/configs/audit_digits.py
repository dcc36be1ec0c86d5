"""The per-example audit's power check on digits: sample-wise forgetting from one of 3 clients.

  python -m experiments.audit --method=retrain --config=experiments/configs/audit_digits.py \
      --workdir=/tmp/fu_audit --models=16
  python -m experiments.audit --method=fedavg --config=experiments/configs/audit_digits.py \
      --workdir=/tmp/fu_audit --models=16

Small data and many local epochs so that a trained model memorises its samples: 600 of
digits' training images over 3 IID clients (200 each), 10 rounds of 5 local epochs, an MLP
(trained models fit their data: retain accuracy 100%, test ~96%); the request forgets 10%
of client 0's samples (20 digits, 3.3% of the data), drawn from the seed.

Expected (K = 16, seed 0; BUILD.md): retrain against an independent retrain bank U-LiRA AUC
0.54, F 0.16 (F's noise floor at K = 16: identical distributions give ~0.18, not 1);
fedavg (no unlearning) U-LiRA AUC 0.72 [0.56, 0.81], TPR 21% at 5% FPR, F 0.11. The trained models
classify every forgotten sample (100%); retrained ones 97%, so only the confidence tells
them apart. Each side's FedAvg runs as one vmapped bank (the MLP vmaps on CPU).
"""

from experiments.configs import digits


def get_config():
  c = digits.get_config()
  c.data.num_clients = 3
  c.data.train_size = 600
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
  c.unlearn.forget_fraction = 0.1
  c.mia.enabled = False
  return c
