"""fu_jax: federated unlearning in JAX/Flax.

Reusable transforms (each imports only jax, optax, chex and flax):
  fu_jax.distill  gradient matching and synthetic-set updates (QuickDrop)
  fu_jax.ewc      diagonal / CountSketch Fisher and the EWC penalty (FedAF)
  fu_jax.labels   teacher labels for active forgetting (FedAF)
  fu_jax.masking  channel effects, channel masks, masked updates (Xu et al.)
  fu_jax.class_pruning  TF-IDF channel scores, class-discriminative pruning (Wang et al.)
  fu_jax.ascent   bounded stochastic gradient ascent (Wu et al. 2022)
  fu_jax.losses   masked cross-entropy; fu_jax.tree: the pytree helpers optax lacks
Simulation: fu_jax.data, fu_jax.models, fu_jax.fl, fu_jax.methods, fu_jax.metrics (the
experiment runner's modules; they need the `experiments` extra).

The model convention, everywhere: a model is `apply_fn(params, x) -> logits [B, K]` over
the parameter pytree alone (the inner dict, never {'params': ...}); for a Flax module,
`lambda p, x: module.apply({'params': p}, x)`, or `fu_jax.models.logits_fn(module)`, which
is equal for equal modules, so jit caches keyed on apply_fn hit across calls. Stateful
pieces are optax `GradientTransformation`s whose per-client data (masks, EWC anchor and
curvature) lives in their state.

The most used functions are re-exported here (`fu_jax.masked_update`, ...); submodules and
re-exports load on first access, so `import fu_jax` itself imports nothing heavy.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
  "ascent",
  "class_pruning",
  "distill",
  "ewc",
  "labels",
  "losses",
  "masking",
  "tree",
  "checkpoint",
  "data",
  "fl",
  "run_log",
  "methods",
  "metrics",
  "models",
  "containers",
  "xla_flags",
)

# Public transforms re-exported at the top level: name -> submodule.
_EXPORTS = {
  # fu_jax.ascent
  "gradient_ascent": "ascent",
  "sga_epoch": "ascent",
  "project_l2_ball": "ascent",
  # fu_jax.distill
  "match_loss": "distill",
  "per_class_grads": "distill",
  "synthetic_update": "distill",
  "init_synthetic": "distill",
  "SyntheticSet": "distill",
  # fu_jax.ewc
  "add_ewc_gradient": "ewc",
  "fisher_diagonal": "ewc",
  "count_sketch": "ewc",
  "ewc_penalty": "ewc",
  "ewc_state_diag": "ewc",
  "ewc_state_sketch": "ewc",
  "set_ewc_state": "ewc",
  "example_ce_loss": "ewc",
  # fu_jax.labels
  "teacher_labels": "labels",
  "init_teachers": "labels",
  "forgetting_loss": "labels",
  # fu_jax.masking
  "channel_effects": "masking",
  "top_delta_mask": "masking",
  "top_delta_channels": "masking",
  "masked_update": "masking",
  "set_mask": "masking",
  # fu_jax.class_pruning
  "class_channel_scores": "class_pruning",
  "cdp_prune_mask": "class_pruning",
  # fu_jax.models
  "logits_fn": "models",
}

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
