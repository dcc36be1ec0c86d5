"""Partitioning the training set over clients (iid, dirichlet, client_dirichlet, shards)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fu_jax.data._normalise import check_int


def _check_partition_labels(labels, num_clients) -> tuple[np.ndarray, int]:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
    )
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be >= 0, found {labels.min()}")
  num_clients = check_int(num_clients, "num_clients", 1)
  if num_clients > labels.size:
    raise ValueError(
      f"num_clients={num_clients} exceeds the number of examples "
      f"({labels.size}); some clients would be empty"
    )
  return labels, num_clients


def partition_iid(labels, num_clients: int, seed: int) -> list[np.ndarray]:
  """A seeded permutation cut into num_clients near-equal parts (sizes differ by <= 1)."""
  labels, num_clients = _check_partition_labels(labels, num_clients)
  rng = np.random.default_rng(seed)
  return [p.astype(np.int64) for p in np.array_split(rng.permutation(labels.size), num_clients)]


def partition_dirichlet(
  labels, num_clients: int, alpha: float, seed: int, min_size: int = 10, max_retries: int = 1000
) -> list[np.ndarray]:
  """Label-skewed split (Hsu et al. 2019; NIID-Bench, Li et al. 2022).

  For every class c, proportions p_c ~ Dirichlet(alpha 1_N) over the N clients; the class's
  shuffled samples are cut at floor(cumsum(p_c) n_c). Redrawn (all classes) until every client
  holds >= min_size samples, at most max_retries draws; each draw costs O(classes * N), so even
  alpha=0.01 with 100 clients fails fast. Small alpha -> each client sees few classes.

  Raises:
    ValueError: bad arguments, min_size * N > n (impossible), or no draw met min_size (the
      message gives the best smallest client reached).
  """
  labels, num_clients = _check_partition_labels(labels, num_clients)
  alpha = _check_alpha(alpha)
  min_size = check_int(min_size, "min_size", 0)
  max_retries = check_int(max_retries, "max_retries", 1)
  if min_size * num_clients > labels.size:
    raise ValueError(
      f"min_size={min_size} with num_clients={num_clients} needs "
      f"{min_size * num_clients} examples, only {labels.size} available"
    )
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  counts = np.array([np.sum(labels == c) for c in classes])
  best = -1
  for _ in range(max_retries):
    props = rng.dirichlet(np.full(num_clients, alpha), size=classes.size)  # [C, N]
    cuts = np.floor(np.cumsum(props, axis=1) * counts[:, None]).astype(np.int64)
    cuts[:, -1] = counts  # cumsum can end at 1 - eps
    cuts = np.minimum(cuts, counts[:, None])
    sizes = np.diff(cuts, axis=1, prepend=0)  # [C, N]
    smallest = int(sizes.sum(0).min())
    best = max(best, smallest)
    if smallest >= min_size:
      break
  else:
    raise ValueError(
      f"partition_dirichlet: no draw in max_retries={max_retries} gave every "
      f"one of {num_clients} clients >= min_size={min_size} examples (best "
      f"smallest client: {best}) with alpha={alpha}; raise alpha, lower min_size "
      f"or num_clients"
    )
  parts = [[] for _ in range(num_clients)]
  for c, cut in zip(classes, cuts):
    idx = rng.permutation(np.flatnonzero(labels == c))
    for k, chunk in enumerate(np.split(idx, cut[:-1])):
      parts[k].append(chunk)
  return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts]


def _largest_remainder(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """int64 counts proportional to `weights` summing to `total` exactly: floor of the quota,
  plus one for the largest remainders (ties broken at random)."""
  quota = total * weights / weights.sum()
  out = np.floor(quota).astype(np.int64)
  short = total - int(out.sum())
  if short:
    order = np.lexsort((rng.random(weights.size), -(quota - out)))
    out[order[:short]] += 1
  return out


def client_sizes(
  n: int, num_clients: int, size_sigma: float, rng: np.random.Generator, min_size: int = 1
) -> np.ndarray:
  """int64 [N] client sizes summing to n exactly, each >= min_size.

  Every client gets min_size, and the remaining n - N min_size examples are shared in
  proportion to w_k = exp(size_sigma z_k), z_k ~ N(0, 1) (largest-remainder rounding): a
  log-normal spread of scale size_sigma around the mean n / N. size_sigma = 0 gives equal
  sizes (differing by <= 1).
  """
  extra = n - num_clients * min_size
  if extra < 0:
    raise ValueError(
      f"min_size={min_size} with num_clients={num_clients} needs "
      f"{num_clients * min_size} examples, only {n} available"
    )
  z = rng.standard_normal(num_clients)
  w = np.exp(size_sigma * (z - z.max()))  # shifted: the same proportions, no overflow
  return min_size + _largest_remainder(extra, w, rng)


def partition_client_dirichlet(
  labels, num_clients: int, alpha: float, seed: int, *, size_sigma: float = 0.0, min_size: int = 1
) -> list[np.ndarray]:
  """Cross-device label skew: each client draws its own class mixture (Hsu et al. 2019's
  per-client Dirichlet, as in FedLab's client-side Dirichlet partition; sizes log-normal as in
  FedLab's unbalanced split).

  Client k has size s_k (`client_sizes`: log-normal with size_sigma around n / N, sizes sum
  to n exactly, each >= min_size) and mixture p_k ~ Dirichlet(alpha 1_C) over the C classes
  present. Its examples are drawn without replacement from what is left of each class:

    1. every client still short of its size demands r_k examples split
       r_k ~ Multinomial(r_k, q_k), q_k = p_k restricted to the classes with data left and
       renormalised (p_k itself while every class has data; if p_k puts no mass on any class
       with data left, which Dirichlet underflow at tiny alpha can cause, q_k = the
       remaining class proportions);
    2. a class with enough left serves every demand; a class demanded beyond what is left
       is shared out at random between the demanding units (multivariate hypergeometric:
       every unit of demand equally likely to be served) and is then exhausted;
    3. repeat with the unserved demand. Each pass serves everything or exhausts a class, so
       at most C + 1 passes; total demand always equals total supply, so every client
       ends at exactly s_k.

  When a class runs out, a client's unserved demand for it is thus re-drawn from its own
  mixture renormalised over the classes with data left. All clients compete in the same
  pass (no client order), and every step is vectorised over clients: 10,000 clients take
  well under a second. Small alpha -> each client holds few classes.

  Returns num_clients int64 index arrays (each in a seeded shuffled order).
  """
  labels, num_clients = _check_partition_labels(labels, num_clients)
  alpha = _check_alpha(alpha)
  ok = (
    isinstance(size_sigma, (int, float, np.integer, np.floating))
    and not isinstance(size_sigma, bool)
    and np.isfinite(size_sigma)
    and size_sigma >= 0
  )
  if not ok:
    raise ValueError(f"size_sigma must be a finite number >= 0, got {size_sigma!r}")
  min_size = check_int(min_size, "min_size", 1)
  rng = np.random.default_rng(seed)
  classes, class_of, supply = np.unique(labels, return_inverse=True, return_counts=True)
  num_classes = classes.size
  sizes = client_sizes(labels.size, num_clients, float(size_sigma), rng, min_size)
  mix = rng.dirichlet(np.full(num_classes, alpha), size=num_clients)  # [N, C]
  need = sizes.copy()
  left = supply.astype(np.int64)
  held = np.zeros((num_clients, num_classes), np.int64)
  for _ in range(num_classes + 1):
    if not need.any():
      break
    q = mix * (left > 0)
    mass = q.sum(1, keepdims=True)
    fallback = (left / left.sum())[None]
    q = np.where(mass > 0, q / np.where(mass > 0, mass, 1.0), fallback)
    q[:, left == 0] = 0.0  # exact zeros: the fallback rows are renormalised already
    want = rng.multinomial(need, q)  # [N, C]
    grant = want
    for c in np.flatnonzero(want.sum(0) > left):
      grant[:, c] = rng.multivariate_hypergeometric(want[:, c], int(left[c]))
    held += grant
    need -= grant.sum(1)
    left -= grant.sum(0)
  assert not need.any() and not left.any(), "client_dirichlet did not place every example"
  # Deal each class's shuffled examples to its holders, then shuffle within each client.
  owner = np.empty(labels.size, np.int64)
  for c in range(num_classes):
    idx = rng.permutation(np.flatnonzero(class_of == c))
    owner[idx] = np.repeat(np.arange(num_clients), held[:, c])
  order = np.lexsort((rng.random(labels.size), owner))
  return np.split(order.astype(np.int64), np.cumsum(sizes)[:-1])


def partition_shards(
  labels, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
  """Each client holds exactly k = classes_per_client distinct classes (pathological non-IID,
  McMahan et al. 2017; k=1 is "one class per user").

  Classes are dealt greedily: client i takes the k classes held by the fewest clients so far,
  ties broken at random, so every class is held by floor(N k / C) or ceil(N k / C) clients
  (N=10, k=1, C=10: each client a distinct class). A class's shuffled samples are split
  evenly (sizes differ by <= 1) among its holders: every sample is assigned exactly once.
  C counts the classes present in `labels`.

  Raises:
    ValueError: k outside [1, C]; N k < C (some class would be held by nobody and its
      samples dropped; refused rather than silently shrinking the data); or a class with
      fewer samples than holders (a holder would get none of it).
  """
  labels, num_clients = _check_partition_labels(labels, num_clients)
  classes = np.unique(labels)
  k = check_int(classes_per_client, "classes_per_client", 1, classes.size)
  if num_clients * k < classes.size:
    raise ValueError(
      f"num_clients * classes_per_client = {num_clients * k} < "
      f"{classes.size} classes: some classes would belong to no client"
    )
  rng = np.random.default_rng(seed)
  holders = [[] for _ in classes]
  load = np.zeros(classes.size, np.int64)
  for client in range(num_clients):
    pick = np.lexsort((rng.random(classes.size), load))[:k]
    load[pick] += 1
    for j in pick:
      holders[j].append(client)
  parts = [[] for _ in range(num_clients)]
  for c, owners in zip(classes, holders):
    idx = rng.permutation(np.flatnonzero(labels == c))
    if idx.size < len(owners):
      raise ValueError(f"class {c} has {idx.size} examples for {len(owners)} holding clients")
    for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
      parts[owner].append(chunk)
  return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts]


def _check_alpha(alpha) -> float:
  ok = isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(alpha, bool)
  if not ok or not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
  return float(alpha)


PARTITIONS = ("iid", "dirichlet", "client_dirichlet", "shards")


def partition(
  labels,
  num_clients: int,
  *,
  kind: str,
  seed: int,
  alpha: float = 0.5,
  classes_per_client: int = 2,
  min_size: int = 10,
  max_retries: int = 1000,
  size_sigma: float = 0.0,
) -> list[np.ndarray]:
  """Dispatches to partition_{iid, dirichlet, client_dirichlet, shards}; unused arguments
  are ignored.

  Returns num_clients int64 index arrays into `labels` (each in a seeded shuffled order).
  """
  if kind == "iid":
    return partition_iid(labels, num_clients, seed)
  if kind == "dirichlet":
    return partition_dirichlet(
      labels, num_clients, alpha, seed, min_size=min_size, max_retries=max_retries
    )
  if kind == "client_dirichlet":
    return partition_client_dirichlet(
      labels, num_clients, alpha, seed, size_sigma=size_sigma, min_size=min_size
    )
  if kind == "shards":
    return partition_shards(labels, num_clients, classes_per_client, seed)
  raise ValueError(f"unknown partition kind {kind!r}; expected one of {PARTITIONS}")


def label_histogram(parts: Sequence[np.ndarray], labels, num_classes: int) -> np.ndarray:
  """int64 [clients, num_classes]: how many examples of each class each client holds."""
  labels = np.asarray(labels)
  num_classes = check_int(num_classes, "num_classes", 1)
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f"labels must be < num_classes={num_classes}, found {labels.max()}")
  return np.stack(
    [np.bincount(labels[np.asarray(p, np.int64)], minlength=num_classes) for p in parts]
  ).astype(np.int64)
