"""Tests for fu_jax.metrics.audit: the NeurIPS'23 forget score and U-LiRA."""

import math

import numpy as np
import pytest

from fu_jax.metrics import audit as audit_lib

DELTA = audit_lib.DELTA


def test_logit_confidence_matches_float64_probabilities():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(7, 5)) * 3
  y = rng.integers(0, 5, 7)
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  py = p[np.arange(7), y]
  np.testing.assert_allclose(
    audit_lib.logit_confidence(z, y), np.log(py) - np.log1p(-py), rtol=1e-10
  )


def test_logit_confidence_stable_where_softmax_rounds_to_one():
  # p_y = 1 - e^-40 rounds to 1 in float64; phi = 40 exactly.
  z = np.array([[40.0, 0.0]])
  assert audit_lib.logit_confidence(z, np.array([0]))[0] == pytest.approx(40.0, abs=1e-12)
  assert audit_lib.logit_confidence(z, np.array([1]))[0] == pytest.approx(-40.0, abs=1e-12)
  huge = np.array([[1e6, 0.0]])  # clipped to the competition's 1e-45 floor
  assert audit_lib.logit_confidence(huge, np.array([0]))[0] == pytest.approx(45 * math.log(10))


def test_rule_epsilons_formula_and_special_cases():
  eps = audit_lib.rule_epsilons([0.25, 0.5, 0.0, 0.0, 0.3, 1.0], [0.25, 0.25, 0.0, 0.2, 0.0, 1.0])
  assert eps[0] == pytest.approx(math.log(0.75 - DELTA) - math.log(0.25), abs=1e-14)
  assert eps[1] == pytest.approx(
    max(math.log(0.5 - DELTA) - math.log(0.25), math.log(0.75 - DELTA) - math.log(0.5)), abs=1e-14
  )
  assert eps[2] == np.inf  # perfect separation
  assert np.isnan(eps[3]) and np.isnan(eps[4])  # one error rate zero: discarded
  assert np.isnan(eps[5])  # both logs undefined
  assert audit_lib.rule_epsilons([0.5], [0.5])[0] == 0.0  # a coin flip: clipped to 0


def test_example_epsilon_hand_computed():
  # Unlearned {0,1,2,3}, retrained {2,3,4,5} (retrained positive: larger median). The best
  # rule, e.g. 'phi >= 2.5' or the interval [0, 2.5], errs on one model of each side:
  # FPR = FNR = 1/4; any rule with both errors nonzero does no better; rules with one error
  # zero are discarded. eps = log(3/4 - delta) - log(1/4).
  expect = math.log(0.75 - DELTA) - math.log(0.25)
  assert audit_lib.example_epsilon([0, 1, 2, 3], [2, 3, 4, 5]) == pytest.approx(expect, abs=1e-12)
  assert audit_lib.example_epsilon([2, 3, 4, 5], [0, 1, 2, 3]) == pytest.approx(expect, abs=1e-12)
  assert audit_lib.example_epsilon([0, 1, 2, 3], [0, 1, 2, 3]) == 0.0
  assert audit_lib.example_epsilon([0, 1, 2, 3], [10, 11, 12, 13]) == audit_lib.EPSILON_CAP
  # Degenerate: one side (nearly) constant -> the cap; both constant and equal -> 0.
  assert audit_lib.example_epsilon([1, 1, 1, 1], [0, 1, 2, 3]) == audit_lib.EPSILON_CAP
  assert audit_lib.example_epsilon([0, 1, 2, 3], [1, 1.001, 1, 1]) == audit_lib.EPSILON_CAP
  assert audit_lib.example_epsilon([1, 1, 1], [1, 1, 1]) == 0.0
  assert audit_lib.example_epsilon([1, 1, 1], [2, 2, 2]) == audit_lib.EPSILON_CAP


