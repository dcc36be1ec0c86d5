"""Per-example privacy audit of unlearning: the NeurIPS'23 forget score and U-LiRA.

Inputs are, for every forgotten sample i, its statistic under K unlearned models and under
K retrained-from-scratch models (arrays [K, n]). The statistic is the logit-scaled
confidence of the true label (LiRA's, Carlini et al. 2022):

    phi(x, y) = log p_y - log(1 - p_y) = z_y - log sum_{j != y} exp(z_j)

computed from the logits z without forming p (so a memorised sample keeps its value where
float32 p_y rounds to 1).

NeurIPS 2023 machine-unlearning competition (Triantafillou et al. 2024, "Are we making
progress in unlearning? Findings from the first NeurIPS unlearning competition"; the
published metric code), per example:
  * positive = the side (retrained or unlearned) whose median statistic is larger;
  * two families of decision rules over the 2K samples, on a grid of 100 thresholds per unit:
    single threshold ("positive iff phi >= t", t spanning the pooled range) and double
    threshold ("positive iff l <= phi <= r" with the peakier -- smaller range -- side as
    positive; r from min_p + w - 2 to max_p + 2, w = its range, l in [r - w - 2, r - w + 2]);
  * each rule's (FPR, FNR) gives
        eps = max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR), >= 0,
    with delta = 1e-5; a rule with FPR = FNR = 0 (perfect separation) gives eps = inf; a rule
    with exactly one of FPR, FNR zero is discarded (too few samples to estimate it);
  * the example's epsilon is the max over kept rules, clipped to [0, 50];
  * degenerate distributions: when the smaller of the two ranges is below 1% of the larger
    (one side nearly constant), epsilon = 50 (the cap) without looking at rules.
    Not covered by the competition code, ours: both sides constant and equal -> 0 (they are
    the same distribution; the published code fails an assertion), constant and different
    -> 50 (perfectly separated); no rule kept -> 0 (no rule has both errors estimable).
  Bucketing: with K models per side, epsilons are scored in buckets of width 0.5 starting at
  0, as many as fit below ceil(log(K - 1)); bucket b is worth 2^-b points and an epsilon past
  the last bucket 0. F = mean points over the forgotten samples: 1 is its maximum, reached
  when every epsilon is below 0.5. Final score = F x (mean unlearned retain acc / mean
  retrained retain acc) x (same for test acc), the ratios uncapped as in the competition.
  The competition floors both probabilities at 1e-45 before taking logs, which bounds phi by
  45 log(10) ~ 103.6; `logit_confidence` clips to the same bound (it also keeps the number of
  thresholds, proportional to the range, finite).

U-LiRA (Hayes et al., "Inexact unlearning needs more careful evaluations to avoid a false
sense of privacy", SaTML 2025): a per-example likelihood-ratio test of "this model unlearned
x" against "this model was retrained without x": fit N(mu_u, s_u^2) and N(mu_r, s_r^2) to the
example's statistic under unlearned and retrained models and score a model's phi by
    log N(phi; mu_u, s_u^2) - log N(phi; mu_r, s_r^2).
Hayes et al. fit on shadow models and attack disjoint target models. With one bank of K + K
models we cross-fit by leave-one-out: each model is scored with Gaussians fitted to the
other 2K - 1 (its own side minus itself), so no model is scored by a fit that saw it. (LOO
leaves a slight bias toward the other side -- its own side's mean is estimated without it --
so with identical distributions the AUC sits marginally under 0.5: conservative.) Scores of
all (model, example) pairs are pooled into one ROC (unlearned = positive): AUC and the TPR at
5%, 1% and 0.1% FPR. Variances get a floor (1e-6 of the pooled variance, at least 1e-12) so a
constant side does not divide by zero.

What the sample size supports (ours). A TPR at FPR f is reported only when the ROC's
negatives (K_r x n retrained (model, example) pairs) put at least MIN_NEGATIVES_PAST = 10 of
them past the threshold: n_neg * f >= 10; otherwise it is None. Below that the threshold sits
at one of the few largest negatives, and with n_neg * f < 1 (e.g. 0.1% of 320) the "TPR at
0.1% FPR" is the TPR at FPR 0, set by the single largest negative. So 320 negatives (K = 16,
20 samples) report the TPR at 5% FPR (16 negatives past) but not at 1% (3.2) or 0.1% (0.32);
1% needs >= 1000 negatives, 0.1% >= 10000.

Intervals (ours): percentile bootstraps, two-way (models and samples) for U-LiRA. Replicate b
draws K_u unlearned models, K_r retrained models (each side resampled within itself) and n
forgotten samples, all with replacement, and recomputes the statistic on that bank:
  * U-LiRA AUC: the Gaussian fits are refitted on the resampled models (frequency-weighted
    mean and variance of the multiset), each drawn model scored leave-one-out with every
    copy of itself left out (a copy is the same model: a fit that saw it would leak; a
    side drawn with fewer than 3 distinct models is drawn again, bootstrap_draws), and
    the pooled ROC weights each (model, example) score by its model's times its example's
    multiplicity. Vectorised over replicates (B = 1000 by default). A two-way bootstrap
    counts the model-by-sample noise twice, so it errs wide: with identical synthetic
    distributions (K = 8 and 16) the interval covered 0.5 in 40 of 40 repetitions.
  * F: over the forgotten samples only, the models fixed: F is the mean of per-example
    points, so replicate b is the multiplicity-weighted mean of the same points (vectorised,
    B = 1000). Resampling the models too does not work for F: an epsilon is a max over
    ~160k rules, and on a multiset with duplicated models it comes out larger (fewer distinct
    values, emptier tails), so F's replicates sit below F -- on N(0,1) against N(0,1), K = 16,
    n = 20, F = 0.200 and the two-way percentile interval was [0.084, 0.183], excluding it.
    F's interval therefore leaves out the model-to-model variability shared by the samples
    (each epsilon's own noise from its K + K models is in the per-example points).
The interval is the 2.5th and 97.5th percentiles of the replicates. The draws come from
np.random.default_rng(seed): the same seed gives the same interval. It describes the
sampling variability of this audit (which K + K models, which forgotten samples); it is not a
test of "indistinguishable from retraining": read a method's interval against retrain's own
row (retrain's bank against an independent retrain bank, the null).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
BUFFER = 2.0  # the double-threshold rule's search margin (competition's value)
DEGENERATE_RATIO = 0.01
CONF_BOUND = 45 * math.log(10)  # log(1 / 1e-45): the competition's effective bound on phi


def logit_confidence(logits, y) -> np.ndarray:
  """phi = z_y - logsumexp_{j != y} z_j = log p_y - log(1 - p_y), float64 [..., n].

  logits [..., n, C], y int [n] (or broadcastable to logits[..., 0]); clipped to +-103.6.
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(y)
  if z.ndim < 2:
    raise ValueError(f"logits must be [..., n, C], got shape {z.shape}")
  y = np.broadcast_to(y, z.shape[:-1])
  zy = np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
  others = z.copy()
  np.put_along_axis(others, y[..., None], -np.inf, axis=-1)
  m = np.max(others, axis=-1, keepdims=True)
  lse = m[..., 0] + np.log(np.sum(np.exp(others - m), axis=-1))
  return np.clip(zy - lse, -CONF_BOUND, CONF_BOUND)


