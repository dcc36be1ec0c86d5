"""The experiment runner end to end on digits: outputs, caching, resume, bad input, the
command line's behaviour (one-line errors, Ctrl-C, finished runs not recomputed)."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import caches, validation
from experiments import evaluation as eval_lib
from experiments import run as run_lib
from experiments import task as task_lib
from experiments.configs import digits
from tests import pretrain_cache, tb_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small but real digits run: 4 rounds of FedAvg over 5 clients, membership inference
# with 2 shadow models of 3 epochs.
SMALL = [
  "--config.fl.rounds=4",
  "--config.data.num_clients=5",
  "--config.checkpoint_every=1",
  "--config.eval_every=2",
  "--config.finetune.rounds=2",
  "--config.model.name=mlp",
  "--config.mia.shadows=2",
  "--config.mia.shadow_epochs=3",
]


def small_config(**overrides):
  """SMALL as a config (the same trained model: tests/pretrain_cache.py shares it)."""
  c = digits.get_config()
  c.fl.rounds, c.data.num_clients, c.checkpoint_every, c.eval_every = 4, 5, 1, 2
  c.finetune.rounds = 2
  c.model.name = "mlp"
  c.mia.shadows, c.mia.shadow_epochs = 2, 3
  c.update_from_flattened_dict(overrides)
  return c


def _main(workdir, method, *extra, check=True):
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    f"--method={method}",
    "--config=experiments/configs/digits.py",
    f"--workdir={workdir}",
    *SMALL,
    *extra,
  ]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=check)


def _strip_timing(results):
  return {k: v for k, v in results.items() if k not in run_lib.TIMING_FIELDS}


def _same_params(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb)
  )


@pytest.mark.slow
def test_retrain_and_finetune_share_the_trained_model(tmp_path, monkeypatch):
  wd = str(tmp_path)
  cfg = small_config(method="retrain")
  res = run_lib.run(cfg, wd)
  for key in (
    "method",
    "seed",
    "test_acc",
    "retain_acc",
    "forget_acc",
    "per_class_acc",
    "train_seconds",
    "unlearn_seconds",
    "compile_seconds",
    "rounds",
    "bytes_up",
    "bytes_down",
    "mia_auc",
    "mia_attack_acc",
  ):
    assert key in res, key
  assert res["forget_acc"] < 0.05  # class 0 never seen by the retrained model
  assert res["original"]["forget_acc"] > 0.8
  assert res["rounds"] == 4
  # Each of the 5 clients downloads and uploads the whole model every round.
  assert res["bytes_up"] == res["bytes_down"] > 0
  assert os.path.exists(os.path.join(wd, "retrain", "results.json"))
  assert glob.glob(os.path.join(wd, "retrain", "events.out.tfevents.*"))
  cfg = small_config(method="finetune")
  # The second method neither evaluates nor scores the trained model again: both are
  # cached beside it.
  trained, scored = [], []
  pretrained = caches.pretrained
  monkeypatch.setattr(
    caches, "pretrained", lambda *a: trained.append(pretrained(*a)) or trained[-1]
  )
  for name in ("evaluate", "membership_scores"):
    fn = getattr(eval_lib, name)
    monkeypatch.setattr(
      eval_lib, name, lambda task, p, *a, fn=fn: scored.append(p) or fn(task, p, *a)
    )
  res_ft = run_lib.run(cfg, wd)
  assert len(trained) == 1 and len(scored) >= 2  # per-round and final evaluations ran
  assert not any(_same_params(p, trained[0][0].params) for p in scored)
  assert len(glob.glob(os.path.join(wd, "pretrain", "*"))) == 1  # trained once, reused
  assert res_ft["rounds"] == 2
  assert res_ft["original"] == res["original"]
  # The trained model's evaluation and membership scores were computed once.
  assert len(glob.glob(os.path.join(wd, "pretrain", "*", "eval-*.json"))) == 1
  assert len(glob.glob(os.path.join(wd, "pretrain", "*", "mia-*.json"))) == 1


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(workdir, stdout) of a finished small retrain run; tests only read it."""
  wd = str(tmp_path_factory.mktemp("finished"))
  pretrain_cache.pretrain(small_config(method="retrain"), wd)
  return wd, _main(wd, "retrain").stdout


