"""The reference and the simplest baselines: fedavg (no unlearning), retrain, finetune.

retrain: FedAvg from the same initialisation (it ignores the trained model, which the run
still evaluates as "original") on the retained data only, for the same
number of rounds: the reference every other method is measured against.
finetune: continue FedAvg from the trained model on the retained data for
`finetune.rounds` rounds (the papers' "fine-tune" baseline).
"""

from fu_jax.methods import base


def config_section(fl_cfg):
  """The `finetune` section (`fl_cfg`: the config's fl section)."""
  del fl_cfg
  s = base.new_section()
  s.rounds = 5  # FedAvg rounds on the retained data from the trained model
  return s


def validate(config):
  base.check_section(config, "finetune", {"rounds": base.at_least(0)})


def _fedavg(task, env, trained):
  del env
  return base.Outcome(trained.params, {})


def _retrain(task, env, trained):
  del trained
  cfg = task.config
  params = base.fedavg_phase(
    task,
    env,
    "retrain",
    base.init_params(task),
    cfg.fl.rounds,
    valid=task.retain_valid,
    client_weights=task.client_weights,
  )
  return base.Outcome(params, {})


def _finetune(task, env, trained):
  cfg = task.config
  params = base.fedavg_phase(
    task,
    env,
    "finetune",
    trained.params,
    cfg.finetune.rounds,
    valid=task.retain_valid,
    client_weights=task.client_weights,
    round_offset=cfg.fl.rounds,
  )
  return base.Outcome(params, {})


SECTION = base.Section("finetune", config_section, validate)

METHODS = {
  "fedavg": base.Method("fedavg", base.REQUEST_KINDS, base.FEDAVG, _fedavg, unlearns=False),
  "retrain": base.Method("retrain", base.REQUEST_KINDS, base.FEDAVG, _retrain),
  "finetune": base.Method("finetune", base.REQUEST_KINDS, base.FEDAVG, _finetune, section=SECTION),
}