def _check_pair(unlearned, retrained):
  u = np.asarray(unlearned, np.float64)
  r = np.asarray(retrained, np.float64)
  u = u[:, None] if u.ndim == 1 else u
  r = r[:, None] if r.ndim == 1 else r
  if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
    raise ValueError(
      f"expected [models, examples] arrays with the same number of examples, "
      f"got {u.shape} and {r.shape}"
    )
  if u.shape[1] == 0:
    raise ValueError("no forgotten example to audit")
  if min(u.shape[0], r.shape[0]) < 2:
    raise ValueError(
      f"need >= 2 models per side, got {u.shape[0]} unlearned and {r.shape[0]} retrained"
    )
  if not (np.all(np.isfinite(u)) and np.all(np.isfinite(r))):
    raise ValueError("the statistics contain NaN or inf (a diverged model?)")
  return u, r


def rule_epsilons(fpr, fnr, delta: float = DELTA) -> np.ndarray:
  """Epsilon of each decision rule from its error rates (nan = rule discarded).

  fpr = fnr = 0 -> inf; exactly one of them 0 -> nan; otherwise
  max(log(1 - delta - fpr) - log fnr, log(1 - delta - fnr) - log fpr) clipped below at 0
  (nan when both logs are of negative numbers, i.e. fpr and fnr both > 1 - delta).
  """
  fpr = np.asarray(fpr, np.float64)
  fnr = np.asarray(fnr, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    e1 = np.log(1.0 - delta - fpr) - np.log(fnr)
    e2 = np.log(1.0 - delta - fnr) - np.log(fpr)
    both_nan = np.isnan(e1) & np.isnan(e2)
    eps = np.where(both_nan, np.nan, np.maximum(0.0, np.fmax(e1, e2)))
  eps = np.where((fpr == 0) ^ (fnr == 0), np.nan, eps)
  return np.where((fpr == 0) & (fnr == 0), np.inf, eps)


def _count_in(sorted_v, lo, hi):
  """#{v : lo <= v <= hi} for each (lo, hi) (0 where lo > hi)."""
  n = np.searchsorted(sorted_v, hi, side="right") - np.searchsorted(sorted_v, lo, side="left")
  return np.maximum(n, 0)


def _single_rates(pos, neg):
  """(fpr, fnr) of 'positive iff phi >= t' over the competition's grid of t."""
  both = np.concatenate([pos, neg])
  lo, hi = both.min(), both.max()
  t = np.linspace(lo, hi, int(math.ceil((hi - lo) * THRESHOLDS_PER_UNIT)))
  tpr = (pos.size - np.searchsorted(np.sort(pos), t, side="left")) / pos.size
  fpr = (neg.size - np.searchsorted(np.sort(neg), t, side="left")) / neg.size
  return fpr, 1.0 - tpr


def _double_rates(pos, neg):
  """(fpr, fnr) of 'positive iff l <= phi <= r', the peakier side positive."""
  if np.ptp(pos) >= np.ptp(neg):
    pos, neg = neg, pos
  width = np.ptp(pos)
  lo, hi = pos.min() + width - BUFFER, pos.max() + BUFFER
  right = np.linspace(lo, hi, int(math.ceil((hi - lo) * THRESHOLDS_PER_UNIT)))
  n_left = int(math.ceil(2 * BUFFER * THRESHOLDS_PER_UNIT))
  offsets = np.linspace(-width - BUFFER, -width + BUFFER, n_left)
  r = np.repeat(right, n_left)
  l = (right[:, None] + offsets[None, :]).reshape(-1)
  tpr = _count_in(np.sort(pos), l, r) / pos.size
  fpr = _count_in(np.sort(neg), l, r) / neg.size
  return fpr, 1.0 - tpr


def example_epsilon(unlearned, retrained, delta: float = DELTA) -> float:
  """The competition's epsilon of one example from its statistic under each model.

  unlearned [K_u], retrained [K_r]: one value per model. See the module docstring.
  """
  u = np.asarray(unlearned, np.float64).reshape(-1)
  r = np.asarray(retrained, np.float64).reshape(-1)
  pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
  largest, smallest = max(np.ptp(pos), np.ptp(neg)), min(np.ptp(pos), np.ptp(neg))
  if largest == 0:
    return 0.0 if pos[0] == neg[0] else EPSILON_CAP
  if smallest / largest < DEGENERATE_RATIO:
    return EPSILON_CAP
  rates = [_double_rates(pos, neg), _single_rates(pos, neg)]
  fpr = np.concatenate([f for f, _ in rates])
  fnr = np.concatenate([f for _, f in rates])
  eps = rule_epsilons(fpr, fnr, delta)
  if np.all(np.isnan(eps)):
    return 0.0
  return float(np.clip(np.nanmax(eps), 0.0, EPSILON_CAP))


def epsilons(unlearned, retrained, delta: float = DELTA) -> np.ndarray:
  """Per-example epsilons [n] from statistics [K_u, n] and [K_r, n]."""
  u, r = _check_pair(unlearned, retrained)
  return np.array([example_epsilon(u[:, i], r[:, i], delta) for i in range(u.shape[1])])


def bucket_points(num_models: int) -> np.ndarray:
  """Points of the buckets [0, .5), [.5, 1), ...: 1, 1/2, 1/4, ... up to ceil(log(K - 1))."""
  if num_models < 2:
    raise ValueError(f"num_models={num_models}: the forget score needs >= 2 models per side")
  max_eps = math.ceil(math.log(num_models - 1)) if num_models > 2 else 0
  n = int(max_eps / 0.5 + 1e-9)
  return 0.5 ** np.arange(n)


def forget_score(eps, num_models: int) -> float:
  """F: mean bucket points of the epsilons (1 = every epsilon below 0.5)."""
  eps = np.asarray(eps, np.float64).reshape(-1)
  if eps.size == 0:
    raise ValueError("no epsilon to score")
  points = bucket_points(num_models)
  b = np.floor(eps / 0.5).astype(np.int64)
  return float(np.mean(np.where(b < points.size, points[np.minimum(b, points.size - 1)], 0.0)))


def final_score(
  forget: float, *, retain_unlearned, retain_retrained, test_unlearned, test_retrained
) -> float:
  """F x (mean unlearned / mean retrained retain acc) x (same for test acc)."""
  ratio = lambda a, b: float(np.mean(a)) / float(np.mean(b))
  return float(
    forget * ratio(retain_unlearned, retain_retrained) * ratio(test_unlearned, test_retrained)
  )


# ---------------------------------------------------------------------------------------
# U-LiRA.


def _log_normal(x, mu, var):
  return -0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)


