"""Tests for the one-run audit statistics (dpalign.audit.bound)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from dpalign.audit.bound import (
    AuditBound,
    MembershipInference,
    epsilon_lower_bound,
    guess_candidates,
    guesses,
    membership_inference,
    one_run_bound,
    p_value,
)


def _q(eps: float) -> float:
    return math.exp(eps) / (1.0 + math.exp(eps))


def _pmf_exact(r: int, k: int, q: float) -> float:
    return math.comb(r, k) * q**k * (1.0 - q) ** (r - k)


def _p_reference(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Plain-Python p-value: exact binomial terms and a loop over i for the alpha term."""
    q = _q(eps)
    beta = sum(_pmf_exact(r, k, q) for k in range(v, r + 1))
    alpha = 0.0
    for i in range(1, v + 1):
        mass = sum(_pmf_exact(r, k, q) for k in range(v - i, v))
        alpha = max(alpha, mass / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def _closed_form_all_correct(r: int, level: float) -> float:
    q = level ** (1.0 / r)
    return math.log(q / (1.0 - q))


# --- p_value -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "v", "eps"),
    [(10, 7, 0.0), (20, 15, 0.5), (50, 50, 2.0), (30, 0, 1.0), (100, 90, 1.63), (7, 3, 3.0)],
)
def test_p_value_delta0_is_binomial_tail(r: int, v: int, eps: float) -> None:
    p = p_value(1000, r, v, eps, 0.0)
    assert p == pytest.approx(float(stats.binom.sf(v - 1, r, _q(eps))), rel=1e-12, abs=1e-15)
    assert p == pytest.approx(_p_reference(1000, r, v, eps, 0.0), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 100, 90, 1.0, 1e-5),
        (1000, 60, 45, 0.5, 1e-4),
        (200, 40, 40, 2.0, 1e-3),
        (5000, 80, 60, 0.2, 1e-6),
        (100, 30, 1, 0.0, 1e-2),
    ],
)
def test_p_value_delta_term_matches_loop(m: int, r: int, v: int, eps: float, delta: float) -> None:
    got = p_value(m, r, v, eps, delta)
    want = _p_reference(m, r, v, eps, delta)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert got > p_value(m, r, v, eps, 0.0)  # the delta term is really there


def test_p_value_edge_cases() -> None:
    assert p_value(10, 5, 0, 3.0, 1e-3) == 1.0  # v = 0: every outcome has >= 0 correct
    assert p_value(10, 0, 0, 0.0, 0.0) == 1.0
    assert p_value(10, 5, 5, 0.0, 0.0) == pytest.approx(0.5**5)
    assert p_value(10**6, 10**5, 10**5 - 100, 8.0, 1e-5) <= 1.0  # large v is fine


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 5, 6, 1.0, 0.0), "v <= r <= m"),
        ((10, 11, 5, 1.0, 0.0), "v <= r <= m"),
        ((10, 5, -1, 1.0, 0.0), "v <= r <= m"),
        ((10, 5, 2, -0.1, 0.0), "eps"),
        ((10, 5, 2, math.nan, 0.0), "eps"),
        ((10, 5, 2, 1.0, 1.0), "delta"),
        ((10, 5, 2, 1.0, -1e-9), "delta"),
        ((10, 5.0, 2, 1.0, 0.0), "integer"),
    ],
)
def test_p_value_validation(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        p_value(*args)


# --- epsilon_lower_bound -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "level"),
    [
        (1000, 100, 90, 1e-5, 0.05),
        (1000, 100, 90, 0.0, 0.05),
        (10000, 500, 400, 1e-5, 0.05 / 22),
        (100000, 20000, 12000, 1e-6, 0.01),
        (1000, 50, 50, 1e-5, 0.05),
    ],
)
def test_epsilon_lower_bound_is_the_crossing(
    m: int, r: int, v: int, delta: float, level: float
) -> None:
    eps = epsilon_lower_bound(m, r, v, delta, level)
    assert eps > 0
    assert p_value(m, r, v, eps, delta) <= level
    assert p_value(m, r, v, eps + 1e-4, delta) > level


