"""Method registry: a plain dict from name to `base.Method` (each carries its trainer)."""

from fu_jax.methods import (  # channel-explanation unlearning + CDP baseline  # FedAF (+ FedAF-C ablation) and the SGA baseline  # FedEraser and FRR (rapid retraining) baselines
  base,
  baselines,
  cdp,
  channel,
  fedaf,
  federaser,
  frr,
  quickdrop,
  sga,
)

REGISTRY = {}
REGISTRY.update(baselines.METHODS)
REGISTRY.update({**channel.METHODS, **cdp.METHODS})
REGISTRY.update(quickdrop.METHODS)
REGISTRY.update({**fedaf.METHODS, **sga.METHODS})
REGISTRY.update({**federaser.METHODS, **frr.METHODS})

# The methods' trainers by name (for callers that name one, e.g. "fedavg").
TRAINERS = {m.trainer.name: m.trainer for m in REGISTRY.values()}


def get(name: str) -> base.Method:
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; allowed: {sorted(REGISTRY)}")
  return REGISTRY[name]


def trainer(t: base.Trainer | str) -> base.Trainer:
  """A trainer, or the trainer of that name."""
  if isinstance(t, base.Trainer):
    return t
  if t not in TRAINERS:
    raise ValueError(f"unknown trainer {t!r}; allowed: {sorted(TRAINERS)}")
  return TRAINERS[t]
