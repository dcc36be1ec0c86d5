"""QuickDrop: federated unlearning with dataset distillation integrated into training.

Dhasade, Ding, Guo, Kermarrec, de Vos and Wu, "QuickDrop: Efficient Federated Unlearning by
Integrated Dataset Distillation", arXiv:2311.15603 (2023); published as "QuickDrop: Efficient
Federated Unlearning via Synthetic Data Generation", Middleware 2024. The distillation is
Zhao, Mopuri & Bilen's gradient matching ("Dataset Condensation with Gradient Matching",
ICLR 2021), see `fu_jax.distill`.

Training (trainer `quickdrop`). Client k keeps for each class c it holds a synthetic set
S_kc of m_kc = ceil(scale * n_kc) images (or images_per_class), initialised with distinct
real images of the class. A local step on a real mini-batch B (B_c its examples of class c)
at parameters theta computes the per-class gradients once and uses them twice:

    g_c   = grad_theta (1 / |B_c|) sum_{(x, y) in B_c} CE(f(x; theta), y)
    S_k   <- S_k - SGD_momentum(grad_S sum_{c in B} D(g_c, grad_theta CE(S_kc; theta)))
    theta <- opt(theta, sum_c |B_c| g_c / |B|)          model_update='real' (the FedAvg step)
          or opt(theta, grad_theta CE(S_k; theta))      model_update='synthetic'

D is the layer-wise, output-channel-wise cosine distance sum_layers sum_o (1 - cos(r_o, s_o))
(`distill.match_loss`). The server averages the client models as in FedAvg; the sets stay
on the clients.

Unlearning the classes F (method `quickdrop`; class and client_class requests):

  1. SGA: one round in which every client holding synthetic images of F ascends
         theta_k <- theta + eta_u g / ||g||,   g = grad_theta CE(S_kF; theta)
     over S_kF for unlearn_epochs; the server takes sum_k |S_kF| theta_k / sum_k |S_kF|.
  2. Recovery: recovery_rounds FedAvg rounds on the synthetic images of the kept classes,
     each client gradient clipped to clip_norm.
  3. Optionally finetune_rounds FedAvg rounds on the real retained data.

`quickdrop.sequence = (c1, c2, ...)` forgets classes one after another (steps 1-2 per class)
and records retain / forget accuracy after each. Method `quickdrop_nodistill` is the
ablation: steps 1-3 from the same trained model on the sets as initialised (a random real
subset of the same size), so the distillation's contribution is the difference.

Choices the paper and its official code leave open, and ours:
- Persistence: the official client re-initialises its set from real images every round; the
  paper describes sets refined over the whole training. We keep the sets and their momentum
  on each client across rounds (checkpointed with the model).
- Matching target: the official code draws a separate real batch per class (up to 256
  images) for g_c; we reuse the per-class gradients of the FL mini-batch (the paper's point:
  no extra real-data gradient). Classes absent from a batch are frozen.
- Step granularity: an image step on local steps 0, k, 2k, ... (k = distill_every; 1 = every
  step, the paper's "each local step"), or with k = 0 on each client's first local step of a
  round (once per local epoch at local_epochs 1, the official schedule). An image step is a
  second-order gradient over every class's images, several plain steps' worth of compute, so
  k trades distillation against training time (BUILD.md has the costs).
- 'synthetic' mode: one model step on the masked-mean CE of the client's whole updated set per
  local step (the official code runs epochs of batch 256 on it); it needs a small lr and no
  momentum.
- SGA step: along g / ||g|| (unlearn_normalize, default), so unlearn_lr is the length of each
  ascent step whatever the gradient norm of the distilled images (cosine matching lets that
  norm grow far beyond a real batch's); unlearn_normalize=False is the paper's fixed-lr ascent.
- Recovery clips each client gradient to clip_norm for the same reason; clip_images (off by
  default) keeps the synthetic pixels within the real data's [min, max].
- SGA in FL: the official reproduction lets one client ascend and takes its model; with
  several holders of F we average their ascended models weighted by their |S_kF| (the same
  rule when one client holds the data). A parallel request (several classes) shares one
  normalised step between them.
- Recovery samples clients as training does (fl.clients_per_round) with fl.batch_size,
  recovery_lr (default fl.client_lr) and fl.client_momentum.
- Randomness: the sets' init keys are fl.stream_key(seed, STREAM_INIT, 1, client); the
  unlearning rounds use STREAM_UNLEARN and round indices after fl.rounds. The official code
  reseeds from the wall clock.
- Cost: bytes = the model down and up per participating client and round (sets never leave
  the clients); examples = synthetic (or real, when fine-tuning) images touched.
- Backdoor requests: the planted samples carry flipped labels, so they are distilled into the
  flipped class's set; SGA on class c cannot target them.

Layout and runner plumbing (chunked sets, the loop runner cut to the chunks in use, set write-
back, the SGA / recovery phase runners, artifacts) live in `quickdrop_sets`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import ascent, distill, fl, images, losses, models
from fu_jax import tree as tu
from fu_jax.methods import base
from fu_jax.methods import quickdrop_sets as qsets

MODEL_UPDATES = ("real", "synthetic")
GRAD_METHODS = ("per_example", "vmap", "unroll")
# Keys of config.quickdrop that do not change the trained model; every other key of the
# section is in its cache key (base.Trainer), so a new key retrains until listed here.
UNLEARN_ONLY_KEYS = (
  "unlearn_epochs",
  "unlearn_lr",
  "unlearn_batch_size",
  "unlearn_normalize",
  "recovery_rounds",
  "recovery_epochs",
  "recovery_lr",
  "clip_norm",
  "finetune_rounds",
  "sequence",
)
SYNTH_INIT_ID = 1  # fl.stream_key(seed, STREAM_INIT, SYNTH_INIT_ID, client): the sets' init


# ---------------------------------------------------------------------------------------
# Config.


RULES = {
  "images_per_class": base.at_least(0, "0 = use quickdrop.scale"),
  "image_lr": base.positive(),
  "image_momentum": base.in_range(0, 1, high_open=True),
  "metric": base.one_of(distill.METRICS),
  "model_update": base.one_of(MODEL_UPDATES),
  "grads": base.one_of(GRAD_METHODS),
  "distill_every": base.at_least(0, "0 = once per round, at the first local step"),
  "chunk_size": base.at_least(0, "0 = automatic"),
  "unlearn_epochs": base.at_least(1),
  "unlearn_lr": base.positive(),
  "unlearn_batch_size": base.at_least(1),
  "recovery_rounds": base.at_least(0),
  "recovery_epochs": base.at_least(1),
  "recovery_lr": base.positive(),
  "clip_norm": base.at_least(0, "0 = off"),
  "finetune_rounds": base.at_least(0),
}


def validate(config):
  """Checks config.quickdrop; raises ConfigError naming the first bad value."""
  base.check_section(config, "quickdrop", RULES)
  q = config.quickdrop
  base.require(
    bool(q.images_per_class) or 0.0 < q.scale <= 1.0,
    f"quickdrop.scale={q.scale!r}: must be in (0, 1]",
  )
  sequence = tuple(q.sequence or ())
  base.require(
    len(set(sequence)) == len(sequence),
    f"quickdrop.sequence={q.sequence!r}: classes must be distinct",
  )


def settings(config) -> dict:
  """config.quickdrop, checked, as a plain dict (linked defaults resolved, the sequence a
  tuple of ints)."""
  validate(config)
  s = config.quickdrop.to_dict()
  s["sequence"] = tuple(int(c) for c in (s["sequence"] or ()))
  return s


# ---------------------------------------------------------------------------------------
# 1. The distilling local step.


class DistillState(NamedTuple):
  """A client's local state: model, its optimizer, synthetic set, image optimizer."""

  params: Any
  opt_state: Any
  syn: distill.SyntheticSet
  syn_opt: Any


