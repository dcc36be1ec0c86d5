"""The method registry: every `base.Method` by name, with its trainer and config section.

A method declares everything about itself in its `base.Method` (kinds, trainer, unlearn,
config section, whether it unlearns, its key streams). Adding one is a module that
defines it and one line in MODULES below; code outside the package (a test, a plugin)
calls `register(method)` before building its config. experiments/configs/default.py
builds a section for each entry of SECTIONS, experiments.compare.NO_UNLEARNING lists the
methods with unlearns=False.
"""

from fu_jax.methods import (
  base,
  baselines,  # fedavg (no unlearning), retrain, finetune
  cdp,  # class-discriminative pruning
  channel,  # channel-explanation unlearning: channel_de, channel_ce, channel_de_random
  fedaf,  # FedAF and its FedAF-C ablation
  federaser,
  frr,  # rapid retraining
  quickdrop,  # QuickDrop and its undistilled ablation
  sga,  # stochastic gradient ascent (+ its calibrated stop)
)

# Each module's METHODS, in this order (the order of the config's method sections).
MODULES = (baselines, channel, cdp, quickdrop, fedaf, sga, federaser, frr)

REGISTRY: dict[str, base.Method] = {}  # method name -> Method
TRAINERS: dict[str, base.Trainer] = {}  # trainer name (e.g. "fedavg") -> Trainer
SECTIONS: dict[str, base.Section] = {}  # config section name -> Section


def register(*methods: base.Method) -> None:
  """Adds `methods` to the registry, their trainers to TRAINERS and their config sections
  to SECTIONS (a config built afterwards has them). Raises ValueError, adding none of them,
  on a name registered already, a trainer or section name that another object holds, or
  a key stream (fold_in id under fl.STREAM_UNLEARN) that another section's method draws
  from: methods share a trainer, a section or a stream by sharing its object."""
  registry, trainers, sections = dict(REGISTRY), dict(TRAINERS), dict(SECTIONS)
  for m in methods:
    if m.name in registry:
      raise ValueError(f"method {m.name!r} is registered already")
    if trainers.setdefault(m.trainer.name, m.trainer) != m.trainer:
      raise ValueError(f"{m.name}: another trainer is registered as {m.trainer.name!r}")
    if m.section is not None and sections.setdefault(m.section.name, m.section) != m.section:
      raise ValueError(f"{m.name}: another config section is registered as {m.section.name!r}")
    for other in registry.values():
      shared = set(m.streams) & set(other.streams)
      if shared and (m.section is None or other.section != m.section):
        raise ValueError(
          f"{m.name}: key stream {sorted(shared)} is {other.name}'s; take an unused id"
        )
    registry[m.name] = m
  REGISTRY.update(registry)
  TRAINERS.update(trainers)
  SECTIONS.update(sections)


for _module in MODULES:
  register(*_module.METHODS.values())


def get(name: str) -> base.Method:
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; allowed: {sorted(REGISTRY)}")
  return REGISTRY[name]


def no_unlearning() -> tuple:
  """Names of the registered methods that return the trained model as it is."""
  return tuple(n for n, m in REGISTRY.items() if not m.unlearns)


def trainer(t: base.Trainer | str) -> base.Trainer:
  """A trainer, or the trainer of that name."""
  if isinstance(t, base.Trainer):
    return t
  if t not in TRAINERS:
    raise ValueError(f"unknown trainer {t!r}; allowed: {sorted(TRAINERS)}")
  return TRAINERS[t]
