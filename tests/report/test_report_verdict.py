"""The verdict rules on hand-made grid points: trend kinds decided by CI overlap, Spearman's
rho by hand, breakpoints by the stated thresholds, and sentences that carry the numbers."""

from __future__ import annotations

import math

import pytest

from dpalign.report.series import Cell, Estimate, epsilon_series, k_series
from dpalign.report.verdict import (
    VerdictThresholds,
    breakpoint_sentence,
    find_breakpoint,
    glance,
    intervals_overlap,
    run_summary,
    spearman,
    study_verdicts,
    trend,
    trend_sentence,
)

INF = math.inf


def est(mean: float, half: float = 0.0, n: int = 3) -> Estimate:
    return Estimate(mean, mean - half, mean + half, n)


def cell(epsilon: float, k: int = 8, *, diverged: float = 0.0, volatility: float = 0.01,
         nts: float | None = None, n: int = 3, half: float = 0.0,
         mechanism: str | None = None) -> Cell:
    mechanism = mechanism or ("none" if math.isinf(epsilon) else "dp_sgd")
    stats = {"diverged": est(diverged, half, n), "loss_volatility": est(volatility, half, n)}
    if nts is not None:
        stats["mean_noise_to_signal"] = est(nts, 0.1, n)
    return Cell(point=f"{mechanism}-e{epsilon}-k{k}", mechanism=mechanism, epsilon=epsilon,
                k=k, stats=stats)


# ---------------------------------------------------------------- spearman, overlap


@pytest.mark.parametrize(("values", "rho"), [
    ([1, 2, 3], 1.0),
    ([3, 2, 1], -1.0),
    ([1, 3, 2], 0.5),  # ranks 1,3,2 vs 1,2,3: d^2 = 0+1+1, 1 - 6*2/(3*8) = 0.5
    ([0, 0, 1, 1], math.sqrt(0.8)),  # average ranks 1.5,1.5,3.5,3.5 vs 1..4
])
def test_spearman_by_hand(values: list[float], rho: float) -> None:
    assert spearman(values) == pytest.approx(rho)


def test_spearman_is_undefined_for_constant_or_single_values() -> None:
    assert math.isnan(spearman([2, 2, 2]))
    assert math.isnan(spearman([5]))


def test_intervals_overlap_including_touching_ends() -> None:
    assert intervals_overlap(Estimate(0.5, 0.4, 0.6, 3), Estimate(0.65, 0.6, 0.7, 3))
    assert not intervals_overlap(Estimate(0.5, 0.4, 0.6, 3), Estimate(0.8, 0.7, 0.9, 3))


# ---------------------------------------------------------------- trend


def test_trend_rises_when_the_end_point_cis_are_disjoint() -> None:
    t = trend([INF, 8, 1], [est(0.0), est(0.3, 0.1), est(1.0)])
    assert t.kind == "rises"
    assert t.start == (INF, est(0.0)) and t.end == (1, est(1.0))
    assert t.rho == pytest.approx(1.0) and t.n_points == 3


def test_trend_falls() -> None:
    assert trend([4, 16], [est(0.9, 0.02), est(0.6, 0.05)]).kind == "falls"


def test_overlapping_cis_mean_no_clear_change_even_if_means_differ() -> None:
    t = trend([INF, 1], [est(0.010, 0.004), est(0.013, 0.004)])
    assert t.kind == "no_clear_change"


def test_one_seed_at_an_end_point_cannot_be_judged() -> None:
    t = trend([INF, 1], [est(0.0, n=1), est(1.0, n=3)])
    assert t.kind == "too_few_seeds"
    assert trend([INF, 1], [est(0.0, n=1), est(1.0, n=3)],
                 VerdictThresholds(min_seeds=1)).kind == "rises"


def test_disjoint_ends_against_the_rank_trend_are_non_monotone() -> None:
    # ends 0.5 -> 0.55 (disjoint: a rise) while the ranks 3,7,6,5,2,1,4 fall:
    # sum d^2 = 82, rho = 1 - 6 * 82 / (7 * 48) = -13/28
    means = [0.5, 0.9, 0.8, 0.7, 0.1, 0.0, 0.55]
    t = trend(range(7), [est(m) for m in means])
    assert t.kind == "non_monotone" and t.rho == pytest.approx(-13 / 28)


def test_unmeasured_points_are_skipped_and_fewer_than_two_is_reported() -> None:
    t = trend([INF, 1], [est(0.2), Estimate()])
    assert t.kind == "too_few_points" and t.n_points == 1
    assert trend_sentence("K=8", "steps_to_target", "epsilon", t) == (
        "K=8: steps to converge is measured at only one ε value: 0.2 [0.2, 0.2] (n=3) at "
        "∞ (no DP).")


def test_trend_sentence_carries_the_numbers() -> None:
    t = trend([INF, 2], [est(0.0), Estimate(1 / 3, 0.0, 1.0, 3)])  # 1 of 3 seeds diverged
    assert t.kind == "no_clear_change"
    sentence = trend_sentence("K=8", "diverged", "epsilon", t)
    assert sentence == ("K=8: divergence rate shows no clear change as ε decreases (more "
                        "noise): the 95% CIs 0 [0, 0] (n=3) at ∞ (no DP) and 0.333 [0, 1] "
                        "(n=3) at ε=2 overlap (Spearman ρ=+1.00 over 2 ε values).")
    rising = trend_sentence("K=8", "diverged", "epsilon",
                            trend([INF, 2], [est(0.0), est(1.0)]))
    assert "divergence rate rises as ε decreases" in rising
    assert "0 [0, 0] (n=3) at ∞ (no DP) → 1 [1, 1] (n=3) at ε=2" in rising