def test_buckets_and_forget_score():
  # K = 16: ceil(log 15) = 3 -> six buckets [0,.5) ... [2.5,3) worth 1, 1/2, ..., 1/32.
  np.testing.assert_allclose(audit_lib.bucket_points(16), 0.5 ** np.arange(6))
  assert audit_lib.bucket_points(2).size == 0  # log(1) = 0: no bucket, F = 0 always
  eps = [0.2, 0.7, 2.9, 3.0, 50.0]
  assert audit_lib.forget_score(eps, 16) == pytest.approx((1 + 0.5 + 1 / 32) / 5)
  assert audit_lib.forget_score(np.zeros(9), 16) == 1.0
  assert audit_lib.final_score(
    0.5,
    retain_unlearned=[0.9, 0.7],
    retain_retrained=[1.0],
    test_unlearned=[0.5],
    test_retrained=[0.25],
  ) == pytest.approx(0.8)


def test_constant_identical_statistics_give_the_maximum():
  u = np.ones((16, 5)) * np.arange(5)
  out = audit_lib.audit(u, u.copy())
  assert out["forget_score"] == 1.0


@pytest.mark.slow
def test_identical_vs_separated_distributions():
  rng = np.random.default_rng(0)
  k, n = 16, 40
  r = rng.normal(size=(k, n))
  same = audit_lib.audit(rng.normal(size=(k, n)), r)
  apart = audit_lib.audit(rng.normal(size=(k, n)) + 6.0, r)
  # Identical: U-LiRA at chance; F is the estimator's noise floor (the max over ~160k
  # rules picks up sampling noise of 16 + 16 draws), far above the separated case's 0.
  assert abs(same["ulira_auc"] - 0.5) < 0.05
  assert same["forget_score"] > 0.1
  assert apart["forget_score"] == 0.0
  assert apart["ulira_auc"] > 0.99
  # 16 x 40 = 640 negatives: the TPR at 5% FPR (32 past the threshold), not at 1% (6.4).
  assert apart["ulira_tpr_at_5pct_fpr"] > 0.9
  assert apart["ulira_tpr_at_1pct_fpr"] is None and apart["ulira_tpr_at_01pct_fpr"] is None
  assert np.all(np.asarray(apart["epsilons"]) == audit_lib.EPSILON_CAP)
  # F decreases as the shift grows.
  fs = [audit_lib.audit(rng.normal(size=(k, n)) + s, r)["forget_score"] for s in (0.0, 1.0, 2.0)]
  assert fs[0] > fs[1] > fs[2]


def test_ulira_leave_one_out_matches_a_loop():
  rng = np.random.default_rng(1)
  u, r = rng.normal(size=(5, 3)) + 0.5, rng.normal(size=(4, 3))
  scores, labels = audit_lib.ulira_scores(u, r)
  allm = np.concatenate([u, r])

  def logn(x, a):
    mu, var = a.mean(), a.var(ddof=1)
    return -0.5 * (math.log(2 * math.pi * var) + (x - mu) ** 2 / var)

  for m in range(9):
    for i in range(3):
      side_u = [j for j in range(5) if j != m]
      side_r = [j for j in range(5, 9) if j != m]
      expect = logn(allm[m, i], allm[side_u, i]) - logn(allm[m, i], allm[side_r, i])
      assert scores[m, i] == pytest.approx(expect, rel=1e-9, abs=1e-9)
  assert labels.tolist() == [True] * 5 + [False] * 4


def test_roc_helpers_against_brute_force():
  rng = np.random.default_rng(2)
  s = np.round(rng.normal(size=60), 1)  # ties
  y = rng.random(60) < 0.4
  pos, neg = s[y], s[~y]
  brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
  assert audit_lib.roc_auc(s, y) == pytest.approx(brute)
  for fpr in (0.0, 0.05, 0.3):
    best = 0.0
    for t in np.r_[s, np.inf]:
      if np.mean(neg >= t) <= fpr:
        best = max(best, np.mean(pos >= t))
    assert audit_lib.tpr_at_fpr(s, y, fpr) == pytest.approx(best)


