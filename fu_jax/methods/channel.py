"""Channel-explanation unlearning (Xu et al., "Update Selective Parameters: Federated Machine
Unlearning Based on Model Explanation"; docs/design.md §5).

  channel_de         decentralized (Alg. 2): clients fine-tune ONLY the selected channels on
                     retained + perturbation data and upload only those channels;
  channel_ce         centralized (Sec. 4.4.2): the server alone fine-tunes the selected
                     channels on a small sample it holds; no client communication;
  channel_de_random  the paper's DE-random ablation: as channel_de, random channels (same
                     count per layer).

Both start with Alg. 1 (masking.channel_effects): the effect of output channel i of layer l
is S_{l,i} = H_b(M*, I) - H(M'_{l,i}, I), the accuracy drop on a batch I of forget-class
samples when the channel (kernel slice and bias) is zeroed; per layer the ceil(delta * C)
channels with the highest effect are selected (delta = channel.delta, 0.2 as in the paper's
non-IID MNIST/Fashion-MNIST setting).

Choices the paper leaves open, and ours:
- Who holds I: the server (Sec. 4.5: "the server constructs a small batch of data I
  consisting of samples from class 1"; Alg. 1 runs on the server). We draw
  channel.effect_samples of the training samples to forget (the request's own data, true
  labels) as that batch. The paper counts no communication for it and neither do we; the
  count is reported as `effect_samples`.
- Ties: accuracy on a small batch has few distinct values; effect_metric='both' (default)
  ranks by the paper's accuracy drop and breaks ties by the loss increase.
- Layers: every conv/dense layer, the classifier included (Alg. 1 line 5: "all layers").
- Perturbation data: each forget sample with a label drawn uniformly from the classes NOT
  being forgotten ("randomly selected incorrect labels"), drawn once per sample from
  fl.stream_key(seed, STREAM_UNLEARN, ...) folded with its dataset index, so DE and CE
  give a sample the same wrong label and a resumed run draws the same ones. In DE each
  client uses its own forget samples (clients generate perturbation data from their
  unlearning data, Sec. 4.4.1, then delete it).
- DE communication (Table 2: 2 n^2 c delta): per round each sampled client downloads the
  selected channels of the global model (Alg. 2 lines 4, 8: "broadcast part of global
  model") and uploads its update of those channels only (line 15). Both are counted as
  masking.pack_channels sends them: values plus int32 channel indices. The server really
  aggregates the packed uploads (weighted FedAvg mean of the packed values, scattered back)
  and writes only the selected entries, so nothing else can change.
- DE runs channel.epochs FedAvg rounds of channel.local_epochs (default fl.local_epochs,
  "the other setting ... the same as the original global training process").
- CE: the server's sample ("some samples with the same distribution of training data")
  is channel.server_samples examples drawn uniformly from the pooled training set (capped at
  its size); its forget-class members become perturbation data, the rest retained data.
  channel.epochs passes over it; bytes 0.
- Compute: we backpropagate through the whole model and mask the update
  (optax.chain(sgd, masking.masked_update())), so the paper's (1 + 5 delta) backward saving
  is not realised; what is saved is communication and, for CE, data.

Requests: class-wide only (the paper's setting). A client_class request keeps the class in
the other clients' data, which a class-wide channel selection plus random relabelling
would destroy; a client request has no class whose channels could be ranked (the paper
leaves both to future work). Both are refused.
"""

from __future__ import annotations

import functools
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import fl, masking
from fu_jax import tree as tu
from fu_jax.methods import base

EFFECT_METRICS = ("acc", "loss", "both")
LAYER_SETS = ("all", "conv")


