"""A run killed after some of its unlearning rounds and resumed writes the results.json an
uninterrupted run writes (timings aside), per-round statistics of the restored rounds
included (base.Env.round_metrics)."""

import os

import pytest

from experiments import run as run_lib
from fu_jax import checkpoint
from tests import pretrain_cache
from tests.test_experiments import small_config

# Methods whose results report statistics of their unlearning rounds (sga_stopped_fraction,
# fedaf_*_epochs_run, fedaf_*_unlearn_loss, ...).
ROUND_STATISTICS = ("sga", "fedaf", "fedaf_c")


def _strip_timing(results):
  return {k: v for k, v in results.items() if k not in run_lib.TIMING_FIELDS}


def _kill_after_first_unlearning_checkpoint(monkeypatch, method: str):
  """Makes the next run stop (as a kill would) right after the first checkpoint written in
  the method's own directory: its first unlearning round is restored on the resume."""
  save = checkpoint.Checkpointer.maybe_save

  def save_then_kill(self, step, state, **kwargs):
    before = self.latest_step()
    save(self, step, state, **kwargs)
    mine = os.sep + os.path.join(method, "ckpt") + os.sep in self.directory
    if mine and self.latest_step() != before:
      raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint.Checkpointer, "maybe_save", save_then_kill)


@pytest.mark.slow
@pytest.mark.parametrize("method", ROUND_STATISTICS)
def test_a_resumed_run_reports_what_an_uninterrupted_one_does(tmp_path, monkeypatch, method):
  cfg = small_config(method=method, **{"mia.enabled": False})
  ref = pretrain_cache.run(cfg, str(tmp_path / "ref"))
  wd = str(tmp_path / "killed")
  pretrain_cache.pretrain(cfg, wd)
  with monkeypatch.context() as m:
    _kill_after_first_unlearning_checkpoint(m, method)
    with pytest.raises(KeyboardInterrupt):
      run_lib.run(cfg, wd)
  assert not os.path.exists(os.path.join(wd, method, "results.json"))
  got = run_lib.run(cfg, wd)
  stats = [k for k in ref if k.endswith(("_stopped_fraction", "_epochs_run", "_unlearn_loss"))]
  assert stats, sorted(ref)  # the method reports round statistics
  assert _strip_timing(got) == _strip_timing(ref)
