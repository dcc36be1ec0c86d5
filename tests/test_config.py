"""Configuration: the trained-model cache key (which cached model a run reuses)."""

import pytest

from experiments import caches, validation
from experiments import run as run_lib
from experiments.configs import digits

# pretrain/<trainer>-<hash> directories are named by these hashes of the digits config:
# a change of training_config's meaning (or of a training default) orphans every cached
# trained model, so it must be deliberate.
PINNED = {"fedavg": "774174bdd909", "quickdrop": "a00c25041a18", "federaser": "36564e73e885"}


def _key(config, trainer):
  return caches.config_hash(caches.training_config(config, trainer))


def _with(key, value, backdoor=False):
  c = digits.get_config()
  c.backdoor.enabled = backdoor
  c.update_from_flattened_dict({key: value})
  return c


@pytest.mark.parametrize("trainer", sorted(PINNED))
def test_cache_keys_of_the_digits_config_are_pinned(trainer):
  assert _key(digits.get_config(), trainer) == PINNED[trainer]


@pytest.mark.parametrize(
  "trainer, key, value",
  [
    ("fedavg", "fl.runner", "loop"),  # how clients run, not what they compute
    ("fedavg", "fl.chunk_size", 3),
    ("fedavg", "unlearn.forget_class", 3),  # no backdoor: the request is not in the data
    ("fedavg", "mia.shadows", 0),
    ("fedavg", "eval.relearn_steps", 5),
    ("fedavg", "sga.lr", 0.5),  # unlearning sections
    ("fedavg", "sga.batch_size", 8),
    ("fedavg", "channel.lr", 0.3),
    ("fedavg", "fedaf.lam", 1.0),
    ("fedavg", "quickdrop.scale", 0.5),  # another trainer's section
    ("fedavg", "federaser.interval", 2),
    ("quickdrop", "quickdrop.unlearn_lr", 2.0),  # quickdrop's unlearning-only keys
    ("quickdrop", "quickdrop.recovery_lr", 0.3),
    ("quickdrop", "quickdrop.unlearn_batch_size", 8),
    ("federaser", "federaser.calib_ratio", 0.3),
    ("federaser", "federaser.combine", "mean"),
  ],
)
def test_unlearning_keys_leave_the_cache_key(trainer, key, value):
  assert _key(_with(key, value), trainer) == PINNED[trainer]


@pytest.mark.parametrize(
  "trainer, key, value",
  [
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
  ],
)
def test_training_keys_change_the_cache_key(trainer, key, value):
  assert _key(_with(key, value), trainer) != PINNED[trainer]


def test_a_planted_backdoor_puts_the_request_in_the_cache_key():
  # The trigger sits in the data to be forgotten, so the request shapes the trained model.
  a = _key(_with("unlearn.forget_class", 0, backdoor=True), "fedavg")
  b = _key(_with("unlearn.forget_class", 3, backdoor=True), "fedavg")
  assert a != b and PINNED["fedavg"] not in (a, b)
  target = _with("unlearn.forget_class", 0, backdoor=True)
  target.backdoor.target = 2  # a fixed target label plants other data than the shift
  assert _key(target, "fedavg") != a


# Defaults that follow an fl.* key (base.linked): section key -> the fl key it follows.
LINKED = {
  "channel.local_epochs": "local_epochs",
  "channel.lr": "client_lr",
  "channel.batch_size": "batch_size",
  "fedaf.batch_size": "batch_size",
  "sga.batch_size": "batch_size",
  "frr.local_epochs": "local_epochs",
  "frr.rounds": "rounds",
  "quickdrop.unlearn_batch_size": "batch_size",
  "quickdrop.recovery_epochs": "local_epochs",
  "quickdrop.recovery_lr": "client_lr",
}


def _get(c, path):
  section, key = path.split(".")
  return c[section][key]