class ServerWithSets(NamedTuple):
  """The trainer's round state: the server plus every client's set, leading axis N."""

  server: fl.ServerState
  syn: distill.SyntheticSet
  syn_opt: Any


def _distill_apply(model):
  """(params, x) -> logits, the signature fu_jax.distill takes."""
  return models.logits_fn(model)


def image_optimizer(s: dict) -> optax.GradientTransformation:
  return distill.default_image_optimizer(s["image_lr"], s["image_momentum"])


def distill_program(
  model,
  num_classes: int,
  optimizer: optax.GradientTransformation,
  image_opt: optax.GradientTransformation,
  *,
  model_update: str = "real",
  metric: str = "ours",
  grads: str = "per_example",
  distill_every: int = 0,
  image_range=None,
) -> fl.LocalProgram:
  """QuickDrop's local program: a model step per batch, with a synthetic-image step on it.

  extra (per client) = (SyntheticSet, image optimizer state). On a distilling mini-batch B
  (local steps 0, k, 2k, ... of the round, k = distill_every; k = 0: step 0 only):
    g_c   = per-class mean CE gradients of B at theta (computed once, distill.per_class_grads);
    S     <- image step on sum_{c in B} D(g_c, grad CE(S_c; theta))   (theta fixed),
             then clipped to image_range = (lo, hi) when given;
    theta <- optimizer step with sum_c n_c g_c / |B|  ('real': exactly the FedAvg gradient)
             or with grad CE(S; theta) of the updated set ('synthetic').
  Other batches take the same model step without the image step (plain batch gradient for
  'real'). The distilling step is the program's `scheduled_step`, chosen by the runner on
  the host (fl.LocalProgram): inside lax.cond, XLA:CPU runs the CNN's gradient many times
  slower.
  Metrics: loss (real batch CE before the step), match_loss (sum over B's classes; 0 on
  steps that do not distill).
  """
  if model_update not in MODEL_UPDATES:
    raise ValueError(f"model_update={model_update!r}: allowed {MODEL_UPDATES}")
  if int(distill_every) < 0:
    raise ValueError(f"distill_every={distill_every!r}: must be >= 0 (0 = first step only)")
  fn = _distill_apply(model)

  def ce(p, x, y, mask):
    return losses.masked_ce(fn(p, x), y, mask)

  def syn_grad(p, syn):
    sx, sy, sv = distill.flatten(syn)
    return jax.grad(ce)(p, sx, sy, sv)

  def distilling(state, batch):
    p = state.params
    loss = ce(p, batch.x, batch.y, batch.mask)
    g_class = distill.per_class_grads(
      fn, p, batch.x, batch.y, batch.mask, num_classes, method=grads
    )
    counts = distill.class_counts(batch.y, batch.mask, num_classes)
    syn, syn_opt, match = distill.synthetic_update(
      fn,
      p,
      state.syn,
      g_class,
      state.syn_opt,
      optimizer=image_opt,
      metric=metric,
      real_counts=counts,
    )
    if image_range is not None:
      syn = syn._replace(x=jnp.clip(syn.x, image_range[0], image_range[1]))
    if model_update == "real":
      g = distill.combine_class_grads(g_class, counts)
    else:
      g = syn_grad(p, syn)
    return loss, g, syn, syn_opt, match

  def plain(state, batch):
    if model_update == "real":
      loss, g = jax.value_and_grad(ce)(state.params, batch.x, batch.y, batch.mask)
    else:
      loss = ce(state.params, batch.x, batch.y, batch.mask)
      g = syn_grad(state.params, state.syn)
    return loss, g, state.syn, state.syn_opt, jnp.zeros((), jnp.float32)

  def init(server_params, extra, key):
    del key
    syn, syn_opt = extra
    return DistillState(server_params, optimizer.init(server_params), syn, syn_opt)

  def model_step(gradients):
    def step(state, batch, key):
      del key
      loss, g, syn, syn_opt, match = gradients(state, batch)
      updates, opt_state = optimizer.update(g, state.opt_state, state.params)
      new = DistillState(optax.apply_updates(state.params, updates), opt_state, syn, syn_opt)
      return new, {"loss": loss, "match_loss": match}

    return step

  finish = lambda state: state.params
  if distill_every == 1:
    return fl.LocalProgram(init, model_step(distilling), finish)
  due = (lambda i: i == 0) if distill_every == 0 else (lambda i: i % distill_every == 0)
  return fl.LocalProgram(
    init, model_step(plain), finish, scheduled_step=model_step(distilling), schedule=due
  )


