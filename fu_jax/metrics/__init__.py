"""Evaluation protocol (docs/design.md §6): accuracy, membership inference, backdoor.

accuracy  predict_logits, per_example_loss, per_class_accuracy, evaluate (the plain
          `accuracy` function stays in fu_jax.metrics.accuracy: re-exporting it here would
          shadow the submodule of the same name)
mia       loss_threshold_auc, trained_attack_accuracy, membership_inference, shadow_attack
backdoor  Trigger, Flip, apply_trigger, plant_backdoor, backdoor_accuracy
"""

from fu_jax.metrics.accuracy import (
  evaluate,
  log_softmax64,
  loss_from_logits,
  per_class_accuracy,
  per_example_loss,
  predict_logits,
)
from fu_jax.metrics.backdoor import (
  Flip,
  Trigger,
  apply_trigger,
  backdoor_accuracy,
  flip_labels,
  plant_backdoor,
  trigger_for,
)
from fu_jax.metrics.mia import (
  balance,
  loss_threshold_auc,
  membership_inference,
  shadow_attack,
  sorted_log_softmax,
  trained_attack_accuracy,
)

__all__ = [
  "evaluate",
  "log_softmax64",
  "loss_from_logits",
  "per_class_accuracy",
  "per_example_loss",
  "predict_logits",
  "Flip",
  "Trigger",
  "apply_trigger",
  "backdoor_accuracy",
  "flip_labels",
  "plant_backdoor",
  "trigger_for",
  "balance",
  "loss_threshold_auc",
  "membership_inference",
  "shadow_attack",
  "sorted_log_softmax",
  "trained_attack_accuracy",
]
