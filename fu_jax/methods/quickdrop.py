"""QuickDrop (Dhasade et al., "QuickDrop: Efficient Federated Unlearning by Integrated Dataset
Distillation", arXiv:2311.15603; docs/design.md §5).

Trainer `quickdrop` (Method.pretrain='quickdrop'): FedAvg in which every client also keeps a
synthetic set per local class (distill.SyntheticSet, ceil(n_c * scale) images, >= 1 per
present class, or a fixed images_per_class), initialised from its own real images. Each
local step computes the per-class mean gradients g_c of the real batch once
(distill.per_class_grads) and uses them twice:

  model   theta <- opt(theta, sum_c n_c g_c / sum_c n_c)     model_update='real' (paper)
          theta <- opt(theta, grad CE(S; theta))             model_update='synthetic'
  images  S_c <- SGD_{lr 0.1, momentum 0.5}(S_c, grad_S sum_c D(g_c, grad CE(S_c; theta)))

D is DC's layer-wise, output-channel-wise cosine distance (distill.match_loss). The sets and
their image-optimizer state stay on the clients across rounds: the trainer's round state
is (ServerState, sets [N, ...], image opt states [N, ...]), checkpointed with the model.
'real' takes the same model step as plain FedAvg (combine_class_grads is the batch mean
gradient), so the trained model equals fedavg's up to float rounding.

Method `quickdrop` (class, client_class; several classes at once via unlearn.also_classes):
  1. SGA: one round in which every client holding distilled forget data runs
     `unlearn_epochs` of stochastic gradient ASCENT on it; the server takes the FedAvg mean
     of their models (weighted by their distilled forget counts).
  2. Recovery: `recovery_rounds` FedAvg rounds on the distilled data of what is kept.
  3. Optional `finetune_rounds` FedAvg rounds on the real retained data.
`quickdrop.sequence = (c1, c2, ...)` forgets classes one after another (SGA + recovery per
class), recording retain/forget accuracy after each step (results['sequence']).

Method `quickdrop_nodistill` (the ablation): the same steps 1-3 from the same trained model,
on the sets as the trainer initialised them (a random real subset of the same size), so the
distillation's contribution is the difference of the two (model_update='real' only).

Choices the paper / official code leave open, and ours:
- Persistence: the official client re-initialises its synthetic set from real images at every
  round (only the last round's set survives); the paper describes sets refined over the
  whole training. We keep them (and their momentum) per client across rounds.
- Matching target: the official code draws a separate real batch per class (batch_real 256)
  for the target; we reuse the per-class gradients of the FL mini-batch itself (the
  paper's point: no extra real-data gradient). Classes absent from a batch are frozen.
- Layout: the sets are stored in one-class chunks (distill.SyntheticSet; chunk size from
  distill.synthetic_layout), not one row per class padded to the largest class: on
  Dirichlet(0.1) Fashion-MNIST the largest class set is 60 images and most are 1, so the
  per-class rows made every image step work on 600 slots for 14-169 images. The loop runner
  also cuts each client's set to the chunks it uses (UsedChunksRunner), so a small client
  does not pay for the largest client's chunks.
- Step granularity: the official code takes one image step per local epoch; we take one on
  local steps 0, k, 2k, ... (k = distill_every; 1 = every mini-batch, the paper's "each
  local step"), or with distill_every = 0 (the default) on each client's first local step
  of a round only (= once per local epoch at local_epochs 1, the official schedule). k
  trades distillation for training time: on XLA:CPU one image step (per-class real
  gradients, then a second-order step over K classes x m images) costs ~9 plain steps on
  Fashion-MNIST's CNN (per-class gradients 2.8, image step 6.3), so every-step distillation
  cannot stay near the plain round's cost (4.2x a FedAvg round on digits); once a round it
  adds ~9/steps-per-round: 1.11x on Fashion-MNIST (94 steps; benchmarks/quickdrop_table.py).
- 'synthetic' mode: one model step on the masked-mean CE of the client's whole (updated)
  synthetic set per local step (the official code runs local_epoch epochs of batch 256 on
  it, i.e. the whole set per step when it is small). It needs a small lr and no momentum
  (the official 0.01): with the digits config's 0.05/0.9 it diverges.
- What the 'real' mode distils: at a trained model the per-class target is the gradient of
  1-2 confidently classified examples; the scale-free cosine distance then drives the images
  to "hard examples" whose gradient has the target's direction but a 20-100x larger norm and
  which the model misclassifies (measured on digits). Hence two deviations, both switchable:
  * SGA steps along g / ||g|| (unlearn_normalize, default on): unlearn_lr is then the L2
    length of each ascent step, independent of how hard the distilled images became. A
    fixed-lr ascent (unlearn_normalize=False, the paper's; lr ~0.01) forgets or not
    depending on that norm: on digits the same lr left 70% or 0% forget accuracy for sets
    distilled every step vs. once per epoch.
  * Recovery clips each client gradient to clip_norm (default 1.0, about a real batch's
    gradient norm): unclipped, recovery on the distilled sets degraded retain accuracy by
    5-25 points; clipped it keeps it within ~1 point.
  clip_images (off by default) projects the images onto the real data's [min, max] box.
- SGA in FL: the official reproduction lets one client ascend and overwrites the global
  model with its result; with several holders of the class (class requests) we average
  their ascended models weighted by their distilled forget counts (= the official rule
  when one client holds the data). A parallel request (several classes) shares one
  normalised step between them, so forgets less per class than a single-class request.
- Recovery uses the same client sampling as training (fl.clients_per_round); local steps
  on the synthetic sets use fl.batch_size, recovery_lr (default fl.client_lr) and
  fl.client_momentum.
- Randomness: synthetic init keys fl.stream_key(seed, STREAM_INIT, 1, client); unlearning
  rounds use STREAM_UNLEARN and round indices after fl.rounds (sampling never repeats a
  training round's draw). The official code reseeds from the wall clock; we do not.
- Cost: bytes = the model down and up per participating client and round (synthetic sets
  never leave the clients); examples = synthetic (or real, in fine-tuning) images touched.
- Backdoor requests: the planted samples carry flipped labels, so they are distilled into
  the flipped class's set, not the forgotten class's; SGA on class c cannot target them.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fu_jax import ascent
from fu_jax import distill
from fu_jax import fl
from fu_jax import images
from fu_jax import losses
from fu_jax import models
from fu_jax import tree as tu
from fu_jax.methods import base
from fu_jax.metrics import accuracy as acc_lib

MODEL_UPDATES = ("real", "synthetic")
GRAD_METHODS = ("per_example", "vmap", "unroll")
# Keys of config.quickdrop that determine the trained model (the rest is unlearning only).
TRAIN_KEYS = ("scale", "images_per_class", "image_lr", "image_momentum", "metric",
              "model_update", "grads", "distill_every", "chunk_size", "clip_images",
              "artifacts")
SYNTH_INIT_ID = 1  # fl.stream_key(seed, STREAM_INIT, SYNTH_INIT_ID, client): the sets' init


# ---------------------------------------------------------------------------------------
# Config.


def settings(config) -> dict:
  """config.quickdrop with defaults resolved against fl.*; ValueError on bad values."""
  q, f = config.quickdrop, config.fl
  s = dict(scale=float(q.scale), images_per_class=int(q.images_per_class),
           image_lr=float(q.image_lr), image_momentum=float(q.image_momentum),
           metric=str(q.metric), model_update=str(q.model_update), grads=str(q.grads),
           artifacts=bool(q.artifacts), clip_images=bool(q.clip_images),
           distill_every=int(q.distill_every), chunk_size=int(q.chunk_size),
           unlearn_epochs=int(q.unlearn_epochs), unlearn_lr=float(q.unlearn_lr),
           unlearn_batch_size=int(q.unlearn_batch_size) or int(f.batch_size),
           recovery_rounds=int(q.recovery_rounds),
           recovery_epochs=int(q.recovery_epochs) or int(f.local_epochs),
           recovery_lr=float(q.recovery_lr) or float(f.client_lr),
           finetune_rounds=int(q.finetune_rounds), clip_norm=float(q.clip_norm),
           unlearn_normalize=bool(q.unlearn_normalize),
           sequence=tuple(int(c) for c in (q.sequence or ())))
  if s["images_per_class"] < 0:
    raise ValueError(f"quickdrop.images_per_class={q.images_per_class!r}: must be >= 0 "
                     "(0 = use quickdrop.scale)")
  if not s["images_per_class"] and not 0.0 < s["scale"] <= 1.0:
    raise ValueError(f"quickdrop.scale={q.scale!r}: must be in (0, 1]")
  if s["image_lr"] <= 0 or not 0.0 <= s["image_momentum"] < 1.0:
    raise ValueError(f"quickdrop.image_lr={q.image_lr!r} / image_momentum="
                     f"{q.image_momentum!r}: need lr > 0 and momentum in [0, 1)")
  if s["metric"] not in distill.METRICS:
    raise ValueError(f"quickdrop.metric={q.metric!r}: allowed {distill.METRICS}")
  if s["model_update"] not in MODEL_UPDATES:
    raise ValueError(f"quickdrop.model_update={q.model_update!r}: allowed {MODEL_UPDATES}")
  if s["grads"] not in GRAD_METHODS:
    raise ValueError(f"quickdrop.grads={q.grads!r}: allowed {GRAD_METHODS}")
  for k in ("unlearn_epochs", "unlearn_batch_size", "recovery_epochs"):
    if s[k] < 1:
      raise ValueError(f"quickdrop.{k}={q[k]!r}: must be >= 1 (batch size/recovery epochs: "
                       "0 = the fl.* value)")
  if s["unlearn_lr"] <= 0 or s["recovery_lr"] <= 0:
    raise ValueError(f"quickdrop.unlearn_lr={q.unlearn_lr!r} / recovery_lr="
                     f"{q.recovery_lr!r}: must be > 0 (recovery_lr 0 = fl.client_lr)")
  if s["distill_every"] < 0:
    raise ValueError(f"quickdrop.distill_every={q.distill_every!r}: must be >= 0 "
                     "(0 = once per round, at the first local step)")
  if s["chunk_size"] < 0:
    raise ValueError(f"quickdrop.chunk_size={q.chunk_size!r}: must be >= 0 (0 = automatic)")
  if s["clip_norm"] < 0:
    raise ValueError(f"quickdrop.clip_norm={q.clip_norm!r}: must be >= 0 (0 = off)")
  for k in ("recovery_rounds", "finetune_rounds"):
    if s[k] < 0:
      raise ValueError(f"quickdrop.{k}={q[k]!r}: must be >= 0")
  if len(set(s["sequence"])) != len(s["sequence"]):
    raise ValueError(f"quickdrop.sequence={q.sequence!r}: classes must be distinct")
  return s


# ---------------------------------------------------------------------------------------
# Distilling local training (the trainer's local program).


class DistillState(NamedTuple):
  """A client's local state: model, its optimizer, synthetic set, image optimizer."""
  params: Any
  opt_state: Any
  syn: distill.SyntheticSet
  syn_opt: Any