# ---------------------------------------------------------------------------------------
# 2. Training: FedAvg whose clients distil.


def class_counts_per_client(task: base.Task) -> np.ndarray:
  """int [N, K]: real training examples of each class held by each client."""
  y = np.asarray(task.clients.y)
  v = np.asarray(task.clients.valid)
  return np.stack(
    [np.bincount(y[k][v[k]], minlength=task.num_classes) for k in range(y.shape[0])]
  ).astype(np.int64)


def init_sets(task: base.Task, s: dict) -> distill.SyntheticSet:
  """Every client's synthetic set [N, C, b, ...], initialised from its own real images."""
  counts = class_counts_per_client(task)
  sizes = distill.synthetic_sizes(counts, s["scale"], s["images_per_class"] or None)
  chunk_size, num_chunks = distill.synthetic_layout(sizes, s["chunk_size"] or None)
  n = counts.shape[0]
  keys = jax.vmap(lambda k: fl.stream_key(task.config.seed, fl.STREAM_INIT, SYNTH_INIT_ID, k))(
    jnp.arange(n)
  )
  c = task.clients

  @jax.jit
  def build(x, y, valid, keys, sizes):
    one = lambda x, y, v, k, sz: distill.init_synthetic(
      x, y, v, task.num_classes, key=k, chunk_size=chunk_size, num_chunks=num_chunks, sizes=sz
    )
    return jax.vmap(one)(x, y, valid, keys, sizes)

  # The real images are materialised outside the jitted build, a block of clients at a time.
  return images.map_client_blocks(build, c.x, c.y, c.valid, keys, jnp.asarray(sizes))


