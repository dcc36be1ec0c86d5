"""QuickDrop's synthetic sets on this simulator: clients over chunked sets, the set phases,
scattering, per-step records and the sets written out.

The algorithm is in `fu_jax.methods.quickdrop`; this module holds what it needs to run on
this simulator and nothing a reader of the paper has to know:

- `UsedChunksRunner`: a loop runner that cuts each client's set to the chunks it uses, so a
  small client does not pay for the largest client's chunks; `chunks_in_use`.
- `scatter_sets`: writes the sampled clients' updated sets back into the [N, ...] stacks.
- `SetPhases`: FedAvg rounds over the clients' synthetic sets (QuickDrop's SGA and recovery),
  with the batch clamped to the sets' size and one runner per program and batch size.
- `record`: the evaluation kept after each step of a sequence of requests.
- `write_synthetic`: per-client .npz files and a .png mosaic of the final sets.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax import distill, fl
from fu_jax import tree as tu
from fu_jax.methods import base
from fu_jax.metrics import accuracy as acc_lib

# ---------------------------------------------------------------------------------------
# Training: clients over chunked sets.


def chunks_in_use(syn: distill.SyntheticSet) -> np.ndarray:
  """int [N]: 1 + the index of each client's last chunk holding an image (at least 1)."""
  used = np.asarray(jnp.any(syn.valid, axis=-1))  # [N, C]
  return np.where(used.any(1), used.shape[1] - np.argmax(used[:, ::-1], 1), 1)


class UsedChunksRunner:
  """A loop ClientRunner that cuts each client's synthetic set to the chunks it uses.

  The stacked sets share C chunks, the most any client needs; on a skewed partition a client
  with a few images would otherwise run the image step over the largest client's chunks.
  Clients run in groups whose sets are cut to the same width, the chunks in use rounded up to
  a multiple of ceil(C / 4) (at most 4 compiled shapes), and their final states are padded
  back to C. The cut-off chunks hold no images and are never changed by the step
  (`distill.synthetic_update`), so the result equals the uncut run up to float rounding.
  Only for the loop runner: a vmap block must share one shape anyway. The client state must
  carry the set and its image-optimizer state as `.syn` and `.syn_opt`, and `extra` starts
  with the set.
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
      res = self.runner.run(
        server_params,
        jax.tree.map(take, data),
        take(valid),
        _resize_chunks(jax.tree.map(take, extra), num_chunks, w, b),
        take(keys),
      )
      st = res.state
      parts.append(
        res._replace(
          state=st._replace(
            syn=_resize_chunks(st.syn, w, num_chunks, b),
            syn_opt=_resize_chunks(st.syn_opt, w, num_chunks, b),
          )
        )
      )
      order.append(idx)
    if len(parts) == 1:
      return parts[0]
    back = np.argsort(np.concatenate(order))
    merge = lambda *a: jnp.take(jnp.concatenate(a), jnp.asarray(back), axis=0)
    return fl.ClientResult(
      jax.tree.map(merge, *[p.params for p in parts]),
      jax.tree.map(merge, *[p.state for p in parts]),
      jax.tree.map(lambda *a: np.concatenate(a)[back], *[p.metrics for p in parts]),
    )


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
def scatter_sets(all_sets, idx, active, new_sets):
  """Writes the sampled clients' updated sets back into the [N, ...] stacks (active only)."""

  def put(a, n):
    cur = jnp.take(a, idx, axis=0)
    keep = active.reshape((-1,) + (1,) * (n.ndim - 1))
    return a.at[idx].set(jnp.where(keep, n, cur))

  return jax.tree.map(put, all_sets, new_sets)


# ---------------------------------------------------------------------------------------
# Unlearning: rounds over the synthetic sets.