def _popen(workdir):
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    "--method=retrain",
    "--config=experiments/configs/digits.py",
    f"--workdir={workdir}",
    *SMALL,
  ]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_after_checkpoint(proc, workdir, step, sig):
  """Sends `sig` once the retrain phase has written checkpoint `step`; (stdout, stderr)."""
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if glob.glob(os.path.join(workdir, "retrain", "ckpt", "retrain", "steps", str(step))):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be interrupted"
  proc.send_signal(sig)
  return proc.communicate()


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identical(tmp_path, finished):
  ref_dir, kill_dir = finished[0], str(tmp_path)
  ref = json.load(open(os.path.join(ref_dir, "retrain", "results.json")))
  # Ctrl-C after round 2: one line, status 130. Then SIGKILL after round 3 of the resumed
  # run, and a third run completes from round 3. (The model trained before unlearning is
  # the session's: what is interrupted and resumed is retrain's own training.)
  pretrain_cache.pretrain(small_config(method="retrain"), kill_dir)
  proc = _popen(kill_dir)
  _, err = _signal_after_checkpoint(proc, kill_dir, 2, signal.SIGINT)
  assert proc.returncode == 130
  assert err.strip().splitlines() == [
    "interrupted; rerun the same command to resume from the last checkpoint"
  ], err
  proc = _popen(kill_dir)
  _signal_after_checkpoint(proc, kill_dir, 3, signal.SIGKILL)
  assert not os.path.exists(os.path.join(kill_dir, "retrain", "results.json"))
  out = _main(kill_dir, "retrain")
  assert "resumed after round 3/4" in out.stdout
  # Every process shares the session's persistent compilation cache (conftest.py): this
  # one loads programs the earlier ones compiled.
  loaded = re.search(r"(\d+) programs loaded, (\d+) compiled", out.stdout)
  assert loaded and int(loaded.group(1)) > 0, out.stdout[-500:]
  got = json.load(open(os.path.join(kill_dir, "retrain", "results.json")))
  assert _strip_timing(got) == _strip_timing(ref)
  # TensorBoard shows each round once, whatever the killed processes had logged.
  scalars = tb_events.scalars(os.path.join(kill_dir, "retrain"))
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  assert [s for s, _ in scalars["eval/test_acc"]] == [2, 4]
  assert all("/" in tag for tag in scalars)
  assert scalars["trial/test_acc"] == [(5, pytest.approx(ref["test_acc"]))]


@pytest.mark.slow
def test_finished_run_is_not_recomputed(finished):
  wd = finished[0]
  files = sorted(glob.glob(os.path.join(wd, "**", "*"), recursive=True))
  stamps = {f: (os.path.getmtime(f), os.path.getsize(f)) for f in files}
  out = _main(wd, "retrain")
  path = os.path.join(wd, "retrain", "results.json")
  assert "finished already" in out.stdout and path in out.stdout, out.stdout
  assert "round" not in out.stdout  # nothing trained or evaluated again
  assert sorted(glob.glob(os.path.join(wd, "**", "*"), recursive=True)) == files
  assert {f: (os.path.getmtime(f), os.path.getsize(f)) for f in files} == stamps


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused(finished):
  wd = finished[0]
  before = open(os.path.join(wd, "retrain", "results.json")).read()
  out = _main(wd, "retrain", "--config.fl.client_lr=0.2", check=False)
  assert out.returncode != 0
  assert "fl.client_lr" in out.stderr
  assert open(os.path.join(wd, "retrain", "results.json")).read() == before