class TrainState(NamedTuple):
  """The trainer's round state: the server plus every client's set, leading axis N."""
  server: fl.ServerState
  syn: distill.SyntheticSet
  syn_opt: Any


def _distill_apply(model):
  """(params, x) -> logits, the signature fu_jax.distill takes."""
  return models.logits_fn(model)


def image_optimizer(s: dict) -> optax.GradientTransformation:
  return distill.default_image_optimizer(s["image_lr"], s["image_momentum"])


def distill_program(model, num_classes: int, optimizer: optax.GradientTransformation,
                    image_opt: optax.GradientTransformation, *, model_update: str = "real",
                    metric: str = "ours", grads: str = "per_example", distill_every: int = 0,
                    image_range=None) -> fl.LocalProgram:
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
  the host (fl.LocalProgram; lax.cond would slow every step ~19x on XLA:CPU).
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
    g_class = distill.per_class_grads(fn, p, batch.x, batch.y, batch.mask, num_classes,
                                      method=grads)
    counts = distill.class_counts(batch.y, batch.mask, num_classes)
    syn, syn_opt, match = distill.synthetic_update(
        fn, p, state.syn, g_class, state.syn_opt, optimizer=image_opt, metric=metric,
        real_counts=counts)
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
  return fl.LocalProgram(init, model_step(plain), finish, scheduled_step=model_step(distilling),
                         schedule=due)


