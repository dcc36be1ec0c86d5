"""Configuration: the trained-model cache key (which cached model a run reuses)."""
import pytest

from experiments import run as run_lib
from experiments.configs import digits

# pretrain/<trainer>-<hash> directories are named by these hashes of the digits config:
# a change of training_config's meaning (or of a training default) orphans every cached
# trained model, so it must be deliberate.
PINNED = {"fedavg": "774174bdd909", "quickdrop": "a00c25041a18",
          "federaser": "36564e73e885"}


def _key(config, trainer):
  return run_lib._hash(run_lib.training_config(config, trainer))  # pylint: disable=protected-access


def _with(key, value, backdoor=False):
  c = digits.get_config()
  c.backdoor.enabled = backdoor
  c.update_from_flattened_dict({key: value})
  return c


@pytest.mark.parametrize("trainer", sorted(PINNED))
def test_cache_keys_of_the_digits_config_are_pinned(trainer):
  assert _key(digits.get_config(), trainer) == PINNED[trainer]


@pytest.mark.parametrize("trainer, key, value", [
    ("fedavg", "fl.runner", "loop"),            # how clients run, not what they compute
    ("fedavg", "fl.chunk_size", 3),
    ("fedavg", "unlearn.forget_class", 3),      # no backdoor: the request is not in the data
    ("fedavg", "mia.shadows", 0),
    ("fedavg", "eval.relearn_steps", 5),
    ("fedavg", "sga.lr", 0.5),                  # unlearning sections
    ("fedavg", "sga.batch_size", 8),
    ("fedavg", "channel.lr", 0.3),
    ("fedavg", "fedaf.lam", 1.0),
    ("fedavg", "quickdrop.scale", 0.5),         # another trainer's section
    ("fedavg", "federaser.interval", 2),
    ("quickdrop", "quickdrop.unlearn_lr", 2.0),  # quickdrop's unlearning-only keys
    ("quickdrop", "quickdrop.recovery_lr", 0.3),
    ("quickdrop", "quickdrop.unlearn_batch_size", 8),
    ("federaser", "federaser.calib_ratio", 0.3),
    ("federaser", "federaser.combine", "mean"),
])
def test_unlearning_keys_leave_the_cache_key(trainer, key, value):
  assert _key(_with(key, value), trainer) == PINNED[trainer]


@pytest.mark.parametrize("trainer, key, value", [
    ("fedavg", "seed", 1),
    ("fedavg", "data.seed", 3),
    ("fedavg", "data.num_clients", 4),
    ("fedavg", "fl.client_lr", 0.1),
    ("fedavg", "fl.batch_size", 8),
    ("fedavg", "model.name", "mlp"),
    ("quickdrop", "fl.rounds", 3),
    ("quickdrop", "quickdrop.scale", 0.5),
    ("quickdrop", "quickdrop.image_lr", 0.5),
    ("federaser", "federaser.interval", 2),
])
def test_training_keys_change_the_cache_key(trainer, key, value):
  assert _key(_with(key, value), trainer) != PINNED[trainer]


def test_a_planted_backdoor_puts_the_request_in_the_cache_key():
  # The trigger sits in the data to be forgotten, so the request shapes the trained model.
  a = _key(_with("unlearn.forget_class", 0, backdoor=True), "fedavg")
  b = _key(_with("unlearn.forget_class", 3, backdoor=True), "fedavg")
  assert a != b and PINNED["fedavg"] not in (a, b)
