"""Reads TensorBoard event files as TensorBoard shows them (tensorboard itself is optional).

Files are read in name order (the order TensorBoard loads a run's files: names start with
the creation time); a `SessionLog.START` event at step P hides every scalar read so far at
a step >= P, as TensorBoard's event accumulator does when a restarted writer sets
`purge_step`.
"""

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def _records(path):
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    yield data[pos + 12 : pos + 12 + length]  # length, its crc, payload, payload crc
    pos += 12 + length + 4


def scalars(logdir: str) -> dict:
  """{tag: [(step, value), ...]} of the event files directly in `logdir`."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for rec in _records(path):
      ev = event_pb2.Event.FromString(rec)
      if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
        out = {t: [(s, v) for s, v in pts if s < ev.step] for t, pts in out.items()}
      for val in ev.summary.value:
        if val.HasField("simple_value"):
          out.setdefault(val.tag, []).append((ev.step, val.simple_value))
  return out