def pixel_range(task: base.Task):
  """(min, max) of the real training inputs: the box synthetic images are kept in."""
  x = np.asarray(task.dataset.x_train)
  return float(x.min()), float(x.max())


def class_counts_per_client(task: base.Task) -> np.ndarray:
  """int [N, K]: real training examples of each class held by each client."""
  y = np.asarray(task.clients.y)
  v = np.asarray(task.clients.valid)
  return np.stack([np.bincount(y[k][v[k]], minlength=task.num_classes)
                   for k in range(y.shape[0])]).astype(np.int64)


def init_sets(task: base.Task, s: dict) -> distill.SyntheticSet:
  """Every client's synthetic set [N, C, b, ...], initialised from its own real images."""
  counts = class_counts_per_client(task)
  sizes = distill.synthetic_sizes(counts, s["scale"], s["images_per_class"] or None)
  chunk_size, num_chunks = distill.synthetic_layout(sizes, s["chunk_size"] or None)
  n = counts.shape[0]
  keys = jax.vmap(lambda k: fl.stream_key(task.config.seed, fl.STREAM_INIT, SYNTH_INIT_ID, k))(
      jnp.arange(n))
  c = task.clients

  @jax.jit
  def build(x, y, valid, keys, sizes):
    one = lambda x, y, v, k, sz: distill.init_synthetic(
        x, y, v, task.num_classes, key=k, chunk_size=chunk_size, num_chunks=num_chunks,
        sizes=sz)
    return jax.vmap(one)(x, y, valid, keys, sizes)

  # The real images are materialised outside the jitted build, a block of clients at a time.
  return images.map_client_blocks(build, c.x, c.y, c.valid, keys, jnp.asarray(sizes))