def test_epsilon_lower_bound_monotone_in_v() -> None:
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(0, 101)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert bounds[-1] > bounds[90] > bounds[70] > 0


@pytest.mark.parametrize("r", [1, 2, 10, 101, 1000])
def test_epsilon_lower_bound_zero_without_majority(r: int) -> None:
    for v in range(0, r // 2 + 1):
        assert epsilon_lower_bound(10 * r, r, v, 1e-5) == 0.0


@pytest.mark.parametrize("r", [5, 10, 100, 1000, 20000])
@pytest.mark.parametrize("level", [0.05, 0.001])
def test_epsilon_lower_bound_all_correct_closed_form(r: int, level: float) -> None:
    # 0 when even r of r correct is not significant (level < 2^-r fails): q < 1/2
    eps = epsilon_lower_bound(10 * r, r, r, 0.0, level)
    assert eps == pytest.approx(max(0.0, _closed_form_all_correct(r, level)), abs=1e-6)


def test_epsilon_lower_bound_known_value() -> None:
    # m = 1000 canaries, 90 of 100 guesses correct: the quoted bound is 1.63 at level 0.05.
    # delta = 0 gives 1.6308, delta = 1e-5 gives 1.6261: both round to 1.63.
    assert round(epsilon_lower_bound(1000, 100, 90, 0.0, 0.05), 2) == 1.63
    assert round(epsilon_lower_bound(1000, 100, 90, 1e-5, 0.05), 2) == 1.63


def test_epsilon_lower_bound_delta_lowers_bound() -> None:
    b0 = epsilon_lower_bound(1000, 100, 90, 0.0)
    b1 = epsilon_lower_bound(1000, 100, 90, 1e-5)
    b2 = epsilon_lower_bound(1000, 100, 90, 1e-4)
    assert b0 > b1 > b2 > 0
    # with 2 m delta >= level the alpha term alone blocks everything
    assert epsilon_lower_bound(1000, 100, 90, 0.1) == 0.0


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5])
def test_epsilon_lower_bound_validation(level: float) -> None:
    with pytest.raises(ValueError, match="level"):
        epsilon_lower_bound(1000, 100, 90, 1e-5, level)


# --- candidates and guesses --------------------------------------------------------------


def test_guess_candidates() -> None:
    # k = round(f * 500) for f in (0.005, 0.02, 0.1, 0.5): 2 (2.5, half to even), 10, 50, 250
    assert guess_candidates(1000) == [(2, 2), (10, 10), (50, 50), (250, 250), (250, 0)]
    c = guess_candidates(1000)
    assert len(c) == len(set(c))
    for m in (1, 2, 3, 10, 1000, 12345, 10**6):
        cs = guess_candidates(m)
        assert cs and all(kp >= 1 and km >= 0 and kp + km <= m for kp, km in cs)
        assert cs == guess_candidates(m)
    assert guess_candidates(1) == [(1, 0)]
    with pytest.raises(ValueError):
        guess_candidates(0)


def test_guesses_basic_and_tie_break() -> None:
    s = np.array([0.5, 2.0, -1.0, 0.5, 3.0, 0.5])
    g = guesses(s, 2, 1)
    assert g.dtype == np.int8 and g.shape == (6,)
    np.testing.assert_array_equal(g, [0, 1, -1, 0, 1, 0])
    # ties broken by index: among equal scores the highest index is "most in"
    flat = np.zeros(5)
    np.testing.assert_array_equal(guesses(flat, 2, 2), [-1, -1, 0, 1, 1])
    np.testing.assert_array_equal(guesses(s, 0, 0), np.zeros(6))
    np.testing.assert_array_equal(guesses(s, 3, 3), [-1, 1, -1, -1, 1, 1])