@pytest.mark.slow
@pytest.mark.parametrize(
  "flag, expect",
  [
    ("--config.fl.roundz=3", "config.fl has no key 'roundz'; did you mean config.fl.rounds?"),
    ("--config.fll.rounds=3", "config has no key 'fll'; did you mean config.fl?"),
    ("--config.fl.rounds.x=3", "config.fl.rounds is a value"),
    ("--config.fl.rounds=abc", "--config.fl.rounds=abc"),
    ("--methd=retrain", "methd"),
  ],
)
def test_bad_flag_is_one_line(tmp_path, flag, expect):
  out = _main(str(tmp_path), "retrain", flag, check=False)
  assert out.returncode == 2
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert expect in out.stderr, out.stderr
  assert not os.listdir(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
  "flag, expect",
  [
    ("--config.data.num_clients=0", "data.num_clients"),
    ("--config.data.alpha=-1.0", "data.alpha"),
    ("--config.unlearn.forget_class=10", "unlearn.forget_class=10"),
    ("--config.fl.rounds=0", "fl.rounds"),
    ("--config.fl.runner=gpu", "fl.runner='gpu'"),
    ("--config.model.name=alexnet", "model.name='alexnet'"),
    ("--config.data.source=idx:/nonexistent", "/nonexistent"),
    ("--config.fl.client_lr=1e6", "NaN"),
  ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, flag, expect):
  out = _main(str(tmp_path), "retrain", flag, check=False)
  assert out.returncode != 0
  assert expect in out.stderr, out.stderr[-2000:]
  assert not glob.glob(os.path.join(str(tmp_path), "*", "results.json"))


@pytest.mark.slow
def test_unknown_method_lists_allowed(tmp_path):
  out = _main(str(tmp_path), "nosuch", check=False)
  assert out.returncode != 0
  assert "retrain" in out.stderr and "nosuch" in out.stderr


def test_train_size_subsamples_before_partitioning_and_is_validated():
  task = task_lib.build_task(small_config(**{"data.train_size": 200}))
  assert int(task.clients.count.sum()) == 200
  assert int(task.clients.valid.sum()) == 200
  # 0..n_train allowed; anything else is one clear ConfigError (types: ml_collections).
  n = len(task_lib.build_task(small_config()).dataset.y_train)
  for bad in (-1, n + 1):
    with pytest.raises(validation.ConfigError, match=r"data.train_size="):
      task_lib.build_task(small_config(**{"data.train_size": bad}))


def test_build_task_holds_one_copy_and_index_blocks():
  import numpy as np  # pylint: disable=g-import-not-at-top

  from fu_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from fu_jax import images

  cfg = small_config(
    **{
      "data.partition": "client_dirichlet",
      "data.num_clients": 40,
      "data.alpha": 0.3,
      "data.size_sigma": 1.0,
      "data.min_size": 1,
    }
  )
  task = task_lib.build_task(cfg)
  x = task.clients.x
  assert isinstance(x, images.ClientImages) and x.table.codes.dtype == np.uint8
  assert x.index is task.clients.index  # the index block is stored once
  parts = data_lib.partition(
    task.dataset.y_train,
    40,
    kind="client_dirichlet",
    seed=cfg.seed,
    alpha=0.3,
    size_sigma=1.0,
    min_size=1,
  )
  old = data_lib.stack_clients(task.dataset.x_train, task.dataset.y_train, parts)
  np.testing.assert_array_equal(np.asarray(x).view(np.uint32), old.x.view(np.uint32))
  np.testing.assert_array_equal(np.asarray(task.clients.y), old.y)
  with pytest.raises(validation.ConfigError, match=r"data.size_sigma=-1.0"):
    validation.validate(small_config(**{"data.size_sigma": -1.0}), "retrain")


def test_a_fixed_backdoor_target_plants_one_label_and_is_validated():
  # all-to-one: every planted label is the target; the client's other data is untouched
  cfg = small_config(**{"backdoor.enabled": True, "backdoor.target": 3, "unlearn.kind": "client"})
  task = task_lib.build_task(cfg)
  clean = task_lib.build_task(small_config(**{"unlearn.kind": "client"}))
  forget = np.asarray(task.forget)
  assert forget.any()
  assert (np.asarray(task.clients.y)[forget] == 3).all()
  assert (np.asarray(clean.clients.y)[forget] != 3).any()
  np.testing.assert_array_equal(
    np.asarray(task.clients.y)[~forget], np.asarray(clean.clients.y)[~forget]
  )
  for value, expect in [(10, r"backdoor.target=10: allowed -1 or 0..9"), (-2, "target=-2")]:
    with pytest.raises(validation.ConfigError, match=expect):
      validation.validate(
        small_config(**{"backdoor.enabled": True, "backdoor.target": value}), "retrain", 10
      )
