"""Cross-seed aggregation: bootstrap intervals checked against normal theory and by coverage,
summaries against numpy and hand arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpalign.diagnostics import aggregate, bootstrap_ci, numeric_keys, summarize


def test_bootstrap_ci_of_normal_sample_contains_the_mean_with_normal_width():
    x = np.random.default_rng(0).normal(3.0, 1.0, size=200)
    low, high = bootstrap_ci(x)
    assert low < 3.0 < high
    assert low < x.mean() < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.25)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(200):
        low, high = bootstrap_ci(rng.normal(3.0, 1.0, size=30), n_resamples=1000, seed=i)
        covered += low <= 3.0 <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([2.5]) == (2.5, 2.5)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([float("nan")]))
    assert bootstrap_ci([1.0, math.inf]) == (math.inf, math.inf)


def test_bootstrap_ci_drops_nans_and_is_reproducible():
    values = [0.1, 0.4, 0.2, 0.9, 0.3]
    assert bootstrap_ci([*values, float("nan")]) == bootstrap_ci(values)
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    low, high = bootstrap_ci(values)
    assert min(values) <= low < np.mean(values) < high <= max(values)


def test_summarize_against_hand_arithmetic():
    # 0.1, 0.2, 0.4: mean 0.7/3; squared deviations (0.4^2 + 0.1^2 + 0.5^2) / 9 = 0.42 / 9,
    # sample variance = 0.42 / 18.
    stats = summarize([0.1, float("nan"), 0.2, 0.4])
    assert stats["mean"] == pytest.approx(0.7 / 3)
    assert stats["std"] == pytest.approx(math.sqrt(0.42 / 18))
    assert stats["std"] == pytest.approx(np.std([0.1, 0.2, 0.4], ddof=1))
    assert stats["n"] == 3
    assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]


ROWS = [
    {"loss_volatility": 0.1, "diverged": False, "steps_to_target": 10,
     "diverged_reason": None, "epsilon": math.inf},
    {"loss_volatility": 0.2, "diverged": True, "steps_to_target": math.nan,
     "diverged_reason": "loss_nonfinite", "epsilon": math.inf},
    {"loss_volatility": 0.4, "diverged": False, "steps_to_target": 20,
     "diverged_reason": None, "epsilon": math.inf},
    {"loss_volatility": math.nan, "diverged": False, "steps_to_target": None,
     "diverged_reason": None, "epsilon": math.inf},
]


def test_aggregate_means_stds_and_rates():
    out = aggregate(ROWS)
    assert out["n_runs"] == 4
    assert out["loss_volatility_mean"] == pytest.approx(0.7 / 3)
    assert out["loss_volatility_std"] == pytest.approx(np.std([0.1, 0.2, 0.4], ddof=1))
    assert out["loss_volatility_n"] == 3
    assert out["loss_volatility_ci_low"] <= 0.7 / 3 <= out["loss_volatility_ci_high"]
    assert out["diverged_mean"] == pytest.approx(0.25)  # booleans count as 0/1
    assert out["divergence_rate"] == pytest.approx(0.25)
    assert out["converged_fraction"] == pytest.approx(0.5)  # NaN and None: never reached
    assert out["steps_to_target_mean"] == pytest.approx(15.0)
    assert out["steps_to_target_n"] == 2
    assert "diverged_reason_mean" not in out  # strings are not numeric


def test_aggregate_of_one_seed_and_of_infinite_columns():
    one = aggregate(ROWS[:1])
    assert one["loss_volatility_mean"] == 0.1
    assert math.isnan(one["loss_volatility_std"])
    assert (one["loss_volatility_ci_low"], one["loss_volatility_ci_high"]) == (0.1, 0.1)
    out = aggregate(ROWS)
    assert out["epsilon_mean"] == math.inf and math.isnan(out["epsilon_std"])
    assert (out["epsilon_ci_low"], out["epsilon_ci_high"]) == (math.inf, math.inf)


def test_aggregate_restricted_keys_and_missing_columns():
    out = aggregate(ROWS, keys=["loss_volatility", "absent"])
    assert {k for k in out if k.startswith("epsilon")} == set()
    assert out["absent_n"] == 0 and math.isnan(out["absent_mean"])
    empty = aggregate([{"loss_volatility": 0.3}])
    assert math.isnan(empty["divergence_rate"]) and math.isnan(empty["converged_fraction"])
    assert numeric_keys(ROWS) == ["loss_volatility", "diverged", "steps_to_target", "epsilon"]