def pixel_range(task: base.Task):
  """(min, max) of the real training inputs: the box synthetic images are kept in."""
  x = np.asarray(task.dataset.x_train)
  return float(x.min()), float(x.max())


def training_rounds(task: base.Task, env: base.Env, s: dict):
  """(init_state, round_fn) of the distilling FedAvg: round_fn(ServerWithSets, r) -> (state,
  metrics) samples clients, runs distill_program with their sets as `extra`, writes the
  updated sets back and aggregates (fl.fedavg_round). Also used by the benchmark."""
  cfg = task.config
  c = task.clients
  image_opt = image_optimizer(s)
  program = distill_program(
    task.model,
    task.num_classes,
    base.client_optimizer(cfg),
    image_opt,
    model_update=s["model_update"],
    metric=s["metric"],
    grads=s["grads"],
    distill_every=s["distill_every"],
    image_range=pixel_range(task) if s["clip_images"] else None,
  )
  runner = env.runner(program, cfg.fl.local_epochs, cfg.fl.batch_size)
  if getattr(runner, "kind", None) == "loop":
    runner = qsets.UsedChunksRunner(runner)
  server_opt = fl.server_optimizer(float(cfg.fl.server_lr))
  weights = np.ones(c.count.shape[0], np.float32)
  params = base.init_params(task)
  play = fl.fedavg_play(
    runner,
    (c.x, c.y),
    c.valid,
    seed=cfg.seed,
    client_weights=weights,
    num_sampled=base.num_sampled(cfg),
    server_opt=server_opt,
    server_of=lambda st: st.server,
    extra_of=lambda st: (st.syn, st.syn_opt),
  )

  def keep_sets(state: ServerWithSets, r, res: fl.RoundResult) -> ServerWithSets:
    """Writes the sampled clients' updated sets (and image optimizer states) back."""
    del r
    syn, syn_opt = qsets.scatter_sets(
      (state.syn, state.syn_opt),
      jnp.asarray(res.sampled),
      jnp.asarray(weights[res.sampled] > 0),
      (res.client.state.syn, res.client.state.syn_opt),
    )
    return ServerWithSets(res.server, syn, syn_opt)

  round_fn = fl.fedavg_round_fn(
    play,
    on_round=keep_sets,
    model_bytes=tu.tree_num_bytes(params),
    epochs=cfg.fl.local_epochs,
  )
  syn = init_sets(task, s)
  init = ServerWithSets(fl.server_init(params, server_opt), syn, jax.vmap(image_opt.init)(syn.x))
  return init, round_fn


