"""A Ctrl-C during a checkpoint save is held until the save has finished."""

import os
import signal

import jax.numpy as jnp
import pytest

from fu_jax import checkpoint


@pytest.fixture(autouse=True)
def python_default_sigint():
  """Python's own handler (raises KeyboardInterrupt), whatever an earlier test in this
  worker installed (a test runner's worker may ignore SIGINT)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_sigint_inside_the_block_is_delivered_after_it():
  before = signal.getsignal(signal.SIGINT)
  done = []
  with pytest.raises(KeyboardInterrupt):
    with checkpoint.sigint_deferred():
      os.kill(os.getpid(), signal.SIGINT)
      done.append("rest of the block ran")
  assert done == ["rest of the block ran"]
  assert signal.getsignal(signal.SIGINT) is before


def test_a_save_interrupted_by_sigint_completes_then_raises(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path), {"a": 1}, every=1)
  save = ckpt._save  # pylint: disable=protected-access

  def interrupted_save(*args):
    os.kill(os.getpid(), signal.SIGINT)  # arrives while the save is under way
    save(*args)

  monkeypatch.setattr(ckpt, "_save", interrupted_save)
  with pytest.raises(KeyboardInterrupt):
    ckpt.maybe_save(1, {"w": jnp.ones(3)})
  assert ckpt.latest_step() == 1
  state, step, _ = ckpt.restore_or({"w": jnp.zeros(3)})
  assert step == 1 and float(state["w"].sum()) == 3.0
  ckpt.close()


def test_no_sigint_no_change():
  before = signal.getsignal(signal.SIGINT)
  with checkpoint.sigint_deferred():
    pass
  assert signal.getsignal(signal.SIGINT) is before