def stream_tag(name: str) -> int:
  """A fixed fold_in id per use of the unlearning stream (so uses never share randomness)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------
# Config.


def config_section(fl_cfg):
  """The `channel` section of channel_de, channel_ce and channel_de_random (`fl_cfg`: the
  config's fl section, which the fine-tuning's local_epochs, lr and batch_size follow; its
  momentum is fl.client_momentum)."""
  s = base.new_section()
  s.delta = 0.2  # fraction of output channels selected per layer (ceil)
  s.epochs = 2  # fine-tune epochs: DE FedAvg rounds / CE passes (paper <= 4)
  s.local_epochs = base.linked(fl_cfg, "local_epochs")  # DE local epochs per round
  s.lr = base.linked(fl_cfg, "client_lr")  # fine-tune SGD lr
  s.batch_size = base.linked(fl_cfg, "batch_size")  # fine-tune batch size
  s.effect_samples = 128  # server's batch I of forget samples for channel effects
  s.effect_metric = "both"  # acc (paper) | loss | both (acc, ties broken by loss)
  s.layers = "all"  # all (every conv/dense layer, paper) | conv
  s.perturb = True  # add perturbation data (forget samples, random wrong labels)
  s.server_samples = 1600  # CE: training examples the server holds (capped)
  return s


RULES = {
  "delta": base.in_range(0, 1, low_open=True),
  "epochs": base.at_least(1),
  "local_epochs": base.at_least(1),
  "lr": base.positive(),
  "batch_size": base.at_least(1),
  "effect_samples": base.at_least(1),
  "effect_metric": base.one_of(EFFECT_METRICS),
  "layers": base.one_of(LAYER_SETS),
  "server_samples": base.at_least(1),
}


def validate(config):
  base.check_section(config, "channel", RULES)


# ---------------------------------------------------------------------------------------
# Building blocks (pure, reused by cdp.py and the benchmark).


def apply_fn(task: base.Task):
  """(params, x) -> logits, the signature masking.channel_effects takes."""
  return task.apply_fn


def scored_layers(params, which: str = "all") -> tuple:
  """Layer paths to score: every conv/dense layer ('all') or conv layers only ('conv')."""
  if which not in LAYER_SETS:
    raise ValueError(f"layers={which!r}: allowed {LAYER_SETS}")
  out = []
  for path, _ in masking.channel_layers(params):
    node = params
    for k in path:
      node = node[k]
    if which == "all" or node["kernel"].ndim >= 3:
      out.append(tuple(path))
  return tuple(out)


@functools.partial(jax.jit, static_argnums=(4, 5))
def perturbation_labels(key, y, index, forget, forget_classes: tuple, num_classes: int):
  """Training labels with every forget row relabelled to a random class not forgotten.

    y'[r] = y[r]                      if not forget[r]
          = keep[u(fold_in(key, i_r))] otherwise, keep = classes \\ forget_classes

  where i_r is the row's dataset index, so the draw does not depend on the row's position
  or on padding. Each wrong label is uniform over the kept classes, hence never the true
  class of a forget row (which is a forget class) and never another forgotten class.
  """
  keep = np.setdiff1d(np.arange(num_classes), np.asarray(forget_classes, int))
  if keep.size == 0:
    raise ValueError(
      f"forget classes {tuple(forget_classes)} leave no class for the perturbation labels"
    )
  idx = jnp.maximum(jnp.asarray(index), 0).reshape(-1)
  draws = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, keep.size))(idx)
  wrong = jnp.asarray(keep, jnp.int32)[draws].reshape(jnp.shape(index))
  return jnp.where(forget, wrong, jnp.asarray(y, jnp.int32))


def forget_batch(task: base.Task, n: int):
  """The server's batch I (Alg. 1 line 3): up to n training samples to forget, true labels.

  Drawn uniformly without replacement from the pooled forget rows with a key from the
  unlearning stream. Returns (x [m, ...], y [m]) as numpy arrays.
  """
  forget = np.asarray(task.forget)
  rows = np.argwhere(forget)
  if rows.shape[0] == 0:
    raise ValueError("the request selects no training sample to forget")
  key = fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, stream_tag("channel/effect_batch"))
  pick = np.asarray(jax.random.permutation(key, rows.shape[0]))[:n]
  r = rows[np.sort(pick)]
  x = np.asarray(task.clients.x[r[:, 0], r[:, 1]])  # only these rows' images
  y = np.asarray(task.y_true)[r[:, 0], r[:, 1]]
  return x, y


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("metric", "layers"))
def _effects(apply, params, x, y, *, metric, layers):
  return masking.channel_effects(apply, params, x, y, metric=metric, layers=layers)


def effects_and_selection(task: base.Task, params, s):
  """Alg. 1: channel effects on the server's forget batch and the top-delta selection
  (s: the channel section).

  Returns (channel_masks dict path -> bool [C] (numpy), effects, |I|, seconds), seconds being
  the compiled run time of the effects (compilation excluded).
  """
  x, y = forget_batch(task, s.effect_samples)
  layers = scored_layers(params, s.layers)
  x, y = jnp.asarray(x), jnp.asarray(y)
  compiled = _effects.lower(
    apply_fn(task), params, x, y, metric=s.effect_metric, layers=layers
  ).compile()
  t0 = time.perf_counter()
  eff = jax.block_until_ready(compiled(params, x, y))
  seconds = time.perf_counter() - t0
  sel = masking.top_delta_channels(eff, s.delta)
  return {p: np.asarray(m) for p, m in sel.items()}, eff, int(x.shape[0]), seconds


def random_selection(task: base.Task, params, s):
  """DE-random: the same number of channels per layer, uniformly at random (s: the channel
  section)."""
  layers = scored_layers(params, s.layers)
  by_path = dict(masking.channel_layers(params))
  key = fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, stream_tag("channel/random"))
  sel = masking.random_channels([(p, by_path[p]) for p in layers], s.delta, key)
  return {p: np.asarray(m) for p, m in sel.items()}


def masked_program(task: base.Task, lr: float, momentum: float) -> fl.LocalProgram:
  """Local SGD that moves only the entries where the client's `extra` mask is True.

  optax.chain(sgd, masking.masked_update()); the mask is placed in the transform state
  from the client's extra at init (so it can differ per client and never recompiles).
  """
  opt = optax.chain(optax.sgd(lr, momentum=momentum or None), masking.masked_update())

  def opt_init(params, extra):
    return masking.set_mask(opt.init(params), extra)

  return fl.sgd_program(task.apply_fn, opt, opt_init=opt_init)


@functools.partial(jax.jit, static_argnums=(1,))
def per_client(tree, num_clients: int):
  """Broadcasts a pytree to a leading client axis (the `extra` of every client)."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + jnp.shape(a)), tree)


