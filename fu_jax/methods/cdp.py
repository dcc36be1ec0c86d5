"""CDP: federated unlearning via class-discriminative pruning (Wang et al., WWW 2022), the
pruning baseline of Xu et al. ("Update Selective Parameters", Sec. 6.1.3, ref. [26]).

  1. Each client runs the trained model on (up to cdp.stat_samples of) its local data and
     uploads per-class sums of its channel activations (ReLU of each conv layer's output,
     averaged over space; fu_jax.class_pruning.class_activation_sums): K x C floats per conv layer plus K
     counts, never data or gradients.
  2. The server sums them, takes per-class means and scores every channel's
     class-discrimination by TF-IDF (fu_jax.class_pruning.tfidf_scores).
  3. For each forgotten class it prunes (zeroes kernel slice and bias of) the
     ceil(cdp.sparsity * C) channels with the highest TF-IDF in every conv layer (the
     classifier is never pruned; fu_jax.class_pruning.cdp_prune_mask).
  4. FedAvg fine-tuning of the pruned model on the retained data for cdp.finetune_rounds
     rounds; pruned channels stay exactly zero (masked optimizer), as a pruned network has
     no such channels to train.

Our choice: how much repair. Counted in rounds of one local epoch, it shrinks with the data
(2 epochs are 7 steps a client at 4,000 Fashion-MNIST images, 170 at 60,000). `cdp.min_steps` makes it a
budget in steps instead: each round's local epochs are raised to ceil(min_steps / s_min),
s_min the steps per epoch of the participating client with the fewest retained samples
(default 85: one epoch of a full-size Fashion-MNIST client, 5,400 retained images at batch
64, so the full-size run is unchanged).

Our choice: how much to prune. `cdp.sparsity` = 0.15 of each conv layer's channels per
forgotten class. At 0.3 the pruned network stayed 4.0 points of retained accuracy under
retraining at 12,000 Fashion-MNIST images (-4.9 / -4.6 / -2.5 over three seeds) with the
same repair; at 0.15 it is -1.0 (-1.5 / -0.7 / -0.7) and still forgets the class (0.0-0.1%),
and digits and 4,000 images are unchanged within their seed spread (BUILD.md, the evidence
section). The most class-discriminative channels carry the class; pruning twice as many
also removes capacity the other classes use, which a fixed repair budget does not win back.

Cost (fl.round_cost, as every method): step 1 is a round in which each client with data
downloads the trained model and uploads its statistics (counted exactly), then full-model
rounds (fedavg_phase).
Requests: class-wide only (the method scores classes; client_class / client requests have
no class-discriminative channels to prune without hurting the class elsewhere).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax import class_pruning, fl, masking
from fu_jax import tree as tu
from fu_jax.methods import base, channel


def config_section(fl_cfg):
  """The `cdp` section (`fl_cfg`: the config's fl section; unused)."""
  del fl_cfg
  s = base.new_section()
  s.sparsity = 0.15  # fraction of each conv layer's channels pruned per class
  s.finetune_rounds = 2  # FedAvg rounds on retained data after pruning
  s.min_steps = 85  # local epochs per round raised so every client takes >= this many steps
  #                   (0 = fl.local_epochs as given)
  s.stat_samples = 256  # examples per client for class activations (0 = all)
  s.coe = 0.0  # TF-IDF width balance (Wang et al.'s coe; 0 = none)
  return s


RULES = {
  "sparsity": base.in_range(0, 1, low_open=True, high_open=True),
  "finetune_rounds": base.at_least(0),
  "min_steps": base.at_least(0, "0 = fl.local_epochs as given"),
  "stat_samples": base.at_least(0, "0 = all"),
  "coe": base.at_least(0, "0 = no width balance"),
}


def validate(config):
  base.check_section(config, "cdp", RULES)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _client_sums(module, params, x, y, mask, num_classes, layers):
  return class_pruning.class_activation_sums(module, params, x, y, mask, num_classes, layers=layers)


@jax.jit
def _prune(channel_masks, params):
  """(params with the channels zeroed, parameter mask of everything else)."""
  pmask = masking.channel_mask_to_param_mask(channel_masks, params)
  return masking.zero_masked(params, pmask), jax.tree.map(jnp.logical_not, pmask)


def class_statistics(task: base.Task, params, layers, stat_samples: int):
  """Step 1-2: per-client activation sums over up to stat_samples valid examples each,
  summed over clients. Returns (ClassActivations, bytes one client uploads, int [N] examples
  each client used)."""
  c = task.clients
  n, max_n = c.valid.shape
  m = max_n if stat_samples <= 0 else min(stat_samples, max_n)
  total, up, used = None, 0, np.zeros(n, np.int64)
  for k in range(n):
    if float(task.client_weights[k]) <= 0:
      continue
    key = fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, channel.stream_tag("cdp/stats"), k)
    order = fl.epoch_order(key, c.valid[k])[:m]
    mask = jnp.take(c.valid[k], order)
    if not bool(jnp.any(mask)):
      continue
    sums = _client_sums(
      task.model,
      params,
      jnp.take(c.x[k], order, axis=0),
      jnp.take(task.y_true[k], order),
      mask,
      task.num_classes,
      layers,
    )
    up = tu.tree_num_bytes(sums)
    used[k] = int(jnp.sum(mask))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return total, up, used


