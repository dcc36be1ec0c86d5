"""The experiment runner, `python3 -m experiments.main` (see the README).

It needs the `experiments` extra (tfds, tensorboardX, scikit-learn, matplotlib,
ml-collections) on top of the library's own dependencies.
"""

import importlib.util as _util

_MISSING = [
  m
  for m in ("ml_collections", "tensorflow_datasets", "tensorboardX", "sklearn", "matplotlib")
  if _util.find_spec(m) is None
]
if _MISSING:
  # name= lets `python3 -m experiments.main` print this as one line instead of a traceback.
  raise ImportError(
    f"the experiment runner needs {', '.join(_MISSING)}: "
    "pip install 'fu_jax[experiments]' "
    "(from a clone: pip install '.[experiments]')",
    name=__name__,
  )
