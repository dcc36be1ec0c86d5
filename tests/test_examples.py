"""examples/reuse_transforms.py runs and does what it says."""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fu_jax import masking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_reuse_transforms_forgets_the_class_and_moves_only_the_selected_channels():
  example = _load("reuse_transforms")
  trained, unlearned, mask, report = example.main(seed=0, delta=0.2)
  # ceil(0.2 * C) output channels selected in every layer (kernel slice and bias entry).
  for path, c in masking.channel_layers(trained):
    layer = mask
    for k in path:
      layer = layer[k]
    assert int(np.asarray(layer["bias"]).sum()) == math.ceil(0.2 * c)
    assert np.all(np.asarray(layer["kernel"]) == np.asarray(layer["bias"])[None, :])
  # Outside the mask nothing moved, bit for bit; inside, the channels were retrained.
  moved = False
  for t, u, m in zip(*(jax.tree.leaves(a) for a in (trained, unlearned, mask))):
    t, u, m = np.asarray(t), np.asarray(u), np.asarray(m)
    np.testing.assert_array_equal(u[~m].view(np.uint32), t[~m].view(np.uint32))
    moved |= bool(np.any(u[m] != t[m]))
  assert moved
  assert report["trained"]["forget_acc"] > 0.95 and report["trained"]["retain_acc"] > 0.95
  assert report["unlearned"]["forget_acc"] < 0.1  # the class is forgotten ...
  assert report["unlearned"]["retain_acc"] > 0.95  # ... and the rest kept


@pytest.mark.slow
def test_reuse_transforms_without_scikit_learn_stops_with_one_line_naming_the_extra():
  # A plain `pip install .` has no scikit-learn: None in sys.modules makes importing it fail.
  hide = "import sys, runpy; sys.modules['sklearn'] = None; runpy.run_path(sys.argv[1])"
  path = os.path.join(ROOT, "examples", "reuse_transforms.py")
  p = subprocess.run([sys.executable, "-c", hide, path], capture_output=True, text=True)
  assert p.returncode == 1 and p.stdout == ""
  assert p.stderr.splitlines() == [
    'this example reads scikit-learn\'s digits: pip install "fu_jax[experiments]"'
  ]