# One compiled call instead of many eager per-leaf ops (each compiles separately on CPU).
param_mask = jax.jit(masking.channel_mask_to_param_mask)


def selection_summary(channel_masks, params) -> dict:
  """JSON-able description of a selection: counts, fractions, indices per layer."""
  total_ch = sum(int(np.size(m)) for m in channel_masks.values())
  sel_ch = sum(int(np.sum(m)) for m in channel_masks.values())
  pmask = param_mask(channel_masks, params)
  sel_p = int(sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(pmask)))
  all_ch = sum(c for _, c in masking.channel_layers(params))
  return {
    "selected_channels": sel_ch,
    "scored_channels": total_ch,
    "model_channels": all_ch,
    "selected_channel_fraction": sel_ch / max(all_ch, 1),
    "selected_params": sel_p,
    "selected_param_fraction": sel_p / max(optax.tree.size(params), 1),
    "selected": {
      "/".join(map(str, p)): np.flatnonzero(np.asarray(m)).tolist()
      for p, m in channel_masks.items()
    },
  }


# ---------------------------------------------------------------------------------------
# Decentralized fine-tuning with packed (selected-channel) communication.


def packed_exchange(channel_masks, params, server_opt: optax.GradientTransformation):
  """The two halves of a round's communication when only selected channels travel.

  upload(client_params [k, ...], server_params) -> packed: each client's delta, packed with
    masking.pack_channels (selected kernel slices, bias entries, int32 indices), leading
    client axis;
  aggregate(server: fl.ServerState, packed, weights [k]) -> fl.ServerState: the weighted
    FedAvg mean of the packed values, scattered back (masking.unpack_channels), applied
    through server_opt, and written to the selected entries only;
  bytes: what one client sends (or receives) per round, masking.packed_num_bytes.
  With deltas that are zero outside the selection this equals fl.aggregate + server_apply.
  """
  pmask = param_mask(channel_masks, params)
  cmasks = {p: jnp.asarray(m) for p, m in channel_masks.items()}
  counts = masking.channel_counts(channel_masks)

  def pack(delta):
    return masking.pack_channels(delta, cmasks, counts)

  @jax.jit
  def upload(client_params, server_params):
    deltas = jax.tree.map(lambda cp, sp: cp - sp[None], client_params, server_params)
    return jax.vmap(pack)(deltas)

  @jax.jit
  def aggregate(server, packed, w):
    values = {p: (pl.kernel, pl.bias) for p, pl in packed.items()}
    mean = tu.tree_weighted_mean(values, w)
    mean = {p: masking.PackedLayer(packed[p].index[0], *mean[p]) for p in packed}
    delta = masking.unpack_channels(mean, cmasks, server.params)
    new = fl.server_apply(server, delta, server_opt)
    kept = jax.tree.map(lambda m, a, b: jnp.where(m, a, b), pmask, new.params, server.params)
    return fl.ServerState(kept, new.opt_state)

  return upload, aggregate, masking.packed_num_bytes(jax.eval_shape(pack, params))