def test_bad_inputs():
  with pytest.raises(ValueError, match="models per side"):
    audit_lib.audit(np.zeros((1, 3)), np.zeros((1, 3)))
  with pytest.raises(ValueError, match="NaN"):
    audit_lib.audit(np.full((4, 2), np.nan), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="same number of examples"):
    audit_lib.audit(np.zeros((4, 2)), np.zeros((4, 3)))


def test_tpr_reported_only_at_fprs_the_negatives_support():
  # K = 16 retrained models x 20 samples = 320 negatives: 1% FPR is 3.2 negatives past the
  # threshold (< 10): not reported; 0.1% neither (it would be the TPR at FPR 0); 5% is 16.
  rng = np.random.default_rng(3)
  out = audit_lib.ulira(rng.normal(size=(16, 20)) + 1.0, rng.normal(size=(16, 20)))
  assert out["ulira_num_negatives"] == 320
  assert out["ulira_tpr_at_1pct_fpr"] is None and out["ulira_tpr_at_01pct_fpr"] is None
  assert 0.0 <= out["ulira_tpr_at_5pct_fpr"] <= 1.0
  assert audit_lib.fpr_supported(1000, 0.01) and not audit_lib.fpr_supported(999, 0.01)
  assert audit_lib.fpr_supported(10000, 0.001) and not audit_lib.fpr_supported(9999, 0.001)
  # 2000 negatives 0, 1, ..., 1999: 1% FPR allows the 20 largest (1980..1999) at or above
  # the threshold, which sits just above the 21st largest, 1979. Positives above it: 1990,
  # 1985, 1979.5 of five -> TPR 0.6.
  pos = np.array([1990.0, 1985.0, 1979.5, 1979.0, 100.0])
  s = np.r_[pos, np.arange(2000.0)]
  y = np.r_[np.ones(5, bool), np.zeros(2000, bool)]
  assert audit_lib.supported_tpr(s, y, 0.01) == pytest.approx(0.6)
  assert audit_lib.supported_tpr(s, y, 0.001) is None  # 2 negatives past
  # And through ulira: 20 models x 100 samples = 2000 negatives report the 1% TPR.
  u, r = rng.normal(size=(20, 100)) + 0.5, rng.normal(size=(20, 100))
  out = audit_lib.ulira(u, r)
  scores, labels = audit_lib.ulira_scores(u, r)
  lab = np.broadcast_to(labels[:, None], scores.shape)
  assert out["ulira_tpr_at_1pct_fpr"] == audit_lib.tpr_at_fpr(scores, lab, 0.01)
  assert out["ulira_tpr_at_01pct_fpr"] is None


def test_bootstrap_auc_recomputes_the_fits_on_the_resampled_bank():
  rng = np.random.default_rng(4)
  u, r = np.round(rng.normal(size=(4, 5)) + 0.3, 1), np.round(rng.normal(size=(5, 5)), 1)
  ones = audit_lib.Draws(np.ones((1, 4), int), np.ones((1, 5), int), np.ones((1, 5), int))
  assert audit_lib.ulira_auc_replicates(u, r, ones)[0] == audit_lib.ulira(u, r)["ulira_auc"]
  draws = audit_lib.bootstrap_draws(4, 5, 5, 3, seed=1)
  reps = audit_lib.ulira_auc_replicates(u, r, draws)
  floor = max(1e-12, 1e-6 * float(np.var(np.concatenate([u, r]))))

  def logn(x, a):
    var = max(a.var(ddof=1), floor) if a.size > 1 else floor
    return -0.5 * (math.log(2 * math.pi * var) + (x - a.mean()) ** 2 / var)

  for b in range(3):  # a loop over the materialised multiset, every copy of a model left out
    iu = np.repeat(np.arange(4), draws.unlearned[b])
    ir = np.repeat(np.arange(5), draws.retrained[b])
    cols = np.repeat(np.arange(5), draws.examples[b])
    pos = [logn(u[m, i], u[iu[iu != m], i]) - logn(u[m, i], r[ir, i]) for m in iu for i in cols]
    neg = [logn(r[m, i], u[iu, i]) - logn(r[m, i], r[ir[ir != m], i]) for m in ir for i in cols]
    p, n = np.array(pos)[:, None], np.array(neg)[None, :]
    assert reps[b] == pytest.approx(np.mean((p > n) + 0.5 * (p == n)), abs=1e-12)


