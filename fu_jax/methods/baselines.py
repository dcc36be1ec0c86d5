"""The reference and the simplest baselines: fedavg (no unlearning), retrain, finetune.

retrain: FedAvg from the same initialisation (it ignores the trained model, which the run
still evaluates as "original") on the retained data only, for the same
number of rounds: the reference every other method is measured against.
finetune: continue FedAvg from the trained model on the retained data for
`finetune.rounds` rounds (the papers' "fine-tune" baseline).
"""
from fu_jax.methods import base


def train_fedavg(task, env) -> base.Trained:
  """The plain FedAvg model every method but QuickDrop starts from."""
  params = base.fedavg_phase(task, env, "train", base.init_params(task), task.config.fl.rounds)
  return base.Trained(params)


def _fedavg(task, env, trained):
  del env
  return base.Outcome(trained.params, {})


def _retrain(task, env, trained):
  del trained
  cfg = task.config
  params = base.fedavg_phase(task, env, "retrain", base.init_params(task), cfg.fl.rounds,
                             valid=task.retain_valid, client_weights=task.client_weights)
  return base.Outcome(params, {})


def _finetune(task, env, trained):
  cfg = task.config
  params = base.fedavg_phase(task, env, "finetune", trained.params, cfg.finetune.rounds,
                             valid=task.retain_valid, client_weights=task.client_weights,
                             round_offset=cfg.fl.rounds)
  return base.Outcome(params, {})


METHODS = {
    "fedavg": base.Method("fedavg", base.REQUEST_KINDS, "fedavg", _fedavg),
    "retrain": base.Method("retrain", base.REQUEST_KINDS, "fedavg", _retrain),
    "finetune": base.Method("finetune", base.REQUEST_KINDS, "fedavg", _finetune),
}

TRAINERS = {"fedavg": train_fedavg}