def packed_fedavg_phase(
  task: base.Task,
  env: base.Env,
  phase: str,
  params,
  channel_masks,
  num_rounds: int,
  *,
  valid,
  y,
  local_epochs: int,
  batch_size: int,
  lr: float,
  momentum: float,
  round_offset: int,
):
  """FedAvg rounds in which clients train and exchange ONLY the selected channels (Alg. 2).

  Each round: sample clients (as fedavg_phase), each trains with the parameter mask of
  `channel_masks` in its optimizer state, packs its delta with masking.pack_channels
  (selected kernel slices, bias entries and int32 indices) and uploads that; the server
  takes the example-weighted mean of the packed values, scatters it back
  (unpack_channels), applies the server optimizer and writes only the selected entries.
  Cost per round: every active sampled client downloads and uploads one packed selection.

  Returns (params, bytes per packed selection).
  """
  cfg = task.config
  c = task.clients
  pmask = param_mask(channel_masks, params)
  runner = env.runner(masked_program(task, lr, momentum), local_epochs, batch_size)
  server_opt = fl.server_optimizer(float(cfg.fl.server_lr))
  upload, aggregate, sel_bytes = packed_exchange(channel_masks, params, server_opt)
  play = fl.fedavg_play(
    runner,
    (c.x, y),
    valid,
    per_client(pmask, c.count.shape[0]),
    seed=cfg.seed,
    client_weights=task.client_weights,
    num_sampled=base.num_sampled(cfg),
    server_opt=server_opt,
    # Clients upload their packed deltas; the server unpacks their mean.
    server_update=lambda server, client_params, w: aggregate(
      server, upload(client_params, server.params), w
    ),
  )
  server = fl.fedavg_rounds(
    play,
    fl.server_init(params, server_opt),
    num_rounds,
    rounds=env.rounds,
    phase=phase,
    round_offset=round_offset,
    model_bytes=sel_bytes,
    epochs=local_epochs,
  )
  return server.params, sel_bytes


# ---------------------------------------------------------------------------------------
# The methods.


def _check_request(task: base.Task):
  if task.request.kind != "class":
    raise ValueError(f"channel unlearning serves class requests only, got {task.request.kind!r}")


def _decentralized(task: base.Task, env: base.Env, trained: base.Trained, *, random: bool):
  _check_request(task)
  cfg = task.config
  s = cfg.channel
  params = trained.params
  if random:
    cmasks = random_selection(task, params, s)
    n_effect, sel_seconds = 0, 0.0
  else:
    cmasks, _, n_effect, sel_seconds = effects_and_selection(task, params, s)
    env.add_cost(examples=n_effect)
  c = task.clients
  if s.perturb:
    key = fl.stream_key(cfg.seed, fl.STREAM_UNLEARN, stream_tag("channel/perturb"))
    y = perturbation_labels(
      key, c.y, c.index, task.forget, tuple(task.request.classes), task.num_classes
    )
    valid = c.valid
  else:
    y, valid = c.y, task.retain_valid
  phase = "channel_de_random" if random else "channel_de"
  out, sel_bytes = packed_fedavg_phase(
    task,
    env,
    phase,
    params,
    cmasks,
    s.epochs,
    valid=valid,
    y=y,
    local_epochs=s.local_epochs,
    batch_size=s.batch_size,
    lr=s.lr,
    momentum=cfg.fl.client_momentum,
    round_offset=cfg.fl.rounds,
  )
  model_bytes = tu.tree_num_bytes(params)
  results = {
    "finetune_epochs": s.epochs,
    "local_epochs": s.local_epochs,
    "delta": s.delta,
    "effect_samples": n_effect,
    "selection_seconds": sel_seconds,
    "perturbation_examples": int(np.sum(np.asarray(task.forget))) if s.perturb else 0,
    "upload_bytes_per_client_round": sel_bytes,
    "model_bytes": model_bytes,
    "upload_fraction_of_model": sel_bytes / model_bytes,
    **selection_summary(cmasks, params),
  }
  return base.Outcome(out, results)


