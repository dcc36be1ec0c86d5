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
  assert apart["ulira_tpr_at_1pct_fpr"] > 0.9
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