# ---------------------------------------------------------------- breakpoint


def test_breakpoint_by_divergence_rate_names_epsilon_and_noise_to_signal() -> None:
    cells = [cell(INF), cell(8, nts=0.3), cell(2, diverged=0.67, nts=1.5),
             cell(1, diverged=1.0, nts=3.0)]
    b = find_breakpoint(cells)
    assert b.broken is cells[2]
    assert [(c.name, c.previous) for c in b.crossings] == [("divergence", cells[1])]
    sentence = breakpoint_sentence("K=8", b)
    assert sentence.startswith("K=8: stability breaks at ε=2 (mean noise-to-signal 1.5 "
                               "[1.4, 1.6] (n=3)), where divergence rate 0.67 [0.67, 0.67] "
                               "(n=3) ≥ 0.5")
    assert "still stable at ε=8: mean noise-to-signal 0.3" in sentence


def test_breakpoint_by_volatility_uses_the_ratio_to_the_no_dp_baseline() -> None:
    cells = [cell(INF, volatility=0.010), cell(8, volatility=0.019),  # 1.9x: stable
             cell(2, volatility=0.021), cell(1, volatility=0.05, diverged=0.5)]
    b = find_breakpoint(cells)
    assert b.broken is cells[2]
    assert [c.name for c in b.crossings] == ["volatility", "divergence"]
    sentence = breakpoint_sentence("K=8", b)
    assert "loss volatility 0.021 [0.021, 0.021] (n=3) > 2× the no-DP baseline's 0.01" in sentence
    assert "Divergence rate 0.5 [0.5, 0.5] (n=3) ≥ 0.5 from ε=1" in sentence
    looser = find_breakpoint(cells, VerdictThresholds(volatility_ratio=6.0,
                                                      divergence_rate=0.6))
    assert looser.broken is None


def test_a_stable_series_says_so_with_its_thresholds() -> None:
    cells = [cell(INF), cell(8), cell(1, diverged=1 / 3, half=0.33)]
    b = find_breakpoint(cells)
    assert b.broken is None
    sentence = breakpoint_sentence("K=8", b)
    assert sentence.startswith("K=8: stable down to ε=1: no point crosses divergence rate ≥ "
                               "0.5 or loss volatility > 2× the non-private baseline")


def test_an_unstable_baseline_is_reported_as_such() -> None:
    b = find_breakpoint([cell(INF, diverged=1.0), cell(1, diverged=1.0)])
    assert b.broken is not None and not b.broken.private
    assert "unstable already without DP" in breakpoint_sentence("K=8", b)


# ---------------------------------------------------------------- series and study verdicts


def _grid(divergence: dict[float, float]) -> list[Cell]:
    return [cell(e, k, diverged=d) for k in (4, 16) for e, d in divergence.items()]


def test_series_walk_from_no_dp_to_the_smallest_epsilon_and_over_k() -> None:
    cells = _grid({INF: 0.0, 1.0: 0.0, 8.0: 0.0})
    by_eps = epsilon_series(cells)
    assert [s.label for s in by_eps] == ["K=4", "K=16"]
    assert [c.epsilon for c in by_eps[0].cells] == [INF, 8.0, 1.0]
    by_k = k_series(cells)
    assert [s.label for s in by_k] == ["∞ (no DP)", "ε=8", "ε=1"]
    assert [c.k for c in by_k[0].cells] == [4, 16]


def test_study_verdict_follows_the_numbers() -> None:
    rising = study_verdicts(_grid({INF: 0.0, 8.0: 0.0, 1.0: 1.0}))
    divergence = next(v for v in rising if v.question == "Divergence").sentences
    assert divergence[0].startswith("K=4: divergence rate rises as ε decreases")
    flat = study_verdicts(_grid({INF: 0.0, 8.0: 0.0, 1.0: 0.0}))
    divergence = next(v for v in flat if v.question == "Divergence").sentences
    assert divergence[0].startswith("K=4: divergence rate shows no clear change as ε decreases")
    assert not any("rises" in s for s in divergence)
    breaks = next(v for v in rising if v.question == "Where stability breaks").sentences
    assert breaks[0].startswith("K=4: stability breaks at ε=1")


def test_glance_lists_the_epsilon_trend_per_k() -> None:
    labels, rows = glance(_grid({INF: 0.0, 8.0: 0.0, 1.0: 1.0}))
    assert labels == ["K=4", "K=16"]
    assert rows[0] == ("divergence rate", ["↑ rises", "↑ rises"])


def test_two_mechanisms_share_the_no_dp_baseline() -> None:
    cells = [cell(INF), cell(1, mechanism="dp_sgd", diverged=1.0),
             cell(1, mechanism="label_dp")]
    series = epsilon_series(cells)
    assert [s.label for s in series] == ["DP-SGD, K=8", "label-DP, K=8"]
    assert all(s.cells[0].mechanism == "none" for s in series)


def test_run_summary_sentences() -> None:
    row = {"n_steps": 100, "diverged": True, "diverged_step": 42,
           "diverged_reason": "loss_nonfinite", "loss_volatility": 0.0123,
           "steps_to_target": math.nan, "epsilon": 7.9, "mean_clip_fraction": 0.25,
           "mean_noise_to_signal": 1.5, "final_heldout_reward_accuracy": 0.61}
    assert run_summary(row) == [
        "Diverged at step 42 (loss_nonfinite) of 100 steps.",
        "Loss volatility 0.0123 (std of the EMA-smoothed loss's per-step change, nats).",
        "Never reached the target held-out reward accuracy.",
        "ε spent 7.9; mean clip fraction 0.25; mean noise-to-signal 1.5.",
        "Final held-out reward accuracy 0.61.",
    ]