def train_quickdrop(task: base.Task, env: base.Env) -> base.Trained:
  """FedAvg with integrated distillation; Trained.kept = the clients' SyntheticSet [N, ...].

  The round state (server, sets, image optimizer states) is checkpointed by env.rounds, so
  a resumed run continues with the sets as they were. With quickdrop.artifacts the final
  sets are written to <pretrain dir>/synthetic/.
  """
  s = settings(task.config)
  init, round_fn = training_rounds(task, env, s)
  state = env.rounds("train", init, task.config.fl.rounds, round_fn, lambda st: st.server.params)
  if s["artifacts"]:
    directory = env.artifact_dir("synthetic")
    if directory is not None:
      qsets.write_synthetic(directory, state.syn, task.num_classes)
  return base.Trained(state.server.params, kept=state.syn)


# ---------------------------------------------------------------------------------------
# 3. Unlearning: SGA on the forgotten classes' sets, recovery on the others'.


def normalized_updates(eps: float = 1e-12) -> optax.GradientTransformation:
  """g -> g / ||g|| (global L2 norm over the pytree; 0 stays 0): a following sgd(lr) then
  moves the parameters by exactly lr."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    norm = jnp.sqrt(optax.tree.vdot(updates, updates))
    scale = jnp.where(norm > eps, 1.0 / jnp.maximum(norm, eps), 0.0)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def sga_optimizer(s: dict) -> optax.GradientTransformation:
  """Ascent on the forget loss: theta + lr * g, or theta + lr * g / ||g|| (unlearn_normalize)."""
  norm = [normalized_updates()] if s["unlearn_normalize"] else []
  return optax.chain(*norm, ascent.gradient_ascent(), optax.sgd(s["unlearn_lr"]))


def recovery_optimizer(s: dict, momentum: float) -> optax.GradientTransformation:
  """Descent on the kept classes' sets: client gradient clipped to clip_norm, then SGD."""
  clip = [optax.clip_by_global_norm(s["clip_norm"])] if s["clip_norm"] > 0 else []
  return optax.chain(*clip, optax.sgd(s["recovery_lr"], momentum=momentum or None))


def unlearning_phases(task: base.Task, env: base.Env, s: dict) -> qsets.SetPhases:
  """The two local programs of unlearning, 'sga' and 'recovery', ready to run in rounds."""
  cfg = task.config
  return qsets.SetPhases(
    task,
    env,
    {
      "sga": (
        fl.sgd_program(task.apply_fn, sga_optimizer(s)),
        s["unlearn_epochs"],
        s["unlearn_batch_size"],
      ),
      "recovery": (
        fl.sgd_program(task.apply_fn, recovery_optimizer(s, cfg.fl.client_momentum)),
        s["recovery_epochs"],
        cfg.fl.batch_size,
      ),
    },
  )


def synthetic_masks(syn: distill.SyntheticSet, classes, client: int = -1):
  """bool [N, C, b]: the synthetic images of `classes` (on `client` only if >= 0)."""
  sel = distill.class_masks(syn, classes)
  if client >= 0:
    sel = sel & (jnp.arange(sel.shape[0]) == client)[:, None, None]
  return sel


def _flat_data(syn: distill.SyntheticSet, mask):
  x, y, _ = distill.flatten(syn)
  return (x, y), mask.reshape(y.shape)


def _steps(task: base.Task, s: dict) -> list:
  """The unlearning steps: [request classes] (parallel), or one class per sequence entry."""
  if not s["sequence"]:
    return [tuple(task.request.classes)]
  if task.request.kind != "class":
    raise ValueError(
      f"quickdrop.sequence={s['sequence']} needs unlearn.kind='class', got {task.request.kind!r}"
    )
  bad = [c for c in s["sequence"] if not 0 <= c < task.num_classes]
  if bad:
    raise ValueError(f"quickdrop.sequence has classes {bad} outside 0..{task.num_classes - 1}")
  missing = [c for c in task.request.classes if c not in s["sequence"]]
  if missing:
    raise ValueError(
      f"quickdrop.sequence={s['sequence']} must contain the requested classes "
      f"{tuple(task.request.classes)} (missing {missing}): the run evaluates "
      "the final model against the request"
    )
  return [(c,) for c in s["sequence"]]