def chunks_in_use(syn: distill.SyntheticSet) -> np.ndarray:
  """int [N]: 1 + the index of each client's last chunk holding an image (at least 1)."""
  used = np.asarray(jnp.any(syn.valid, axis=-1))  # [N, C]
  return np.where(used.any(1), used.shape[1] - np.argmax(used[:, ::-1], 1), 1)


class UsedChunksRunner:
  """A loop ClientRunner that cuts each client's synthetic set to the chunks it uses.

  The stacked sets share C chunks, the most any client needs; on Dirichlet(0.1) Fashion-MNIST
  a client with 14 images would otherwise run the image step over the 169-image client's
  chunks. Clients run in groups whose sets are cut to the same width, the chunks in use
  rounded up to a multiple of ceil(C / 4) (at most 4 compiled shapes), and their final
  states are padded back to C. The cut-off chunks hold no images and are never changed by
  the step (`distill.synthetic_update`), so the result equals the uncut run up to float
  rounding. Only for the loop runner: a vmap block must share one shape anyway.
  """

  def __init__(self, runner: fl.ClientRunner):
    self.runner = runner

  def widths(self, syn: distill.SyntheticSet) -> np.ndarray:
    num_chunks = syn.valid.shape[1]
    step = -(-num_chunks // 4)
    return np.minimum(-(-chunks_in_use(syn) // step) * step, num_chunks)

  def run(self, server_params, data, valid, extra, keys) -> fl.ClientResult:
    syn = extra[0]
    num_chunks, b = syn.valid.shape[1:]
    widths = self.widths(syn)
    parts, order = [], []
    for w in np.unique(widths):
      idx = np.flatnonzero(widths == w)
      take = lambda a, idx=idx: jnp.take(a, jnp.asarray(idx), axis=0)
      res = self.runner.run(server_params, jax.tree.map(take, data), take(valid),
                            _resize_chunks(jax.tree.map(take, extra), num_chunks, w, b),
                            take(keys))
      st = res.state
      parts.append(res._replace(state=st._replace(
          syn=_resize_chunks(st.syn, w, num_chunks, b),
          syn_opt=_resize_chunks(st.syn_opt, w, num_chunks, b))))
      order.append(idx)
    if len(parts) == 1:
      return parts[0]
    back = np.argsort(np.concatenate(order))
    merge = lambda *a: jnp.take(jnp.concatenate(a), jnp.asarray(back), axis=0)
    return fl.ClientResult(jax.tree.map(merge, *[p.params for p in parts]),
                           jax.tree.map(merge, *[p.state for p in parts]),
                           jax.tree.map(lambda *a: np.concatenate(a)[back],
                                        *[p.metrics for p in parts]))


def _resize_chunks(tree, old: int, new: int, b: int):
  """Cuts or zero-pads the chunk axis (axis 1) of every leaf shaped [n, old, b, ...] (sets
  and their image-optimizer state) to `new` chunks; other leaves are left alone."""
  def resize(a):
    if a.ndim < 3 or a.shape[1:3] != (old, b) or old == new:
      return a
    if new < old:
      return a[:, :new]
    return jnp.pad(a, [(0, 0), (0, new - old)] + [(0, 0)] * (a.ndim - 2))
  return jax.tree.map(resize, tree)


@jax.jit
def _scatter(all_sets, idx, active, new_sets):
  """Writes the sampled clients' updated sets back into the [N, ...] stacks (active only)."""
  def put(a, n):
    cur = jnp.take(a, idx, axis=0)
    keep = active.reshape((-1,) + (1,) * (n.ndim - 1))
    return a.at[idx].set(jnp.where(keep, n, cur))
  return jax.tree.map(put, all_sets, new_sets)


def training_rounds(task: base.Task, env: base.Env, s: dict):
  """(init_state, round_fn) of the distilling FedAvg: round_fn(TrainState, r) -> (state,
  metrics) samples clients, runs distill_program with their sets as `extra`, writes the
  updated sets back and aggregates (fl.fedavg_round). Also used by the benchmark."""
  cfg = task.config
  c = task.clients
  image_opt = image_optimizer(s)
  program = distill_program(task.model, task.num_classes, base.client_optimizer(cfg),
                            image_opt, model_update=s["model_update"], metric=s["metric"],
                            grads=s["grads"], distill_every=s["distill_every"],
                            image_range=pixel_range(task) if s["clip_images"] else None)
  runner = env.runner(program, cfg.fl.local_epochs, cfg.fl.batch_size)
  if getattr(runner, "kind", None) == "loop":
    runner = UsedChunksRunner(runner)
  server_opt = optax.sgd(cfg.fl.server_lr)
  weights = np.ones(c.count.shape[0], np.float32)
  k = base.num_sampled(cfg)
  params = base.init_params(task)
  model_bytes = tu.tree_num_bytes(params)

  def round_fn(state: TrainState, r):
    res = fl.fedavg_round(state.server, runner, (c.x, c.y), c.valid,
                          (state.syn, state.syn_opt), seed=cfg.seed, round_idx=r,
                          client_weights=weights, num_sampled=k, server_opt=server_opt)
    active = weights[res.sampled] > 0
    syn, syn_opt = _scatter((state.syn, state.syn_opt), jnp.asarray(res.sampled),
                            jnp.asarray(active), (res.client.state.syn,
                                                  res.client.state.syn_opt))
    m = dict(res.metrics, **fl.round_cost(res.counts, res.weights, model_bytes=model_bytes,
                                          epochs=cfg.fl.local_epochs))
    return TrainState(res.server, syn, syn_opt), m

  syn = init_sets(task, s)
  init = TrainState(fl.server_init(params, server_opt), syn, jax.vmap(image_opt.init)(syn.x))
  return init, round_fn


def train_quickdrop(task: base.Task, env: base.Env) -> base.Trained:
  """FedAvg with integrated distillation; Trained.extra = the clients' SyntheticSet [N, ...].

  The round state (server, sets, image optimizer states) is checkpointed by env.rounds, so
  a resumed run continues with the sets as they were. With quickdrop.artifacts the final
  sets are written to <pretrain dir>/synthetic/ (needs env.artifact_dir).
  """
  s = settings(task.config)
  init, round_fn = training_rounds(task, env, s)
  state = env.rounds("train", init, task.config.fl.rounds, round_fn,
                     lambda st: st.server.params)
  if s["artifacts"]:
    directory = _artifact_dir(env, "synthetic")
    if directory is not None:
      write_synthetic(directory, state.syn, task.num_classes)
  return base.Trained(state.server.params, extra=state.syn)


# ---------------------------------------------------------------------------------------
# Artifacts.


def _artifact_dir(env, name: str):
  """env.artifact_dir(name) when the Env offers it (experiments.run.RunEnv does)."""
  fn = getattr(env, "artifact_dir", None)
  return fn(name) if fn is not None else None


def _mosaic(images: list):
  """[x_c [n_c, H, W, Ch] per class] -> one [K*(H+1)-1, m*(W+1)-1, Ch] grid in [0, 1]; rows =
  classes, m = max n_c.

  Each image is min-max scaled on its own (the sets live in standardised units); empty
  slots are mid grey.
  """
  h, w, ch = images[0].shape[1:]  # an empty class is [0, H, W, Ch]
  k, m = len(images), max(1, max(len(x) for x in images))
  out = np.full((k * (h + 1) - 1, m * (w + 1) - 1, ch), 1.0, np.float32)
  for i, xs in enumerate(images):
    for j in range(m):
      tile = np.full((h, w, ch), 0.5, np.float32)
      if j < len(xs):
        img = xs[j]
        lo, hi = float(img.min()), float(img.max())
        tile = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
      out[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = tile
  return out


def write_synthetic(directory: str, syn: distill.SyntheticSet, num_classes: int):
  """client_<k>.npz (x [n, H, W, Ch] and y [n]: the client's n synthetic images, in class
  order; sizes [K]) and client_<k>.png (a row of images per class) per client.

  Files are written through a temporary name and renamed, and skipped when present (the
  pretraining directory is keyed by the training config, so they cannot be stale).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  host = jax.tree.map(np.asarray, syn)  # one device-to-host copy for all clients
  for k in range(host.valid.shape[0]):
    npz = os.path.join(directory, f"client_{k}.npz")
    png = os.path.join(directory, f"client_{k}.png")
    if os.path.exists(npz) and os.path.exists(png):
      continue
    images = distill.images_by_class(jax.tree.map(lambda a, k=k: a[k], host), num_classes)
    sizes = np.array([len(x) for x in images])
    if not os.path.exists(npz):
      tmp = npz + ".tmp.npz"
      np.savez_compressed(tmp, x=np.concatenate(images),
                          y=np.repeat(np.arange(num_classes), sizes), sizes=sizes)
      os.replace(tmp, npz)
    if not os.path.exists(png):
      grid = _mosaic(images)
      m = max(1, int(sizes.max()))
      h = host.x.shape[3]  # x is [N, C, b, H, W, Ch]
      fig = Figure(figsize=(1.5 + 0.4 * m, 0.8 + 0.4 * num_classes), dpi=100)
      FigureCanvasAgg(fig)
      ax = fig.add_subplot(1, 1, 1)
      ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray",
                interpolation="nearest", vmin=0.0, vmax=1.0)
      ax.set_yticks([i * (h + 1) + h / 2 for i in range(num_classes)])
      ax.set_yticklabels([f"{i} ({n})" for i, n in enumerate(sizes)], fontsize=6)
      ax.set_xticks([])
      ax.set_title(f"client {k}: synthetic images per class", fontsize=8)
      tmp = png + ".tmp.png"
      fig.savefig(tmp, bbox_inches="tight")
      os.replace(tmp, png)


# ---------------------------------------------------------------------------------------
# Unlearning.


def synthetic_masks(syn: distill.SyntheticSet, classes, client: int = -1):
  """bool [N, C, b]: the synthetic images of `classes` (on `client` only if >= 0)."""
  sel = distill.class_masks(syn, classes)
  if client >= 0:
    sel = sel & (jnp.arange(sel.shape[0]) == client)[:, None, None]
  return sel


def _flat_data(syn: distill.SyntheticSet, mask):
  x, y, _ = distill.flatten(syn)
  return (x, y), mask.reshape(y.shape)


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


class _SynPhases:
  """FedAvg-style rounds over the clients' synthetic sets; runners built once per batch size.

  A client's synthetic set of one class holds a handful of images (6 on Fashion-MNIST at
  scale 0.01), so the configured batch (64) would be mostly padding: a phase runs with the
  batch clamped to its largest client's image count (rounded up to a multiple of 8 to
  bound the compiled shapes). Every client then still takes one step over all its images
  per epoch, the same masked-mean gradient, at a tenth of the SGA round's compute.
  """

  def __init__(self, task: base.Task, env: base.Env, s: dict):
    cfg = task.config
    self.task, self.env, self.s = task, env, s
    clip = [optax.clip_by_global_norm(s["clip_norm"])] if s["clip_norm"] > 0 else []
    descend = optax.chain(*clip, optax.sgd(s["recovery_lr"],
                                           momentum=cfg.fl.client_momentum or None))
    self._programs = {True: (fl.sgd_program(task.apply_fn, sga_optimizer(s)),
                             s["unlearn_epochs"], s["unlearn_batch_size"]),
                      False: (fl.sgd_program(task.apply_fn, descend), s["recovery_epochs"],
                              cfg.fl.batch_size)}
    self._runners = {}
    self.server_opt = optax.sgd(cfg.fl.server_lr)

  def runner(self, sga: bool, max_count: int) -> fl.ClientRunner:
    program, epochs, batch_size = self._programs[sga]
    batch = min(batch_size, max(8, -(-max_count // 8) * 8))
    if (sga, batch) not in self._runners:
      self._runners[sga, batch] = self.env.runner(program, epochs, batch)
    return self._runners[sga, batch]

  def run(self, phase, params, num_rounds, data, valid, *, sga: bool, weights, num_sampled,
          round_offset):
    """num_rounds rounds of SGA (sga=True) or recovery over (data, valid) [N, n, ...]."""
    cfg = self.task.config
    model_bytes = tu.tree_num_bytes(params)
    counts = np.asarray(jnp.sum(valid, axis=1))
    runner = self.runner(sga, int(counts.max(initial=0)))
    epochs = runner.epochs

    def round_fn(server, r):
      res = fl.fedavg_round(server, runner, data, valid, None, seed=cfg.seed,
                            round_idx=round_offset + r, client_weights=weights,
                            num_sampled=num_sampled, server_opt=self.server_opt,
                            stream=fl.STREAM_UNLEARN)
      m = dict(res.metrics, **fl.round_cost(res.counts, res.weights, model_bytes=model_bytes,
                                            epochs=epochs))
      return res.server, m

    server = fl.server_init(params, self.server_opt)
    server = self.env.rounds(phase, server, num_rounds, round_fn, lambda st: st.params)
    return server.params


def _steps(task: base.Task, s: dict) -> list:
  """The unlearning steps: [request classes] (parallel), or one class per sequence entry."""
  if not s["sequence"]:
    return [tuple(task.request.classes)]
  if task.request.kind != "class":
    raise ValueError(f"quickdrop.sequence={s['sequence']} needs unlearn.kind='class', got "
                     f"{task.request.kind!r}")
  bad = [c for c in s["sequence"] if not 0 <= c < task.num_classes]
  if bad:
    raise ValueError(f"quickdrop.sequence has classes {bad} outside 0..{task.num_classes - 1}")
  missing = [c for c in task.request.classes if c not in s["sequence"]]
  if missing:
    raise ValueError(f"quickdrop.sequence={s['sequence']} must contain the requested classes "
                     f"{tuple(task.request.classes)} (missing {missing}): the run evaluates "
                     "the final model against the request")
  return [(c,) for c in s["sequence"]]


def _record(task: base.Task, params, step: int, classes, forgotten) -> dict:
  ds = task.dataset
  ev = acc_lib.evaluate(task.apply_fn, params, ds.x_test, ds.y_test, task.num_classes,
                        forgotten)
  return {"step": step, "classes": list(classes), "forgotten": list(forgotten),
          "test_acc": ev["test_acc"], "retain_acc": ev["retain_acc"],
          "forget_acc": ev["forget_acc"],
          "class_acc": [ev["per_class_acc"][c] for c in classes]}


def _unlearn(task: base.Task, env: base.Env, trained: base.Trained) -> base.Outcome:
  cfg = task.config
  s = settings(cfg)
  syn = trained.extra
  if not isinstance(syn, distill.SyntheticSet):
    raise ValueError("quickdrop needs the synthetic sets of its own trainer "
                     f"(Trained.extra), got {type(syn).__name__}; use pretrain='quickdrop'")
  req = task.request
  if req.kind not in ("class", "client_class"):
    raise ValueError(f"quickdrop serves class and client_class requests, got {req.kind!r}")
  client = req.client if req.kind == "client_class" else -1
  steps = _steps(task, s)
  phases = _SynPhases(task, env, s)
  n = syn.valid.shape[0]
  weights = np.asarray(task.client_weights, np.float32)
  k = base.num_sampled(cfg)
  params = trained.params
  offset = cfg.fl.rounds
  forgotten = ()
  records = [_record(task, params, 0, (), ())] if s["sequence"] else []
  totals = {"forget_synthetic": 0, "retain_synthetic": 0}
  for i, classes in enumerate(steps):
    tag = f"_{i + 1}" if s["sequence"] else ""
    forgotten = forgotten + tuple(classes)
    forget_mask = synthetic_masks(syn, classes, client)
    data, fvalid = _flat_data(syn, forget_mask)
    holders = (np.asarray(jnp.sum(fvalid, axis=1)) > 0).astype(np.float32) * weights
    params = phases.run("sga" + tag, params, 1, data, fvalid, sga=True, weights=holders,
                        num_sampled=n, round_offset=offset)
    offset += 1
    keep = syn.valid & ~synthetic_masks(syn, forgotten, client)
    _, rvalid = _flat_data(syn, keep)
    if s["recovery_rounds"]:
      params = phases.run("recovery" + tag, params, s["recovery_rounds"], data, rvalid,
                          sga=False, weights=weights, num_sampled=k, round_offset=offset)
      offset += s["recovery_rounds"]
    if s["finetune_rounds"]:
      real_keep = task.retain_valid if client >= 0 else (
          task.clients.valid & ~jnp.isin(task.y_true, jnp.asarray(forgotten)))
      params = base.fedavg_phase(task, env, "finetune" + tag, params, s["finetune_rounds"],
                                 valid=real_keep, client_weights=task.client_weights,
                                 round_offset=offset)
      offset += s["finetune_rounds"]
    totals["forget_synthetic"] += int(jnp.sum(forget_mask))
    totals["retain_synthetic"] = int(jnp.sum(keep))
    if s["sequence"]:
      records.append(_record(task, params, i + 1, classes, forgotten))
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
    raise ValueError(f"quickdrop_nodistill needs quickdrop.model_update='real' (got "
                     f"{s['model_update']!r}): only then is the trained model independent "
                     "of the image steps")
  syn = trained.extra
  if not isinstance(syn, distill.SyntheticSet):
    raise ValueError("quickdrop_nodistill needs the synthetic sets of the quickdrop trainer "
                     f"(Trained.extra), got {type(syn).__name__}")
  init = init_sets(task, s)
  if (init.x.shape != syn.x.shape
      or not np.array_equal(np.asarray(init.valid), np.asarray(syn.valid))
      or not np.array_equal(np.asarray(init.y), np.asarray(syn.y))):
    raise ValueError("quickdrop_nodistill: the trainer's sets do not have the layout "
                     "init_sets rebuilds from this config")
  out = _unlearn(task, env, trained._replace(extra=init))
  return out._replace(results=dict(out.results, synthetic="real_init"))


WHY_CLASS_ONLY = ("it unlearns by ascent on per-class distilled sets, which hold no "
                  "individual sample or client to remove")

METHODS = {
    "quickdrop": base.Method("quickdrop", ("class", "client_class"), "quickdrop", _unlearn,
                             why=WHY_CLASS_ONLY),
    # Ablation: the same pipeline on the undistilled sets (their real-image initialisation).
    "quickdrop_nodistill": base.Method("quickdrop_nodistill", ("class", "client_class"),
                                       "quickdrop", _unlearn_nodistill, why=WHY_CLASS_ONLY),
}

TRAINERS = {"quickdrop": train_quickdrop}