class SetPhases:
  """FedAvg-style rounds over the clients' synthetic sets; runners built once per batch size.

  programs: name -> (fl.LocalProgram, local epochs, batch size). A client's synthetic set of
  one class holds a handful of images, so the configured batch would be mostly padding: a
  phase runs with the batch clamped to its largest client's image count (rounded up to a
  multiple of 8 to bound the compiled shapes). Every client then still takes one step over
  all its images per epoch, the same masked-mean gradient, for a fraction of the compute.
  Rounds use the FedAvg server step with lr config.fl.server_lr and the unlearning key
  stream (fl.STREAM_UNLEARN).
  """

  def __init__(self, task: base.Task, env: base.Env, programs: dict):
    self.task, self.env = task, env
    self._programs = dict(programs)
    self._runners = {}
    self.server_opt = fl.server_optimizer(float(task.config.fl.server_lr))

  def program(self, name: str) -> fl.LocalProgram:
    return self._programs[name][0]

  def runner(self, name: str, max_count: int) -> fl.ClientRunner:
    program, epochs, batch_size = self._programs[name]
    batch = min(batch_size, max(8, -(-max_count // 8) * 8))
    if (name, batch) not in self._runners:
      self._runners[name, batch] = self.env.runner(program, epochs, batch)
    return self._runners[name, batch]

  def run(
    self,
    phase: str,
    params,
    num_rounds: int,
    data,
    valid,
    *,
    program: str,
    weights,
    num_sampled: int,
    round_offset: int,
  ):
    """num_rounds rounds of `program` over (data, valid) [N, n, ...]; rounds are numbered
    round_offset + r for sampling and keys. Returns the final parameters."""
    cfg = self.task.config
    counts = np.asarray(jnp.sum(valid, axis=1))
    runner = self.runner(program, int(counts.max(initial=0)))
    play = fl.fedavg_play(
      runner,
      data,
      valid,
      seed=cfg.seed,
      client_weights=weights,
      num_sampled=num_sampled,
      server_opt=self.server_opt,
      stream=fl.STREAM_UNLEARN,
    )
    server = fl.fedavg_rounds(
      play,
      fl.server_init(params, self.server_opt),
      num_rounds,
      rounds=self.env.rounds,
      phase=phase,
      round_offset=round_offset,
      model_bytes=tu.tree_num_bytes(params),
      epochs=runner.epochs,
    )
    return server.params


def record(task: base.Task, params, step: int, classes, forgotten) -> dict:
  """Test / retain / forget accuracy after one step of a sequence of requests."""
  ds = task.dataset
  ev = acc_lib.evaluate(task.apply_fn, params, ds.x_test, ds.y_test, task.num_classes, forgotten)
  return {
    "step": step,
    "classes": list(classes),
    "forgotten": list(forgotten),
    "test_acc": ev["test_acc"],
    "retain_acc": ev["retain_acc"],
    "forget_acc": ev["forget_acc"],
    "class_acc": [ev["per_class_acc"][c] for c in classes],
  }


# ---------------------------------------------------------------------------------------
# Artifacts.


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
      out[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = tile
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
      np.savez_compressed(
        tmp, x=np.concatenate(images), y=np.repeat(np.arange(num_classes), sizes), sizes=sizes
      )
      os.replace(tmp, npz)
    if not os.path.exists(png):
      grid = _mosaic(images)
      m = max(1, int(sizes.max()))
      h = host.x.shape[3]  # x is [N, C, b, H, W, Ch]
      fig = Figure(figsize=(1.5 + 0.4 * m, 0.8 + 0.4 * num_classes), dpi=100)
      FigureCanvasAgg(fig)
      ax = fig.add_subplot(1, 1, 1)
      ax.imshow(
        grid[..., 0] if grid.shape[-1] == 1 else grid,
        cmap="gray",
        interpolation="nearest",
        vmin=0.0,
        vmax=1.0,
      )
      ax.set_yticks([i * (h + 1) + h / 2 for i in range(num_classes)])
      ax.set_yticklabels([f"{i} ({n})" for i, n in enumerate(sizes)], fontsize=6)
      ax.set_xticks([])
      ax.set_title(f"client {k}: synthetic images per class", fontsize=8)
      tmp = png + ".tmp.png"
      fig.savefig(tmp, bbox_inches="tight")
      os.replace(tmp, png)