def server_sample(task: base.Task, n: int):
  """CE: the server's sample of n training examples (uniform over the pooled clients).

  Returns (x, y, index, forget) numpy arrays (training labels, dataset indices, forget
  flags) with min(n, total) rows.
  """
  c = task.clients
  rows = np.argwhere(np.asarray(c.valid))
  key = fl.stream_key(task.config.seed, fl.STREAM_UNLEARN, stream_tag("channel/server_sample"))
  pick = np.sort(np.asarray(jax.random.permutation(key, rows.shape[0]))[:n])
  r = rows[pick]
  get = lambda a: np.asarray(a)[r[:, 0], r[:, 1]]
  return np.asarray(c.x[r[:, 0], r[:, 1]]), get(c.y), get(c.index), get(task.forget)


def _centralized(task: base.Task, env: base.Env, trained: base.Trained):
  _check_request(task)
  cfg = task.config
  s = cfg.channel
  params = trained.params
  cmasks, _, n_effect, sel_seconds = effects_and_selection(task, params, s)
  x, y, index, forget = server_sample(task, s.server_samples)
  if s.perturb:
    key = fl.stream_key(cfg.seed, fl.STREAM_UNLEARN, stream_tag("channel/perturb"))
    y = perturbation_labels(key, y, index, forget, tuple(task.request.classes), task.num_classes)
    valid = np.ones(y.shape, bool)
  else:
    valid = ~forget
  m = int(valid.sum())
  pmask = param_mask(cmasks, params)
  program = masked_program(task, s.lr, cfg.fl.client_momentum)
  runner = env.runner(program, 1, s.batch_size)
  data = (jnp.asarray(x)[None], jnp.asarray(y)[None])
  valid_b = jnp.asarray(valid)[None]
  extra = per_client(pmask, 1)

  def round_fn(p, r):
    key = fl.stream_key(cfg.seed, fl.STREAM_UNLEARN, stream_tag("channel/ce_epoch"), r)[None]
    res = runner.run(p, data, valid_b, extra, key)
    return (
      jax.tree.map(lambda a: a[0], res.params),
      {"loss": float(np.asarray(res.metrics["loss"])[0]), "examples": m},
    )

  env.add_cost(examples=n_effect)
  out = env.rounds("channel_ce", params, s.epochs, round_fn, lambda p: p)
  results = {
    "finetune_epochs": s.epochs,
    "delta": s.delta,
    "effect_samples": n_effect,
    "selection_seconds": sel_seconds,
    "server_samples": int(x.shape[0]),
    "server_retain_examples": int(np.sum(~forget)),
    "perturbation_examples": int(np.sum(forget)) if s.perturb else 0,
    "model_bytes": tu.tree_num_bytes(params),
    **selection_summary(cmasks, params),
  }
  return base.Outcome(out, results)


CLASS_ONLY = (
  "channel selection scores each channel by its effect on a forgotten class's "
  "accuracy: it addresses classes, not individual samples or clients"
)

SECTION = base.Section("channel", config_section, validate)  # channel_de, channel_ce, ..._random
# Its fold_in ids under fl.STREAM_UNLEARN, one per use (stream_tag).
STREAMS = tuple(
  stream_tag(f"channel/{use}")
  for use in ("effect_batch", "random", "perturb", "server_sample", "ce_epoch")
)

METHODS = {
  "channel_de": base.Method(
    "channel_de",
    ("class",),
    base.FEDAVG,
    functools.partial(_decentralized, random=False),
    CLASS_ONLY,
    section=SECTION,
    streams=STREAMS,
  ),
  "channel_ce": base.Method(
    "channel_ce",
    ("class",),
    base.FEDAVG,
    _centralized,
    CLASS_ONLY,
    section=SECTION,
    streams=STREAMS,
  ),
  "channel_de_random": base.Method(
    "channel_de_random",
    ("class",),
    base.FEDAVG,
    functools.partial(_decentralized, random=True),
    CLASS_ONLY,
    section=SECTION,
    streams=STREAMS,
  ),
}
