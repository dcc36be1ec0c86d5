"""Class-discriminative pruning (CDP): TF-IDF channel scores and the channels to prune.

Wang et al., "Federated Unlearning via Class-Discriminative Pruning", WWW 2022. Each client
measures the mean activation of every conv channel per class; the server scores channel c
for class k by TF-IDF,

    tf[k, c]  = A[k, c] / sum_c' A[k, c'] * b,   b = log(e * C / coe) if coe else 1
    rel[k, c] = A[k, c] >= mean_k' A[k', c]      (channel c is "relevant" to class k)
    idf[c]    = log(K / (1 + sum_k rel[k, c]))
    tfidf     = tf * idf,

and prunes (zeroes) the channels with the highest TF-IDF for the class to forget.

Choices the paper leaves open, and what we do (following the authors' released code where
it says more than the paper):
- Activation of a channel: ReLU of the layer output averaged over space (their code:
  ReLU then avg_pool2d with the map's width as window; we take the global spatial mean).
- Layers: conv layers only, in call order, never the final layer (their code hooks every
  nn.Conv2d and nothing else).
- Threshold: per layer, the ceil(sparsity * C) highest scores (their code thresholds
  globally over all layers, which needs its `coe` width balance).
- Direction: the highest TF-IDF channels are pruned, as the paper's text says (the released
  code's NNI masker keeps channels with score > threshold, which reads as the opposite).

Layers are addressed as in `fu_jax.masking` (a path of dict keys to a dict holding
'kernel'; output channels on the kernel's last axis).
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fu_jax.masking import (
  Path,
  channel_mask_to_param_mask,
  layer_at,
  layer_outputs,
  num_selected,
  top_k_mask,
)

__all__ = [
  "cdp_layers",
  "channel_activations",
  "ClassActivations",
  "class_activation_sums",
  "class_means",
  "tfidf_scores",
  "class_channel_scores",
  "cdp_prune_channels",
  "cdp_prune_mask",
]


def _cdp_select(outs, params):
  order = list(outs)  # call order
  return [p for p in order[:-1] if layer_at(params, p)["kernel"].ndim >= 3]


def cdp_layers(module, params, x) -> list:
  """Layers CDP scores: conv layers (kernel ndim >= 3), in call order, minus the final layer.

  As in Wang et al.'s code, which hooks every nn.Conv2d and nothing else. The final layer in
  call order is the classifier; it is never pruned, even when it is a conv.
  """
  return _cdp_select(layer_outputs(module, params, x), params)


def channel_activations(module, params, x, *, layers: Sequence[Path] | None = None) -> dict:
  """Per-example channel activations: ReLU(layer output) averaged over spatial axes.

  dict path -> [B, C], for `layers` (default cdp_layers). Wang et al.'s code applies ReLU
  then avg_pool2d with the map's width as window (global for square maps); we take the
  global spatial mean.
  """
  outs = layer_outputs(module, params, x, layers=layers)
  if layers is None:
    layers = _cdp_select(outs, params)
  acts = {}
  for p in map(tuple, layers):
    o = outs[p]
    acts[p] = jnp.mean(jax.nn.relu(o), axis=tuple(range(1, o.ndim - 1)))
  return acts


class ClassActivations(NamedTuple):
  """Per-class sums of channel activations (sum over clients to aggregate)."""

  sums: dict  # path -> [K, C]
  counts: Any  # [K] examples per class


def class_activation_sums(
  module, params, x, y, mask, num_classes: int, *, layers: Sequence[Path] | None = None
) -> ClassActivations:
  """Per-class sums of channel_activations over the valid rows (a client's local step)."""
  acts = channel_activations(module, params, x, layers=layers)
  valid = jnp.ones(y.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * valid[:, None]
  sums = {p: onehot.T @ a.astype(jnp.float32) for p, a in acts.items()}
  return ClassActivations(sums=sums, counts=jnp.sum(onehot, axis=0))


def class_means(ca: ClassActivations) -> dict:
  """Mean activation per class, dict path -> [K, C] (0 for classes without examples)."""
  return {p: s / jnp.maximum(ca.counts, 1.0)[:, None] for p, s in ca.sums.items()}


def tfidf_scores(means: dict, *, coe: float = 0.0) -> dict:
  """TF-IDF of every channel for every class (Wang et al. 2022), dict path -> [K, C].

  With A[k, c] the mean activation of channel c over class k:
    tf[k, c]  = A[k, c] / sum_c' A[k, c'] * b,   b = log(e * C / coe) if coe else 1
    rel[k, c] = A[k, c] >= mean_k' A[k', c]      (channel c is "relevant" to class k)
    idf[c]    = log(K / (1 + sum_k rel[k, c]))
    tfidf     = tf * idf
  as in the authors' released code (calc_tf_idf): relevance is judged on the raw class means,
  not on tf. A class with zero total activation gets tf 0 (their code would divide by 0).
  """
  out = {}
  for p, a in means.items():
    a = jnp.asarray(a, jnp.float32)
    k, c = a.shape
    bal = math.log(math.e * c / coe) if coe else 1.0
    tot = jnp.sum(a, axis=1, keepdims=True)
    tf = jnp.where(tot > 0, a / jnp.where(tot > 0, tot, 1.0), 0.0) * bal
    rel = jnp.sum(a >= jnp.mean(a, axis=0, keepdims=True), axis=0).astype(jnp.float32)
    idf = jnp.log(k / (rel + 1.0))
    out[p] = tf * idf[None, :]
  return out


def class_channel_scores(
  module,
  params,
  x,
  y,
  mask,
  num_classes: int,
  *,
  coe: float = 0.0,
  layers: Sequence[Path] | None = None,
) -> dict:
  """CDP TF-IDF scores dict path -> [K, C] from one (pooled) batch; classes absent get 0."""
  ca = class_activation_sums(module, params, x, y, mask, num_classes, layers=layers)
  return tfidf_scores(class_means(ca), coe=coe)


def cdp_prune_channels(scores: dict, target_class: int, sparsity: float) -> dict:
  """Channels to ZERO: per layer the ceil(sparsity * C) highest TF-IDF for target_class.

  Wang et al.: "channels with high TF-IDF scores have more discrimination on the target
  categories and thus need to be pruned". Their code thresholds globally over all layers
  (which needs its `coe` width balance); we select per layer, so every conv layer loses the
  same fraction. `scores` should hold conv layers only (cdp_layers), never the classifier.
  Ties go to the lower channel index. (The released code's NNI masker keeps channels with
  score > threshold, which reads as the opposite direction; we follow the paper's text.)
  """
  out = {}
  for p, s in scores.items():
    s = jnp.asarray(s)
    if not 0 <= int(target_class) < s.shape[0]:
      raise ValueError(f"target_class={target_class}; must be in [0, {s.shape[0]})")
    out[p] = top_k_mask(s[int(target_class)], None, num_selected(sparsity, s.shape[1]))
  return out


def cdp_prune_mask(scores: dict, target_class: int, sparsity: float, params):
  """Parameter mask (True = zero it) of cdp_prune_channels; apply with zero_masked."""
  return channel_mask_to_param_mask(
    cdp_prune_channels(scores, target_class, sparsity), params, others=False
  )