def _cdp(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  if task.request.kind != "class":
    raise ValueError(f"cdp serves class requests only, got {task.request.kind!r}")
  cfg = task.config
  s = cfg.cdp
  params = trained.params
  layers = tuple(class_pruning.cdp_layers(task.model, params, task.clients.x[0, :1]))
  stats, up, used = class_statistics(task, params, layers, s.stat_samples)
  cost = fl.round_cost(
    used, task.client_weights, model_bytes=tu.tree_num_bytes(params), epochs=1, upload_bytes=up
  )
  env.add_cost(**cost)
  scores = class_pruning.tfidf_scores(class_pruning.class_means(stats), coe=s.coe)
  prune = None
  for cls in task.request.classes:
    pm = class_pruning.cdp_prune_channels(scores, cls, s.sparsity)
    prune = pm if prune is None else {p: prune[p] | pm[p] for p in pm}
  prune = {p: np.asarray(v) for p, v in prune.items()}
  pruned, keep = _prune(prune, params)
  program = channel.masked_program(task, cfg.fl.client_lr, cfg.fl.client_momentum)
  retained = np.asarray(task.retain_valid).sum(axis=1) * (np.asarray(task.client_weights) > 0)
  epochs = base.epochs_for_steps(retained, cfg.fl.local_epochs, s.min_steps, cfg.fl.batch_size)
  out = (
    base.fedavg_phase(
      task,
      env,
      "cdp_finetune",
      pruned,
      s.finetune_rounds,
      valid=task.retain_valid,
      client_weights=task.client_weights,
      program=program,
      extra=channel.per_client(keep, task.clients.count.shape[0]),
      epochs=epochs,
      round_offset=cfg.fl.rounds,
    )
    if s.finetune_rounds
    else pruned
  )
  n_pruned = sum(int(v.sum()) for v in prune.values())
  n_conv = sum(int(v.size) for v in prune.values())
  results = {
    "sparsity": s.sparsity,
    "finetune_rounds": s.finetune_rounds,
    "finetune_epochs_per_round": epochs,
    "stat_examples": cost["examples"],
    "stat_bytes_up": cost["bytes_up"],
    "pruned_channels": n_pruned,
    "pruned_channel_fraction_of_conv": n_pruned / max(n_conv, 1),
    "pruned": {"/".join(map(str, p)): np.flatnonzero(v).tolist() for p, v in prune.items()},
    "model_bytes": tu.tree_num_bytes(params),
  }
  return base.Outcome(out, results)


SECTION = base.Section("cdp", config_section, validate)
STREAMS = (channel.stream_tag("cdp/stats"),)  # its fold_in id under fl.STREAM_UNLEARN

METHODS = {
  "cdp": base.Method(
    "cdp",
    ("class",),
    base.FEDAVG,
    _cdp,
    "class-discriminative pruning removes the channels that "
    "discriminate a class: it addresses classes only",
    section=SECTION,
    streams=STREAMS,
  )
}