@pytest.mark.parametrize(
    ("scores", "kp", "km", "match"),
    [
        (np.zeros(5), 3, 3, "k_plus"),
        (np.zeros(5), -1, 0, "k_plus"),
        (np.array([0.0, np.nan]), 1, 0, "NaN"),
        (np.zeros((2, 3)), 1, 0, "1-D"),
    ],
)
def test_guesses_validation(scores: np.ndarray, kp: int, km: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        guesses(scores, kp, km)


def test_guesses_do_not_depend_on_labels() -> None:
    rng = np.random.default_rng(7)
    m = 1000
    scores = rng.integers(0, 5, size=m).astype(float)  # heavy ties
    labels = rng.random(m) < 0.5
    for perm_seed in range(3):
        perm = np.random.default_rng(perm_seed).permutation(m)
        for lab in (labels, labels[perm], ~labels):
            res = one_run_bound(scores, lab, delta=1e-5)
            g = guesses(scores, res.k_plus, res.k_minus)
            v = int(np.sum(lab[g == 1]) + np.sum(~lab[g == -1]))
            assert (res.guesses, res.correct) == (int(np.sum(g != 0)), v)
    g1 = [guesses(scores, kp, km) for kp, km in guess_candidates(m)]
    g2 = [guesses(scores.copy(), kp, km) for kp, km in guess_candidates(m)]
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_array_equal(a, b)


# --- one_run_bound -----------------------------------------------------------------------


def test_one_run_bound_validity_no_signal() -> None:
    """Null: scores independent of labels. The bound must be > 0 in <= ~5% of runs."""
    rng = np.random.default_rng(20230514)
    m, trials = 1000, 400
    positive = 0
    for _ in range(trials):
        scores = rng.standard_normal(m)
        labels = rng.random(m) < 0.5
        positive += one_run_bound(scores, labels, delta=1e-5).epsilon > 0
    frac = positive / trials
    print(f"no-signal trials with epsilon > 0: {positive}/{trials} = {frac:.4f}")
    assert frac <= 0.08


def test_one_run_bound_power_gaussian_shift() -> None:
    rng = np.random.default_rng(1)
    m = 10000
    labels = rng.random(m) < 0.5
    scores = rng.standard_normal(m) + 4.0 * labels
    res = one_run_bound(scores, labels, delta=1e-5)
    assert isinstance(res, AuditBound)
    assert res.epsilon > 2.0
    assert res.candidates == len(guess_candidates(m))
    assert res.level == 0.05
    assert set(res.as_dict()) == {
        "epsilon",
        "k_plus",
        "k_minus",
        "guesses",
        "correct",
        "candidates",
        "level",
    }


def test_one_run_bound_perfect_separation() -> None:
    rng = np.random.default_rng(2)
    m = 10000
    cands = guess_candidates(m)
    per_level = 0.05 / len(cands)
    # exactly m/2 "in": every candidate is all-correct; the largest, (2500, 2500), wins
    labels = rng.permutation(np.arange(m) < m // 2)
    scores = labels + 0.5 * rng.random(m)
    want = _closed_form_all_correct(m // 2, per_level)
    res = one_run_bound(scores, labels, delta=0.0)
    assert (res.k_plus, res.k_minus, res.correct, res.guesses) == (2500, 2500, m // 2, m // 2)
    assert res.epsilon == pytest.approx(want, abs=1e-6)
    res_d = one_run_bound(scores, labels, delta=1e-5)
    assert res_d.correct == res_d.guesses
    # the delta term matters at this scale (2 m delta = 0.2): the bound drops
    assert 4.0 < res_d.epsilon < want
    # random labels: the bound is at least the closed form of the largest all-correct
    # candidate (another, larger candidate with a few errors may beat it)
    labels = rng.random(m) < 0.5
    scores = labels + 0.5 * rng.random(m)
    n_in, n_out = int(labels.sum()), m - int(labels.sum())
    r_best = max(kp + km for kp, km in cands if kp <= n_in and km <= n_out)
    res = one_run_bound(scores, labels, delta=0.0)
    assert res.epsilon >= _closed_form_all_correct(r_best, per_level) - 1e-6
    assert res.epsilon == max(
        epsilon_lower_bound(
            m,
            kp + km,
            int(np.sum(labels[guesses(scores, kp, km) == 1]))
            + int(np.sum(~labels[guesses(scores, kp, km) == -1])),
            0.0,
            per_level,
        )
        for kp, km in cands
    )


def test_one_run_bound_validation() -> None:
    with pytest.raises(ValueError, match="shape"):
        one_run_bound(np.zeros(5), np.zeros(4, dtype=bool), 1e-5)
    with pytest.raises(ValueError, match="NaN"):
        one_run_bound(np.array([0.0, np.nan]), np.array([True, False]), 1e-5)
    with pytest.raises(ValueError, match="boolean"):
        one_run_bound(np.zeros(2), np.array([0.3, 1.0]), 1e-5)
    with pytest.raises(ValueError, match="delta"):
        one_run_bound(np.zeros(2), np.array([True, False]), 1.0)


# --- membership inference ----------------------------------------------------------------


def test_membership_inference_hand_computed() -> None:
    res = membership_inference(
        np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])
    )
    assert isinstance(res, MembershipInference)
    assert res.auc == pytest.approx(0.75)
    # thresholds: 0.8 -> (TPR .5, FPR 0); 0.4 -> (.5, .5): best TPR at FPR 0 is 0.5
    assert res.tpr_at_1pct_fpr == pytest.approx(0.5)
    assert res.tpr_at_01pct_fpr == pytest.approx(0.5)
    assert set(res.as_dict()) == {"auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr"}


def test_membership_inference_ties() -> None:
    # in = {1, 2}, out = {1, 0}: pairs (1,1) tie 1/2, (1,0) 1, (2,1) 1, (2,0) 1 -> 3.5 / 4
    res = membership_inference(np.array([1.0, 1.0, 2.0, 0.0]), np.array([True, False, True, False]))
    assert res.auc == pytest.approx(0.875)
    assert res.tpr_at_1pct_fpr == pytest.approx(0.5)  # the tied block at 1 costs FPR 1/2


def test_membership_inference_low_fpr() -> None:
    out_scores = np.arange(200, dtype=float)  # 200 "out": FPR <= 1% allows 2 false positives
    in_scores = np.array([199.5, 198.5, 197.5, 150.0])
    scores = np.concatenate([out_scores, in_scores])
    labels = np.concatenate([np.zeros(200, bool), np.ones(4, bool)])
    res = membership_inference(scores, labels)
    assert res.tpr_at_1pct_fpr == pytest.approx(0.75)  # t = 197.5: FPR 2/200, TPR 3/4
    assert res.tpr_at_01pct_fpr == pytest.approx(0.25)  # FPR 0 only: t = 199.5
    # AUC: 199.5 beats 200 outs, 198.5 beats 199, 197.5 beats 198, 150 beats 150 and ties
    # one (1/2) -> 747.5 / 800
    assert res.auc == pytest.approx(747.5 / 800)


def test_membership_inference_extremes() -> None:
    labels = np.array([True, False] * 50)
    flat = membership_inference(np.ones(100), labels)
    assert flat.auc == pytest.approx(0.5)
    assert flat.tpr_at_1pct_fpr == 0.0 and flat.tpr_at_01pct_fpr == 0.0
    perfect = membership_inference(labels.astype(float), labels)
    assert perfect.auc == 1.0
    assert perfect.tpr_at_1pct_fpr == 1.0 and perfect.tpr_at_01pct_fpr == 1.0
    empty = membership_inference(np.arange(3.0), np.ones(3, bool))
    assert all(math.isnan(x) for x in empty.as_dict().values())
    rng = np.random.default_rng(3)
    s = rng.standard_normal(500)
    lab = rng.random(500) < 0.5
    ref = stats.mannwhitneyu(s[lab], s[~lab]).statistic / (lab.sum() * (~lab).sum())
    assert membership_inference(s, lab).auc == pytest.approx(ref)