def ulira_scores(unlearned, retrained):
  """Leave-one-out U-LiRA log likelihood ratios.

  Returns (scores [K_u + K_r, n], labels [K_u + K_r] with 1 = unlearned): each model's
  log N(phi; unlearned fit) - log N(phi; retrained fit), the fits excluding that model.
  """
  u, r = _check_pair(unlearned, retrained)
  if min(u.shape[0], r.shape[0]) < 3:
    raise ValueError("U-LiRA's leave-one-out fit needs >= 3 models per side")
  floor = max(1e-12, 1e-6 * float(np.var(np.concatenate([u, r]))))

  def loo(a):  # mean and variance of each row's side without that row: [K, n]
    k = a.shape[0]
    s, s2 = a.sum(0), (a**2).sum(0)
    mu = (s - a) / (k - 1)
    var = ((s2 - a**2) - (k - 1) * mu**2) / (k - 2)
    return mu, np.maximum(var, floor)

  def full(a):
    return a.mean(0), np.maximum(a.var(0, ddof=1), floor)

  mu_u_loo, var_u_loo = loo(u)
  mu_r_loo, var_r_loo = loo(r)
  mu_u, var_u = full(u)
  mu_r, var_r = full(r)
  s_u = _log_normal(u, mu_u_loo, var_u_loo) - _log_normal(u, mu_r, var_r)
  s_r = _log_normal(r, mu_u, var_u) - _log_normal(r, mu_r_loo, var_r_loo)
  labels = np.concatenate([np.ones(u.shape[0], bool), np.zeros(r.shape[0], bool)])
  return np.concatenate([s_u, s_r]), labels


