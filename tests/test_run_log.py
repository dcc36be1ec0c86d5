"""fu_jax.run_log.RunLogger: tag names, the summary group, no duplicated steps on resume."""

import glob
import os
import time

from fu_jax import run_log as log_lib
from tests import tb_events


def _log_rounds(logdir, steps):
  logger = log_lib.RunLogger(logdir)
  for s in steps:
    logger.scalars(
      s,
      {
        "train": {"loss": 1.0 / s},
        "eval": {"test_acc": 0.1 * s, "per_class_acc": [0.5, 0.25]},
        "time": {"round_s": 0.01},
      },
    )
  return logger


def test_tags_are_slash_separated_and_the_summary_sorts_after_the_curves(tmp_path):
  logger = _log_rounds(str(tmp_path), [1, 2])
  logger.summary(
    3,
    {"fl": {"rounds": 2}, "seed": 0},
    {
      "test_acc": 0.9,
      "unlearn_seconds": 1.5,
      "method": "retrain",
      "forget_acc": float("nan"),
      "per_class_acc": [0.9],
    },
  )
  logger.close()
  got = tb_events.scalars(str(tmp_path))
  curves = {
    "train/loss",
    "eval/test_acc",
    "eval/per_class_acc/0",
    "eval/per_class_acc/1",
    "time/round_s",
  }
  summary = {"trial/test_acc", "trial/unlearn_seconds"}  # strings, NaN, lists: skipped
  assert set(got) == curves | summary
  assert got["train/loss"] == [(1, 1.0), (2, 0.5)]
  assert got["trial/test_acc"] == [(3, 0.8999999761581421)]  # float32 on disk
  # TensorBoard orders groups by name: every single-point group comes after the curves.
  groups = sorted({t.split("/")[0] for t in got})
  assert groups[-1] == log_lib.SUMMARY_GROUP
  assert {t.split("/")[0] for t in summary} == {log_lib.SUMMARY_GROUP}


def test_a_resumed_writer_hides_the_steps_written_again(tmp_path):
  # A killed process logged rounds 1-5; its checkpoint was after round 3, so the resumed
  # process logs rounds 4-5 again.
  _log_rounds(str(tmp_path), [1, 2, 3, 4, 5]).close()
  time.sleep(1.1)  # event file names start with the creation time in seconds
  _log_rounds(str(tmp_path), [4, 5, 6]).close()
  assert len(glob.glob(os.path.join(str(tmp_path), "events.out.tfevents.*"))) == 2
  got = tb_events.scalars(str(tmp_path))
  assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_nothing_written_means_no_event_file(tmp_path):
  log_lib.RunLogger(str(tmp_path)).close()  # e.g. a cached phase that logs nothing
  assert not glob.glob(os.path.join(str(tmp_path), "events.out.tfevents.*"))
