"""Several processes, one run: two local processes of one CPU device each run the `shard`
runner over one global mesh, resume from a checkpoint, and end bit-identical (results and
checkpoints) to one process with two devices."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import run as run_lib
from experiments.configs import digits
from fu_jax import multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# FedAvg (2 rounds, 4 clients, MLP) then fine-tuning on the retained data (1 round), class
# request: few distinct programs, since process 1 compiles all of its own (its device is
# part of every cache key, and only process 0 writes the compilation cache).
OVERRIDES = {
  "fl.rounds": 2,
  "data.num_clients": 4,
  "model.name": "mlp",
  "fl.runner": "shard",
  "checkpoint_every": 1,
  "eval_every": 2,
  "finetune.rounds": 1,
  "mia.enabled": False,
}
METHOD = "finetune"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(workdir: str, timeout: float = 600):
  """Runs experiments.main as processes 0 and 1 of one run (one CPU device each)."""
  port = _free_port()
  env = dict(os.environ)
  flags = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
  )
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    f"--method={METHOD}",
    "--config=experiments/configs/digits.py",
    f"--workdir={workdir}",
    *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
    f"--coordinator_address=localhost:{port}",
    "--num_processes=2",
  ]
  procs = [
    subprocess.Popen(
      cmd + [f"--process_id={i}"],
      cwd=ROOT,
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i in (1, 0)
  ][::-1]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:  # one failed process leaves the other waiting for it: end both
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-2000:]}\n{err[-3000:]}"
  return [o for o, _ in outs]


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, METHOD, "results.json")) as f:
    return {k: v for k, v in json.load(f).items() if k not in run_lib.TIMING_FIELDS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(workdir, results) of the same run in this process: one process, two devices
  (conftest.py)."""
  assert jax.device_count() == 2 and multihost.process_count() == 1
  wd = str(tmp_path_factory.mktemp("one_process"))
  c = digits.get_config()
  c.update_from_flattened_dict(dict(OVERRIDES, method=METHOD))
  run_lib.run(c, wd)
  return wd, _results(wd)


def _checkpoint_arrays(step_dir: str) -> list:
  """The state arrays of an orbax step directory, read as numpy (whatever wrote it)."""
  path = os.path.join(step_dir, "state")
  ckpt = ocp.PyTreeCheckpointer()
  tree = ckpt.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return jax.tree.leaves(ckpt.restore(path, restore_args=args))


@pytest.mark.slow
def test_two_processes_resume_and_equal_one_process_with_as_many_devices(tmp_path, reference):
  ref_dir, ref = reference
  wd = str(tmp_path)
  # Resume: the trained model's directory as the reference left it after round 1 (its
  # round-2 checkpoint, evaluation and timing removed). Both processes restore round 1
  # through orbax, then train round 2 and fine-tune across the two processes.
  shutil.copytree(os.path.join(ref_dir, "pretrain"), os.path.join(wd, "pretrain"))
  (pre,) = glob.glob(os.path.join(wd, "pretrain", "*"))
  shutil.rmtree(os.path.join(pre, "ckpt", "train", "steps", "2"))
  for f in glob.glob(os.path.join(pre, "*.json")) + glob.glob(os.path.join(pre, "events.*")):
    os.remove(f)
  outs = _two_processes(wd)
  assert "[train] resumed after round 1/2" in outs[0]
  got = _results(wd)
  # Each device trains the same clients in both layouts and the gathered results are
  # aggregated and evaluated on one device: nothing is summed in another order.
  assert got == ref
  assert got["runner"] == "shard" and got["rounds"] == 1
  assert got["test_acc"] > 0.5 and got["forget_acc"] < got["original"]["forget_acc"]
  # The checkpoints the two processes wrote together hold the one-process run's arrays.
  for phase in (
    os.path.join("pretrain", os.path.basename(pre), "ckpt", "train", "steps", "2"),
    os.path.join(METHOD, "ckpt", METHOD, "steps", "1"),
  ):
    a, b = (_checkpoint_arrays(os.path.join(d, phase)) for d in (wd, ref_dir))
    assert len(a) == len(b) > 0 and all(
      x.shape == y.shape and (x == y).all() for x, y in zip(a, b)
    ), phase
  # Process 0 alone writes results and TensorBoard events; process 1 prints no progress.
  assert len(glob.glob(os.path.join(wd, METHOD, "events.out.tfevents.*"))) == 1
  assert "[finetune] round 1/1" in outs[0] and "[finetune] round" not in outs[1]


@pytest.mark.slow
def test_bad_process_flags_are_one_line(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    "--method=retrain",
    "--config=experiments/configs/digits.py",
    f"--workdir={tmp_path}",
    "--coordinator_address=localhost:1",
    "--num_processes=2",
    "--process_id=2",
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
    "error: --process_id=2: allowed 0..1 (distinct for every process)"
  ]
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
  "args, match",
  [
    (("localhost:1", 2, None), "--process_id=None"),
    ((None, 2, 0), "--coordinator_address is required"),
    (("localhost", 2, 0), "expected host:port"),
    (("localhost:1", 0, 0), "--num_processes=0"),
  ],
)
def test_check_args_names_the_bad_value(args, match):
  with pytest.raises(ValueError, match=match):
    multihost.check_args(*args)


def test_check_args_one_process():
  assert not multihost.check_args(None, None, None)
  assert not multihost.check_args(None, 1, 0)
  assert multihost.check_args("10.0.0.1:1234", 2, 1)
