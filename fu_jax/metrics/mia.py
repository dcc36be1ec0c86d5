"""Membership inference on forgotten training samples (docs/design.md §6).

Members are the forgotten training samples, non-members held-out samples of the same classes
(e.g. their test samples). After a perfect unlearning the model treats the two alike, so every
score below should match Retrain's value (about chance: AUC 0.5, attack accuracy 0.5,
shadow recall equal to the non-member rate).

Three attackers, weakest to strongest:
  loss_threshold_auc       ROC AUC of the score -loss (Yeom et al. 2018).
  trained_attack_accuracy  logistic regression on log-loss, stratified k-fold CV accuracy.
  shadow_attack            shadow models trained with the target's recipe on random halves
                           of a shadow pool; a classifier on their sorted output vectors
                           (Shokri et al. 2017; Salem et al. 2019 "ML-Leaks") is applied to the
                           target model.
The trained attacker balances members and non-members by deterministic subsampling of the
larger side, so its chance accuracy is 0.5; the AUC needs no balancing (it does not depend on
the two sides' proportions, and subsampling would only add variance); the shadow attack
reports its two rates separately.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fu_jax.metrics.accuracy import log_softmax64, per_example_loss, predict_logits

# sklearn is imported inside the functions that use it: it takes seconds to import, and
# `import fu_jax.metrics` (evaluate, backdoor) should not pay for it.

_LOG_FLOOR = np.log(1e-300)  # losses below exp(-745) are exactly 0 even in float64


def _as_losses(v, name: str) -> np.ndarray:
  v = np.asarray(v, np.float64).reshape(-1)
  if v.size == 0:
    raise ValueError(f"{name} is empty; membership inference needs at least one sample")
  return v


def balance(a, b, *, seed: int):
  """Subsample the larger of a, b (rows, without replacement) to the smaller's size.

  Deterministic in `seed`; row order of the subsample follows the original order.
  """
  a, b = np.asarray(a), np.asarray(b)
  n = min(len(a), len(b))
  rng = np.random.default_rng(seed)

  def take(v):
    return v if len(v) == n else v[np.sort(rng.choice(len(v), n, replace=False))]

  return take(a), take(b)


def loss_threshold_auc(member_losses, nonmember_losses) -> float:
  """ROC AUC of -loss as a membership score, over all members and non-members.

  AUC = P(loss_member < loss_nonmember) + 0.5 P(equal) over random pairs. 1 = every member
  has a lower loss than every non-member; 0.5 = indistinguishable. nan if any loss is not
  finite (a diverged model).
  """
  m = _as_losses(member_losses, "member_losses")
  o = _as_losses(nonmember_losses, "nonmember_losses")
  if not (np.all(np.isfinite(m)) and np.all(np.isfinite(o))):
    return float("nan")
  from sklearn import metrics

  labels = np.concatenate([np.ones_like(m), np.zeros_like(o)])
  return float(metrics.roc_auc_score(labels, -np.concatenate([m, o])))


def trained_attack_accuracy(member_losses, nonmember_losses, *, seed: int, folds: int = 5) -> float:
  """Mean stratified k-fold CV accuracy of logistic regression on log(loss).

  The log spreads out the tiny losses of memorised samples, where the member / non-member
  boundary lies. Sides are balanced first, so chance is 0.5. `folds` is lowered to the
  per-side count when a side is smaller (needs >= 2 samples per side). nan if any loss is
  not finite.
  """
  from sklearn import linear_model, model_selection, pipeline, preprocessing

  m = _as_losses(member_losses, "member_losses")
  o = _as_losses(nonmember_losses, "nonmember_losses")
  if folds < 2:
    raise ValueError(f"folds must be >= 2, got {folds}")
  if not (np.all(np.isfinite(m)) and np.all(np.isfinite(o))):
    return float("nan")
  m, o = balance(m, o, seed=seed)
  if len(m) < 2:
    raise ValueError(f"need >= 2 samples per side for cross-validation, got {len(m)}")
  feats = np.log(np.maximum(np.concatenate([m, o]), 1e-300))[:, None]
  labels = np.concatenate([np.ones(len(m), np.int64), np.zeros(len(o), np.int64)])
  clf = pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression())
  cv = model_selection.StratifiedKFold(n_splits=min(folds, len(m)), shuffle=True, random_state=seed)
  return float(np.mean(model_selection.cross_val_score(clf, feats, labels, cv=cv)))


def membership_inference(
  apply_fn: Callable,
  params,
  member_x,
  member_y,
  nonmember_x,
  nonmember_y,
  *,
  seed: int,
  folds: int = 5,
  batch_size: int = 1024,
) -> dict:
  """Loss-threshold AUC and trained-attack accuracy of the model on members vs non-members.

  Returns {'mia_auc': float, 'mia_attack_acc': float}.
  """
  lm = per_example_loss(apply_fn, params, member_x, member_y, batch_size=batch_size)
  lo = per_example_loss(apply_fn, params, nonmember_x, nonmember_y, batch_size=batch_size)
  return {
    "mia_auc": loss_threshold_auc(lm, lo),
    "mia_attack_acc": trained_attack_accuracy(lm, lo, seed=seed, folds=folds),
  }


def sorted_log_softmax(logits, y=None, *, top_k: int | None = None) -> np.ndarray:
  """Attack features: the top_k log-softmax values in descending order [n, top_k].

  Log-probabilities carry the same information as the sorted softmax vector but keep the
  resolution that float32 probabilities lose near 1. With labels `y`, log p_y is appended as
  one more column (a cheap stand-in for Shokri et al.'s per-class attack models).
  """
  logp = log_softmax64(logits)
  k = logp.shape[-1] if top_k is None else top_k
  if not 1 <= k <= logp.shape[-1]:
    raise ValueError(f"top_k must be in [1, {logp.shape[-1]}], got {top_k}")
  feats = -np.sort(-logp, axis=-1)[:, :k]
  if y is not None:
    feats = np.concatenate(
      [feats, np.take_along_axis(logp, np.asarray(y, np.int64)[:, None], axis=-1)], axis=-1
    )
  return np.maximum(feats, _LOG_FLOOR)


def _attack_model(kind: str, seed: int):
  from sklearn import ensemble, linear_model, pipeline, preprocessing

  if kind == "gbdt":
    # Not HistGradientBoosting: its OpenMP threads were 2-10x slower on our shared 2-core CPUs.
    return ensemble.GradientBoostingClassifier(random_state=seed)
  if kind == "logreg":
    return pipeline.make_pipeline(
      preprocessing.StandardScaler(), linear_model.LogisticRegression(max_iter=1000)
    )
  raise ValueError(f"attack must be 'gbdt' or 'logreg', got {kind!r}")


def key_entropy(key) -> list[int]:
  """The raw uint32 words of a PRNG key (typed or legacy), to seed numpy / sklearn."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(v) for v in np.asarray(key, np.uint32).ravel()]


def shadow_split_masks(rng: np.random.Generator, num_shadows: int, n: int) -> np.ndarray:
  """bool [num_shadows, n]: shadow s trains on exactly n // 2 random pool rows ("in")."""
  masks = np.zeros((num_shadows, n), bool)
  for s in range(num_shadows):
    masks[s, rng.permutation(n)[: n // 2]] = True
  return masks


def shadow_attack(
  train_fn: Callable,
  apply_fn: Callable,
  target_params,
  shadow_x,
  shadow_y,
  target_member_x,
  target_member_y,
  target_nonmember_x,
  target_nonmember_y,
  *,
  num_shadows: int,
  key,
  top_k: int | None = None,
  use_label: bool = False,
  attack: str = "gbdt",
  vectorize: bool = False,
  holdout: float = 0.2,
  batch_size: int = 1024,
) -> dict:
  """Shadow-model membership attack (Shokri et al. 2017) on the target's forgotten samples.

  Each of `num_shadows` shadow models is trained by `train_fn(key, x, y, mask) -> params`
  (the target's recipe; rows with mask=False must not influence training) on a random half
  of the shadow pool (shadow_x, shadow_y); its other half is "out". Attack features are the
  sorted log-softmax (see `sorted_log_softmax`) of each shadow on its in and out rows; an
  attack classifier (`attack`: 'gbdt' gradient boosting or 'logreg', seeded from `key`) is fit
  on a stratified (1 - holdout) share of them and scored on the rest. It is then applied to
  the target model's features on the forgotten samples (members) and on held-out samples
  of the same classes (non-members).

  vectorize=True trains all shadows in one `jit(vmap(train_fn))` (train_fn must then be
  vmappable); otherwise they are trained in a Python loop.

  Returns {'mia_shadow_recall': fraction of members predicted member,
           'mia_shadow_nonmember_rate': fraction of non-members predicted member,
           'mia_shadow_attack_acc': attack accuracy on the held-out shadow records}.
  After a perfect unlearning, recall ~ nonmember_rate.
  """
  from sklearn import model_selection

  if num_shadows < 1:
    raise ValueError(f"num_shadows must be >= 1, got {num_shadows}")
  if not 0 < holdout < 1:
    raise ValueError(f"holdout must be in (0, 1), got {holdout}")
  shadow_x, shadow_y = np.asarray(shadow_x), np.asarray(shadow_y, np.int32)
  n = shadow_x.shape[0]
  if n < 4:
    raise ValueError(f"shadow pool needs >= 4 rows, got {n}")
  # Host-side randomness (splits, attack seed) from numpy seeded by the key: eager jax.random
  # calls would each compile a kernel, which costs seconds on CPU.
  keys = jax.random.split(key, num_shadows + 1)
  train_keys = keys[:num_shadows]
  rng = np.random.default_rng(key_entropy(keys[num_shadows]))
  masks = shadow_split_masks(rng, num_shadows, n)
  seed = int(rng.integers(2**31 - 1))

  if vectorize:
    stacked = jax.jit(jax.vmap(train_fn, in_axes=(0, None, None, 0)))(
      train_keys, shadow_x, shadow_y, masks
    )
    shadows = [jax.tree.map(lambda a, s=s: a[s], stacked) for s in range(num_shadows)]
  else:
    shadows = [train_fn(train_keys[s], shadow_x, shadow_y, masks[s]) for s in range(num_shadows)]

  def features(params, x, y):
    logits = predict_logits(apply_fn, params, x, batch_size=batch_size)
    return sorted_log_softmax(logits, y if use_label else None, top_k=top_k)

  feats, labels = [], []
  for params, mask in zip(shadows, masks):
    feats.append(features(params, shadow_x, shadow_y))
    labels.append(mask.astype(np.int64))
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  f_tr, f_te, l_tr, l_te = model_selection.train_test_split(
    feats, labels, test_size=holdout, stratify=labels, random_state=seed
  )
  clf = _attack_model(attack, seed).fit(f_tr, l_tr)

  member = clf.predict(features(target_params, target_member_x, target_member_y))
  nonmember = clf.predict(features(target_params, target_nonmember_x, target_nonmember_y))
  return {
    "mia_shadow_recall": float(np.mean(member == 1)),
    "mia_shadow_nonmember_rate": float(np.mean(nonmember == 1)),
    "mia_shadow_attack_acc": float(clf.score(f_te, l_te)),
  }
