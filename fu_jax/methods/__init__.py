"""Method registry: a plain dict from name to `base.Method`."""
from fu_jax.methods import base
from fu_jax.methods import baselines
from fu_jax.methods import cdp, channel  # channel-explanation unlearning + CDP baseline
from fu_jax.methods import quickdrop
from fu_jax.methods import fedaf, sga  # FedAF (+ FedAF-C ablation) and the SGA baseline
from fu_jax.methods import federaser, frr  # FedEraser and FRR (rapid retraining) baselines

REGISTRY = {}
REGISTRY.update(baselines.METHODS)
REGISTRY.update({**channel.METHODS, **cdp.METHODS})
REGISTRY.update(quickdrop.METHODS)
REGISTRY.update({**fedaf.METHODS, **sga.METHODS})
REGISTRY.update({**federaser.METHODS, **frr.METHODS})

TRAINERS = {}  # name -> trainer(task, env) -> base.Trained
TRAINERS.update(baselines.TRAINERS)
TRAINERS.update(quickdrop.TRAINERS)
TRAINERS.update(federaser.TRAINERS)
TRAIN_KEYS = {"quickdrop": quickdrop.TRAIN_KEYS, "federaser": federaser.TRAIN_KEYS}  # trainer -> config keys of its section it reads


def get(name: str) -> base.Method:
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; allowed: {sorted(REGISTRY)}")
  return REGISTRY[name]