def roc_auc(scores, labels) -> float:
  """P(score_pos > score_neg) + 0.5 P(equal) (Mann-Whitney, ties averaged)."""
  s = np.asarray(scores, np.float64).reshape(-1)
  y = np.asarray(labels, bool).reshape(-1)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError("the ROC needs both positives and negatives")
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(s.size)
  sorted_s = s[order]
  # Average ranks over ties.
  starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
  ends = np.r_[starts[1:], s.size]
  avg = (starts + ends - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(avg, ends - starts)
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tpr_at_fpr(scores, labels, fpr: float) -> float:
  """Largest TPR of a rule 'positive iff score >= t' whose FPR is <= fpr."""
  s = np.asarray(scores, np.float64).reshape(-1)
  y = np.asarray(labels, bool).reshape(-1)
  neg = np.sort(s[~y])[::-1]
  allowed = int(math.floor(fpr * neg.size + 1e-9))  # negatives allowed at or above t
  # t just above the (allowed+1)-th largest negative score.
  if allowed >= neg.size:
    return 1.0
  t = neg[allowed]
  return float(np.mean(s[y] > t))


MIN_NEGATIVES_PAST = 10  # negatives a reported TPR's threshold must have past it
TPR_FPRS = {
  0.05: "ulira_tpr_at_5pct_fpr",
  0.01: "ulira_tpr_at_1pct_fpr",
  0.001: "ulira_tpr_at_01pct_fpr",
}


def fpr_supported(num_negatives: int, fpr: float) -> bool:
  """Whether num_negatives support a TPR at this FPR: num_negatives * fpr >= 10."""
  return num_negatives * fpr >= MIN_NEGATIVES_PAST - 1e-9


def supported_tpr(scores, labels, fpr: float) -> float | None:
  """tpr_at_fpr where the negatives support it (fpr_supported), else None."""
  n_neg = int(np.sum(~np.asarray(labels, bool)))
  return tpr_at_fpr(scores, labels, fpr) if fpr_supported(n_neg, fpr) else None


def ulira(unlearned, retrained) -> dict:
  """U-LiRA AUC and the TPRs at 5% / 1% / 0.1% FPR (None where the negatives do not support
  them) over all (model, forgotten example) pairs."""
  scores, labels = ulira_scores(unlearned, retrained)
  lab = np.broadcast_to(labels[:, None], scores.shape)
  per_example = [roc_auc(scores[:, i], labels) for i in range(scores.shape[1])]
  out = {"ulira_auc": roc_auc(scores, lab), "ulira_num_negatives": int(np.sum(~lab))}
  out.update({key: supported_tpr(scores, lab, fpr) for fpr, key in TPR_FPRS.items()})
  out["ulira_example_auc"] = per_example
  return out


# ---------------------------------------------------------------------------------------
# Bootstrap intervals.

CI_LEVEL = 0.95
BOOTSTRAP = 1000  # replicates
_CHUNK = 100  # replicates vectorised at once (bounds memory)


class Draws(NamedTuple):
  """Multiplicities of a two-way bootstrap: [B, K_u], [B, K_r] models and [B, n] samples."""

  unlearned: np.ndarray
  retrained: np.ndarray
  examples: np.ndarray


MIN_DISTINCT_MODELS = 3  # per side in a replicate: each leave-one-out fit keeps 2 models


def bootstrap_draws(num_unlearned: int, num_retrained: int, num_examples: int, b: int, seed):
  """B replicates' multiplicities: each side's models and the examples drawn with replacement.

  A side drawn with fewer than MIN_DISTINCT_MODELS distinct models is drawn again (from the
  same generator: still deterministic): one of its models would be scored by a leave-one-out
  fit of copies of a single model, whose variance is 0 (the point estimate needs K >= 3 for
  the same reason). Negligible at K = 16; at K = 4 about a third of a side's draws."""
  rng = np.random.default_rng(seed)

  def draw(k, models):
    c = rng.multinomial(k, np.full(k, 1.0 / k), size=b)
    while models and k >= MIN_DISTINCT_MODELS:
      bad = np.flatnonzero((c > 0).sum(1) < MIN_DISTINCT_MODELS)
      if bad.size == 0:
        break
      c[bad] = rng.multinomial(k, np.full(k, 1.0 / k), size=bad.size)
    return c

  return Draws(draw(num_unlearned, True), draw(num_retrained, True), draw(num_examples, False))


def percentile_interval(values, level: float = CI_LEVEL) -> tuple:
  """(lo, hi): the (1 - level) / 2 and (1 + level) / 2 percentiles of the replicates."""
  a = 100 * (1 - level) / 2
  lo, hi = np.percentile(np.asarray(values, np.float64), [a, 100 - a])
  return float(lo), float(hi)


def _weighted_fits(a, c, floor):
  """Fits of each side with multiplicities c [B, K] over statistics a [K, n]: the full fit
  (mean, variance of the multiset) [B, 1, n] and each model's fit with all its copies left
  out [B, K, n]. Fewer than 2 other draws (possible only when one model is drawn K - 1 or K
  times) leave the variance at the floor."""
  c = c[:, :, None].astype(np.float64)
  tot = c.sum(1, keepdims=True)
  s1, s2 = (c * a).sum(1, keepdims=True), (c * a**2).sum(1, keepdims=True)

  def fit(n, m1, m2):
    mu = m1 / np.maximum(n, 1)
    var = (m2 - n * mu**2) / np.maximum(n - 1, 1)
    return mu, np.maximum(var, floor)

  return fit(tot, s1, s2), fit(tot - c, s1 - c * a, s2 - c * a**2)


def _weighted_auc(s, w, y):
  """Mann-Whitney AUC per row of scores s [B, N] with weights w [B, N], labels y [N]."""
  order = np.argsort(s, axis=1, kind="stable")
  s = np.take_along_axis(s, order, 1)
  w = np.take_along_axis(w, order, 1)
  pos = y[order]
  wn = np.where(pos, 0.0, w)
  wp = w - wn
  cneg = np.concatenate([np.zeros((s.shape[0], 1)), np.cumsum(wn, 1)], 1)
  idx = np.arange(s.shape[1])
  new = np.concatenate([np.ones((s.shape[0], 1), bool), s[:, 1:] != s[:, :-1]], 1)
  start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
  last = np.concatenate([s[:, 1:] != s[:, :-1], np.ones((s.shape[0], 1), bool)], 1)
  end = np.minimum.accumulate(np.where(last, idx, s.shape[1] - 1)[:, ::-1], axis=1)[:, ::-1]
  below = np.take_along_axis(cneg, start, 1)
  tied = np.take_along_axis(cneg, end + 1, 1) - below
  return (wp * (below + 0.5 * tied)).sum(1) / (wp.sum(1) * wn.sum(1))


def ulira_auc_replicates(unlearned, retrained, draws: Draws) -> np.ndarray:
  """The U-LiRA AUC recomputed on each replicate's resampled bank (module docstring) [B].

  With every multiplicity 1 it is ulira(...)["ulira_auc"] exactly."""
  u, r = _check_pair(unlearned, retrained)
  floor = max(1e-12, 1e-6 * float(np.var(np.concatenate([u, r]))))
  y = np.r_[np.ones(u.size, bool), np.zeros(r.size, bool)]
  out = []
  for i in range(0, draws.examples.shape[0], _CHUNK):
    cu, cr, cn = (d[i : i + _CHUNK] for d in draws)
    (mu_u, var_u), (mu_u_loo, var_u_loo) = _weighted_fits(u, cu, floor)
    (mu_r, var_r), (mu_r_loo, var_r_loo) = _weighted_fits(r, cr, floor)
    s_u = _log_normal(u, mu_u_loo, var_u_loo) - _log_normal(u, mu_r, var_r)
    s_r = _log_normal(r, mu_u, var_u) - _log_normal(r, mu_r_loo, var_r_loo)
    w_u = cu[:, :, None] * cn[:, None, :]
    w_r = cr[:, :, None] * cn[:, None, :]
    b = cn.shape[0]
    scores = np.concatenate([s_u.reshape(b, -1), s_r.reshape(b, -1)], 1)
    weights = np.concatenate([w_u.reshape(b, -1), w_r.reshape(b, -1)], 1).astype(np.float64)
    out.append(_weighted_auc(scores, weights, y))
  return np.concatenate(out)


def forget_score_replicates(eps, num_models: int, examples) -> np.ndarray:
  """F over resampled forgotten samples [B]: the points of per-example epsilons eps [n]
  weighted by each replicate's multiplicities examples [B, n] (the models fixed)."""
  eps = np.asarray(eps, np.float64).reshape(-1)
  points = bucket_points(num_models)
  b = np.floor(eps / 0.5).astype(np.int64)
  pts = np.where(b < points.size, points[np.minimum(b, points.size - 1)], 0.0)
  c = np.asarray(examples, np.float64)
  return c @ pts / c.sum(1)


def audit(unlearned, retrained, delta: float = DELTA, *, seed=0, bootstrap: int = BOOTSTRAP):
  """Forget score F, per-example epsilons and U-LiRA from statistics [K, n] per side, with
  95% bootstrap intervals (ulira_auc_ci: two-way; f_ci: over samples; [lo, hi]) from
  `bootstrap` replicates drawn from `seed` (0 replicates: both None)."""
  u, r = _check_pair(unlearned, retrained)
  eps = epsilons(u, r, delta)
  out = {
    "forget_score": forget_score(eps, u.shape[0]),
    "epsilons": eps.tolist(),
    "num_models": int(u.shape[0]),
    "num_examples": int(u.shape[1]),
  }
  out.update(ulira(u, r))
  out["ulira_auc_ci"] = out["f_ci"] = None
  if bootstrap > 0:
    draws = bootstrap_draws(u.shape[0], r.shape[0], u.shape[1], bootstrap, seed)
    out["ulira_auc_ci"] = list(percentile_interval(ulira_auc_replicates(u, r, draws)))
    out["f_ci"] = list(percentile_interval(forget_score_replicates(eps, u.shape[0], draws[2])))
  out["bootstrap"] = {
    "ulira_auc": "two-way percentile: models (within each side) and forgotten samples",
    "forget_score": "percentile over forgotten samples (models fixed)",
    "level": CI_LEVEL,
    "replicates": int(bootstrap),
    "seed": int(seed),
  }
  return out
