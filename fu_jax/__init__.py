"""fu_jax: federated unlearning in JAX/Flax.

Reusable transforms (import only jax, optax, chex, flax.linen):
  fu_jax.distill  gradient matching and synthetic-set updates (QuickDrop)
  fu_jax.ewc      diagonal / CountSketch Fisher and the EWC penalty (FedAF)
  fu_jax.labels   teacher labels for active forgetting (FedAF)
  fu_jax.masking  channel effects, channel masks, masked updates (Xu et al.)
  fu_jax.ascent   bounded stochastic gradient ascent (Wu et al. 2022)
Simulation: fu_jax.data, fu_jax.models, fu_jax.fl, fu_jax.methods, fu_jax.metrics.
"""
__version__ = "0.1.0"
