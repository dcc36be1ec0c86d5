"""Method registry: a plain dict from name to `base.Method`."""
from fu_jax.methods import base
from fu_jax.methods import baselines

REGISTRY = {}
REGISTRY.update(baselines.METHODS)

TRAINERS = {}  # name -> trainer(task, env) -> base.Trained
TRAINERS.update(baselines.TRAINERS)


def get(name: str) -> base.Method:
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; allowed: {sorted(REGISTRY)}")
  return REGISTRY[name]