def _parse(monkeypatch, *overrides):
  """The config as experiments.main parses it (ml_collections' config flag, which reads
  the overrides from sys.argv)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  argv = ["prog", "--config=experiments/configs/digits.py", *overrides]
  monkeypatch.setattr("sys.argv", argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  values(argv)
  return values.config


@pytest.mark.parametrize("path", sorted(LINKED))
def test_a_linked_default_follows_its_fl_key_until_set(path):
  fl_key = LINKED[path]
  c = digits.get_config()
  assert _get(c, path) == c.fl[fl_key]
  bumped = c.fl[fl_key] * 3
  c.fl[fl_key] = bumped
  assert _get(c, path) == bumped
  mine = c.fl[fl_key] * 2
  c.update_from_flattened_dict({path: mine})
  assert _get(c, path) == mine and c.fl[fl_key] == bumped  # setting it leaves fl alone
  got = c.copy_and_resolve_references().to_dict()
  assert got[path.split(".")[0]][path.split(".")[1]] == mine


def test_command_line_overrides_of_linked_keys(monkeypatch):
  c = _parse(monkeypatch, "--config.fl.batch_size=8", "--config.channel.lr=0.3")
  assert c.sga.batch_size == 8 and c.fedaf.batch_size == 8 and c.fl.batch_size == 8
  assert c.channel.lr == 0.3 and c.fl.client_lr == 0.05 and c.quickdrop.recovery_lr == 0.05
  c = _parse(monkeypatch, "--config.sga.batch_size=4")
  assert c.sga.batch_size == 4 and c.fl.batch_size == 16 and c.fedaf.batch_size == 16
  c = _parse(monkeypatch, "--config.fl.rounds=6")
  assert c.frr.rounds == 6 and c.fl.rounds == 6
  c = _parse(monkeypatch, "--config.frr.rounds=4")
  assert c.frr.rounds == 4 and c.fl.rounds == 20


@pytest.mark.parametrize(
  "method, key, value, expect",
  [
    ("sga", "sga.lr", 0.0, "sga.lr=0.0: must be > 0"),
    ("sga", "sga.batch_size", 0, "sga.batch_size=0: must be >= 1"),
    ("fedaf_c", "fedaf.fisher", "full", "fedaf.fisher='full': allowed ('diag', 'sketch')"),
    ("channel_ce", "channel.delta", 0.0, r"channel.delta=0.0: must be in (0, 1]"),
    ("cdp", "cdp.sparsity", 1.0, "cdp.sparsity=1.0: must be in (0, 1)"),
    ("frr", "frr.local_epochs", 0, "frr.local_epochs=0: must be >= 1"),
    ("frr", "frr.rounds", 0, "frr.rounds=0: must be >= 1"),
    ("federaser", "federaser.interval", 30, "federaser.interval=30: allowed 1..fl.rounds=20"),
    ("finetune", "finetune.rounds", -1, "finetune.rounds=-1: must be >= 0"),
    ("quickdrop", "quickdrop.grads", "loop", "quickdrop.grads='loop'"),
  ],
)
def test_the_runner_checks_the_method_section_before_anything_runs(method, key, value, expect):
  c = _with(key, value)
  with pytest.raises(ValueError) as e:
    validation.validate(c, method)
  assert expect in str(e.value) and len(str(e.value).splitlines()) == 1
  validation.validate(digits.get_config(), method)  # the defaults pass


def test_a_config_json_from_before_the_linked_defaults_still_matches():
  # Written when these keys defaulted to 0 ("use fl.<key>"): the same run, so a workdir
  # from then is resumed (and a finished run recognised) rather than refused.
  new = caches.config_dict(digits.get_config())
  old = {s: dict(v) if isinstance(v, dict) else v for s, v in new.items()}
  for path in run_lib.FORMER_PLACEHOLDERS:
    section, key = path.split(".")
    old[section][key] = 0
  # frr.rounds was a number of its own (5, from the trained model), never a placeholder.
  assert sorted(run_lib.FORMER_PLACEHOLDERS) == sorted(set(LINKED) - {"frr.rounds"})
  assert run_lib.config_changes(old, new) == []
  # A real difference is still reported: the value set differs from the fl value.
  c = digits.get_config()
  c.sga.batch_size = 8
  assert run_lib.config_changes(old, caches.config_dict(c)) == ["sga.batch_size"]
  old["sga"]["lr"] = 0.5
  assert "sga.lr" in run_lib.config_changes(old, new)