def test_bootstrap_redraws_sides_with_fewer_than_three_distinct_models():
  # K = 4: a third of a side's draws have <= 2 distinct models, and their leave-one-out
  # fits (copies of one model: variance 0) would score at the floor (AUC near 0 or 1).
  d = audit_lib.bootstrap_draws(4, 4, 20, 500, seed=0)
  for c in (d.unlearned, d.retrained):
    assert np.all((c > 0).sum(1) >= 3) and np.all(c.sum(1) == 4)
  assert np.all(d.examples.sum(1) == 20) and (d.examples == 0).any()
  rng = np.random.default_rng(8)
  u, r = rng.normal(size=(4, 20)), rng.normal(size=(4, 20))
  lo, hi = audit_lib.percentile_interval(audit_lib.ulira_auc_replicates(u, r, d))
  assert 0.2 < lo <= audit_lib.ulira(u, r)["ulira_auc"] <= hi < 0.8


def _ci_width(ci):
  return ci[1] - ci[0]


def test_intervals_contain_the_estimate_and_shrink_with_more_samples():
  rng = np.random.default_rng(5)
  k = 8
  widths = []
  for n in (10, 80):
    out = audit_lib.audit(rng.normal(size=(k, n)) + 0.7, rng.normal(size=(k, n)), bootstrap=300)
    lo, hi = out["ulira_auc_ci"]
    assert lo <= out["ulira_auc"] <= hi
    lo_f, hi_f = out["f_ci"]
    assert lo_f <= out["forget_score"] <= hi_f
    widths.append((_ci_width(out["ulira_auc_ci"]), _ci_width(out["f_ci"])))
  assert widths[1][0] < 0.7 * widths[0][0] and widths[1][1] < 0.7 * widths[0][1]


def test_intervals_are_deterministic_for_a_seed():
  rng = np.random.default_rng(6)
  u, r = rng.normal(size=(6, 12)) + 0.5, rng.normal(size=(6, 12))
  a = audit_lib.audit(u, r, seed=7, bootstrap=200)
  b = audit_lib.audit(u, r, seed=7, bootstrap=200)
  c = audit_lib.audit(u, r, seed=8, bootstrap=200)
  assert a["ulira_auc_ci"] == b["ulira_auc_ci"] and a["f_ci"] == b["f_ci"]
  assert a["ulira_auc_ci"] != c["ulira_auc_ci"]
  assert a["bootstrap"]["seed"] == 7 and a["bootstrap"]["replicates"] == 200
  none = audit_lib.audit(u, r, bootstrap=0)
  assert none["ulira_auc_ci"] is None and none["f_ci"] is None


def test_auc_interval_covers_chance_for_identical_distributions():
  rng = np.random.default_rng(7)
  covered = 0
  for rep in range(20):
    u, r = rng.normal(size=(8, 10)), rng.normal(size=(8, 10))
    draws = audit_lib.bootstrap_draws(8, 8, 10, 200, seed=rep)
    lo, hi = audit_lib.percentile_interval(audit_lib.ulira_auc_replicates(u, r, draws))
    covered += lo <= 0.5 <= hi
  assert covered >= 17  # a 95% interval: most repetitions (binomial: >= 17 of 20 w.p. 0.98)
