"""The experiment runner end to end on digits: outputs, caching, resume, bad input."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import run as run_lib
from experiments.configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small but real digits run: 4 rounds of FedAvg over 5 clients.
SMALL = ["--config.fl.rounds=4", "--config.data.num_clients=5", "--config.checkpoint_every=1",
         "--config.eval_every=2", "--config.finetune.rounds=2", "--config.model.name=mlp"]


def small_config(**overrides):
  c = digits.get_config()
  c.fl.rounds, c.data.num_clients, c.checkpoint_every, c.eval_every = 4, 5, 1, 2
  c.finetune.rounds = 2
  c.model.name = "mlp"
  c.update_from_flattened_dict(overrides)
  return c


def _main(workdir, method, *extra, check=True):
  cmd = [sys.executable, "-m", "experiments.main", f"--method={method}",
         "--config=experiments/configs/digits.py", f"--workdir={workdir}", *SMALL, *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=check)


def _strip_timing(results):
  return {k: v for k, v in results.items() if k not in run_lib.TIMING_FIELDS}


def test_retrain_and_finetune_share_the_trained_model(tmp_path):
  wd = str(tmp_path)
  cfg = small_config(method="retrain")
  res = run_lib.run(cfg, wd)
  for key in ("method", "seed", "test_acc", "retain_acc", "forget_acc", "per_class_acc",
              "train_seconds", "unlearn_seconds", "compile_seconds", "rounds", "bytes_up",
              "bytes_down", "mia_auc", "mia_attack_acc"):
    assert key in res, key
  assert res["forget_acc"] < 0.05  # class 0 never seen by the retrained model
  assert res["original"]["forget_acc"] > 0.8
  assert res["rounds"] == 4
  # Each of the 5 clients downloads and uploads the whole model every round.
  assert res["bytes_up"] == res["bytes_down"] > 0
  assert os.path.exists(os.path.join(wd, "retrain", "results.json"))
  assert glob.glob(os.path.join(wd, "retrain", "events.out.tfevents.*"))
  cfg = small_config(method="finetune")
  res_ft = run_lib.run(cfg, wd)
  assert len(glob.glob(os.path.join(wd, "pretrain", "*"))) == 1  # trained once, reused
  assert res_ft["rounds"] == 2
  assert res_ft["original"] == res["original"]
  # The trained model's membership scores were computed once and cached beside it.
  assert len(glob.glob(os.path.join(wd, "pretrain", "*", "mia-*.json"))) == 1


def test_killed_run_resumes_bit_identical(tmp_path):
  ref_dir, kill_dir = str(tmp_path / "ref"), str(tmp_path / "kill")
  _main(ref_dir, "retrain")
  ref = json.load(open(os.path.join(ref_dir, "retrain", "results.json")))
  cmd = [sys.executable, "-m", "experiments.main", "--method=retrain",
         "--config=experiments/configs/digits.py", f"--workdir={kill_dir}", *SMALL]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  # Kill with SIGKILL once the retrain phase has written its second checkpoint.
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if glob.glob(os.path.join(kill_dir, "retrain", "ckpt", "retrain", "steps", "2")):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(kill_dir, "retrain", "results.json"))
  out = _main(kill_dir, "retrain")
  assert "resumed after round" in out.stdout
  got = json.load(open(os.path.join(kill_dir, "retrain", "results.json")))
  assert _strip_timing(got) == _strip_timing(ref)


def test_resume_with_a_different_config_is_refused(tmp_path):
  _main(str(tmp_path), "fedavg")
  out = _main(str(tmp_path), "fedavg", "--config.fl.client_lr=0.2", check=False)
  assert out.returncode != 0
  assert "fl.client_lr" in out.stderr


@pytest.mark.parametrize("flag, expect", [
    ("--config.data.num_clients=0", "data.num_clients"),
    ("--config.data.alpha=-1.0", "data.alpha"),
    ("--config.unlearn.forget_class=10", "unlearn.forget_class=10"),
    ("--config.fl.rounds=0", "fl.rounds"),
    ("--config.fl.runner=gpu", "fl.runner='gpu'"),
    ("--config.model.name=alexnet", "model.name='alexnet'"),
    ("--config.data.source=idx:/nonexistent", "/nonexistent"),
    ("--config.fl.client_lr=1e6", "NaN"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, flag, expect):
  out = _main(str(tmp_path), "retrain", flag, check=False)
  assert out.returncode != 0
  assert expect in out.stderr, out.stderr[-2000:]
  assert not glob.glob(os.path.join(str(tmp_path), "*", "results.json"))


def test_unknown_method_lists_allowed(tmp_path):
  out = _main(str(tmp_path), "nosuch", check=False)
  assert out.returncode != 0
  assert "retrain" in out.stderr and "nosuch" in out.stderr


def test_train_size_subsamples_before_partitioning_and_is_validated():
  task = run_lib.build_task(small_config(**{"data.train_size": 200}))
  assert int(task.clients.count.sum()) == 200
  assert int(task.clients.valid.sum()) == 200
  # 0..n_train allowed; anything else is one clear ConfigError (types: ml_collections).
  n = len(run_lib.build_task(small_config()).dataset.y_train)
  for bad in (-1, n + 1):
    with pytest.raises(run_lib.ConfigError, match=r"data.train_size="):
      run_lib.build_task(small_config(**{"data.train_size": bad}))


def test_build_task_holds_one_copy_and_index_blocks():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fu_jax import data as data_lib, images  # pylint: disable=g-import-not-at-top
  cfg = small_config(**{"data.partition": "client_dirichlet", "data.num_clients": 40,
                        "data.alpha": 0.3, "data.size_sigma": 1.0, "data.min_size": 1})
  task = run_lib.build_task(cfg)
  x = task.clients.x
  assert isinstance(x, images.ClientImages) and x.table.codes.dtype == np.uint8
  assert x.index is task.clients.index  # the index block is stored once
  parts = data_lib.partition(task.dataset.y_train, 40, kind="client_dirichlet", seed=cfg.seed,
                             alpha=0.3, size_sigma=1.0, min_size=1)
  old = data_lib.stack_clients(task.dataset.x_train, task.dataset.y_train, parts)
  np.testing.assert_array_equal(np.asarray(x).view(np.uint32), old.x.view(np.uint32))
  np.testing.assert_array_equal(np.asarray(task.clients.y), old.y)
  with pytest.raises(run_lib.ConfigError, match=r"data.size_sigma=-1.0"):
    run_lib.validate(small_config(**{"data.size_sigma": -1.0}), "retrain")