def _unlearn(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  cfg = task.config
  s = settings(cfg)
  syn = trained.kept
  if not isinstance(syn, distill.SyntheticSet):
    raise ValueError(
      "quickdrop needs the synthetic sets of its own trainer "
      f"(Trained.kept), got {type(syn).__name__}; use pretrain='quickdrop'"
    )
  req = task.request
  if req.kind not in ("class", "client_class"):
    raise ValueError(f"quickdrop serves class and client_class requests, got {req.kind!r}")
  client = req.client if req.kind == "client_class" else -1
  steps = _steps(task, s)
  phases = unlearning_phases(task, env, s)
  n = syn.valid.shape[0]
  weights = np.asarray(task.client_weights, np.float32)
  k = base.num_sampled(cfg)
  params = trained.params
  offset = cfg.fl.rounds
  forgotten = ()
  records = [qsets.record(task, params, 0, (), ())] if s["sequence"] else []
  totals = {"forget_synthetic": 0, "retain_synthetic": 0}
  for i, classes in enumerate(steps):
    tag = f"_{i + 1}" if s["sequence"] else ""
    forgotten = forgotten + tuple(classes)
    forget_mask = synthetic_masks(syn, classes, client)
    data, fvalid = _flat_data(syn, forget_mask)
    holders = (np.asarray(jnp.sum(fvalid, axis=1)) > 0).astype(np.float32) * weights
    params = phases.run(
      "sga" + tag,
      params,
      1,
      data,
      fvalid,
      program="sga",
      weights=holders,
      num_sampled=n,
      round_offset=offset,
    )
    offset += 1
    keep = syn.valid & ~synthetic_masks(syn, forgotten, client)
    _, rvalid = _flat_data(syn, keep)
    if s["recovery_rounds"]:
      params = phases.run(
        "recovery" + tag,
        params,
        s["recovery_rounds"],
        data,
        rvalid,
        program="recovery",
        weights=weights,
        num_sampled=k,
        round_offset=offset,
      )
      offset += s["recovery_rounds"]
    if s["finetune_rounds"]:
      real_keep = (
        task.retain_valid
        if client >= 0
        else (task.clients.valid & ~jnp.isin(task.y_true, jnp.asarray(forgotten)))
      )
      params = base.fedavg_phase(
        task,
        env,
        "finetune" + tag,
        params,
        s["finetune_rounds"],
        valid=real_keep,
        client_weights=task.client_weights,
        round_offset=offset,
      )
      offset += s["finetune_rounds"]
    totals["forget_synthetic"] += int(jnp.sum(forget_mask))
    totals["retain_synthetic"] = int(jnp.sum(keep))
    if s["sequence"]:
      records.append(qsets.record(task, params, i + 1, classes, forgotten))
  results = {
    "synthetic_images": int(jnp.sum(syn.valid)),
    "synthetic_bytes": int(np.asarray(syn.valid).sum() * np.prod(syn.x.shape[3:]) * 4),
    "forget_synthetic_images": totals["forget_synthetic"],
    "retain_synthetic_images": totals["retain_synthetic"],
    "model_update": s["model_update"],
    "synthetic": "distilled",
  }
  if s["sequence"]:
    results["sequence"] = records
    # Every class of the sequence is forgotten by now: the run evaluates against all of them.
    results["forgotten_classes"] = [int(c) for c in forgotten]
  return base.Outcome(params, results)


def _unlearn_nodistill(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  """The ablation: QuickDrop's SGA + recovery on the sets as initialised, not distilled.

  The sets are rebuilt by `init_sets` from the seed: the random real subset of the same
  size (ceil(n_c * scale) per class and client) the trainer started from, in the same
  layout. The model is the quickdrop trainer's own: with model_update='real' its steps use
  only the real batches' gradients, so it is the model a trainer without image steps would
  produce (up to float rounding; tests/test_quickdrop_nodistill.py). With 'synthetic' the
  model trained on the distilled sets, and a real-subset model would need its own training.
  """
  s = settings(task.config)
  if s["model_update"] != "real":
    raise ValueError(
      f"quickdrop_nodistill needs quickdrop.model_update='real' (got "
      f"{s['model_update']!r}): only then is the trained model independent "
      "of the image steps"
    )
  syn = trained.kept
  if not isinstance(syn, distill.SyntheticSet):
    raise ValueError(
      "quickdrop_nodistill needs the synthetic sets of the quickdrop trainer "
      f"(Trained.kept), got {type(syn).__name__}"
    )
  init = init_sets(task, s)
  if (
    init.x.shape != syn.x.shape
    or not np.array_equal(np.asarray(init.valid), np.asarray(syn.valid))
    or not np.array_equal(np.asarray(init.y), np.asarray(syn.y))
  ):
    raise ValueError(
      "quickdrop_nodistill: the trainer's sets do not have the layout "
      "init_sets rebuilds from this config"
    )
  out = _unlearn(task, env, trained._replace(kept=init))
  return out._replace(results=dict(out.results, synthetic="real_init"))


# ---------------------------------------------------------------------------------------
# Config section and registration.


def config_section(fl_cfg):
  """The `quickdrop` section (`fl_cfg`: the config's fl section, which unlearn_batch_size,
  recovery_epochs and recovery_lr follow). Training keys (a change retrains the quickdrop
  model): scale .. artifacts; the rest is unlearning only (UNLEARN_ONLY_KEYS)."""
  s = base.new_section()
  s.scale = 0.01  # synthetic images per class = ceil(n_c * scale), >= 1
  s.images_per_class = 0  # fixed count per present class instead (0 = use scale)
  s.image_lr = 0.1  # SGD lr on the synthetic images (DC / QuickDrop)
  s.image_momentum = 0.5  # its momentum
  s.metric = "ours"  # gradient-matching distance: ours | mse | cos
  s.model_update = "real"  # real (reuse the real gradient, paper) | synthetic (official)
  s.grads = "per_example"  # per-class gradient algorithm: per_example | vmap | unroll
  s.distill_every = 0  # image step on local steps 0, k, 2k, ... (1 = every step;
  #                          0 = once per round, at the first step: official schedule)
  s.chunk_size = 0  # images per chunk of the stored sets (0 = automatic,
  #                          distill.synthetic_layout; a layout, not a hyperparameter)
  s.clip_images = False  # keep synthetic pixels within the real data's [min, max]
  s.artifacts = True  # write pretrain/<dir>/synthetic/client_<k>.{npz,png}
  # Unlearning keys.
  s.unlearn_epochs = 1  # SGA epochs on the distilled forget data
  s.unlearn_lr = 1.0  # SGA step size (with unlearn_normalize: L2 step length)
  s.unlearn_batch_size = base.linked(fl_cfg, "batch_size")  # SGA batch size
  s.unlearn_normalize = True  # ascend along g/||g||: unlearn_lr = step length
  s.recovery_rounds = 5  # FedAvg rounds on the distilled retained data
  s.recovery_epochs = base.linked(fl_cfg, "local_epochs")  # local epochs per recovery round
  s.recovery_lr = base.linked(fl_cfg, "client_lr")  # recovery lr; momentum fl.client_momentum
  s.clip_norm = 1.0  # recovery: clip each client gradient to this norm (0 = off)
  s.finetune_rounds = 0  # FedAvg rounds on the real retained data afterwards
  s.sequence = ()  # classes forgotten one after another (must hold the request)
  return s


TRAINER = base.Trainer("quickdrop", train_quickdrop, UNLEARN_ONLY_KEYS)

WHY_CLASS_ONLY = (
  "it unlearns by ascent on per-class distilled sets, which hold no "
  "individual sample or client to remove"
)

SECTION = base.Section("quickdrop", config_section, validate)  # quickdrop, quickdrop_nodistill

METHODS = {
  "quickdrop": base.Method(
    "quickdrop", ("class", "client_class"), TRAINER, _unlearn, why=WHY_CLASS_ONLY, section=SECTION
  ),
  # Ablation: the same pipeline on the undistilled sets (their real-image initialisation).
  "quickdrop_nodistill": base.Method(
    "quickdrop_nodistill",
    ("class", "client_class"),
    TRAINER,
    _unlearn_nodistill,
    why=WHY_CLASS_ONLY,
    section=SECTION,
  ),
}
