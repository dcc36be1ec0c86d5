"""Adding a method (docs/design.md, "Adding a method"): a toy method defined in this file,
with its own config section, rules and key stream, registered by one call and run end to
end through experiments.main on the digits test config."""

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import compare
from experiments.configs import digits
from fu_jax import fl, methods
from fu_jax.methods import base
from tests import pretrain_cache
from tests.test_experiments import ROOT, SMALL, small_config

SHRINK_ID = 91  # its fold_in id under fl.STREAM_UNLEARN (no other method's)


def config_section(fl_cfg):
  """The `shrink` section."""
  del fl_cfg
  s = base.new_section()
  s.factor = 0.5  # the trained weights are multiplied by this
  s.noise = 0.0  # then each gets Gaussian noise of this standard deviation
  return s


def validate(config):
  base.check_section(config, "shrink", {"factor": base.in_range(0, 1), "noise": base.at_least(0)})


def _shrink(task, env, trained):
  """theta <- factor * theta + noise * N(0, 1), drawn from the method's own stream."""
  del env
  cfg = task.config.shrink
  leaves, treedef = jax.tree.flatten(trained.params)
  key = fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, SHRINK_ID)
  keys = jax.random.split(key, len(leaves))
  out = [
    cfg.factor * p + cfg.noise * jax.random.normal(k, p.shape, p.dtype)
    for p, k in zip(leaves, keys)
  ]
  return base.Outcome(jax.tree.unflatten(treedef, out), {"shrink_factor": float(cfg.factor)})


SHRINK = base.Method(
  "shrink",
  base.REQUEST_KINDS,
  base.FEDAVG,
  _shrink,
  section=base.Section("shrink", config_section, validate),
  streams=(SHRINK_ID,),
)

# `python -m experiments.main` with SHRINK registered first (a package module would be one
# line in fu_jax/methods/__init__.py's MODULES instead): registering here keeps it out of
# the other tests' registry.
_MAIN = (
  "import runpy; from fu_jax import methods; from tests import test_adding_a_method as t; "
  "methods.register(t.SHRINK); runpy.run_module('experiments.main', run_name='__main__')"
)


def _main(workdir, *extra):
  cmd = [
    sys.executable,
    "-c",
    _MAIN,
    "--method=shrink",
    "--config=experiments/configs/digits.py",
    f"--workdir={workdir}",
    *SMALL,
    *extra,
  ]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_a_registered_method_runs_end_to_end_through_main(tmp_path):
  wd = str(tmp_path)
  pretrain_cache.pretrain(small_config(), wd, "fedavg")  # the model every FedAvg method uses

  bad = _main(wd, "--config.shrink.factor=2.0")  # its rules, checked before anything runs
  assert bad.returncode == 2, bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == "error: shrink.factor=2.0: must be in [0, 1]"

  p = _main(wd, "--config.shrink.factor=0.0")
  assert p.returncode == 0, p.stderr
  with open(os.path.join(wd, "shrink", "results.json")) as f:
    r = json.load(f)
  with open(os.path.join(wd, "shrink", "config.json")) as f:
    c = json.load(f)
  assert r["method"] == "shrink" and r["shrink_factor"] == 0.0
  assert c["shrink"] == {"factor": 0.0, "noise": 0.0}
  # All weights zero: every logit 0, so every test image is called class 0 (~1 in 10).
  assert r["test_acc"] < 0.2 < r["original"]["test_acc"]


def test_the_registry_derives_what_was_kept_by_hand():
  assert compare.NO_UNLEARNING == ("fedavg",)
  c = digits.get_config()
  for name, m in methods.REGISTRY.items():
    if m.section is not None:
      assert name.startswith(m.section.name) and m.section.name in c
  assert methods.get("fedaf_c").section is methods.get("fedaf").section
  assert methods.get("sga").streams == (21,) and methods.get("federaser").streams == (31,)


@pytest.mark.parametrize(
  "method, match",
  [
    (SHRINK._replace(name="sga"), "registered already"),
    (SHRINK._replace(streams=(11,)), r"key stream \[11\] is fedaf's"),
    (
      SHRINK._replace(section=base.Section("fedaf", config_section, validate)),
      "another config section is registered as 'fedaf'",
    ),
    (SHRINK._replace(trainer=base.Trainer("fedavg", _shrink)), "another trainer"),
  ],
)
def test_register_refuses_a_clash_and_adds_nothing(method, match):
  before = (dict(methods.REGISTRY), dict(methods.SECTIONS), dict(methods.TRAINERS))
  with pytest.raises(ValueError, match=match):
    methods.register(SHRINK._replace(name="shrink2"), method)
  assert (methods.REGISTRY, methods.SECTIONS, methods.TRAINERS) == before
