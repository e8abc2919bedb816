"""The verdict on hand-made grid points: sentences that carry the numbers of the rules'
results (the rules themselves: tests/diagnostics/test_trends.py), series, study verdicts."""

from __future__ import annotations

import math

from dpalign.diagnostics.trends import (
    BREAK_RULES,
    Estimate,
    VerdictThresholds,
    find_breakpoint,
    trend,
)
from dpalign.report.fmt import estimate_text
from dpalign.report.series import Cell, epsilon_series, k_series
from dpalign.report.verdict import (
    CRITERIA,
    breakpoint_sentence,
    glance,
    run_summary,
    study_verdicts,
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


# ---------------------------------------------------------------- trend sentences


def test_a_single_measured_point_is_reported_as_such() -> None:
    t = trend([INF, 1], [est(0.2), Estimate()])
    assert t.kind == "too_few_points" and t.n_points == 1
    assert trend_sentence("K=8", "steps_to_target", "epsilon", t) == (
        "K=8: steps to converge is measured at only one ε value: 0.2 [0.2, 0.2] (n=3) at "
        "∞ (no DP).")


def test_trend_sentence_carries_the_numbers() -> None:
    t = trend([INF, 2], [est(0.0), Estimate(1 / 3, 0.0, 1.0, 3)])  # 1 of 3 seeds diverged
    assert t.kind == "no_clear_change"
    sentence = trend_sentence("K=8", "diverged", "epsilon", t)
    assert sentence == ("K=8: divergence rate shows no clear trend as ε decreases (more "
                        "noise): the 95% CIs 0 [0, 0] (n=3) at ∞ (no DP) and 0.333 [0, 1] "
                        "(n=3) at ε=2 overlap (Spearman ρ=+1.00 over 2 ε values).")
    rising = trend_sentence("K=8", "diverged", "epsilon",
                            trend([INF, 2], [est(0.0), est(1.0)]))
    assert "divergence rate rises as ε decreases" in rising
    assert "0 [0, 0] (n=3) at ∞ (no DP) → 1 [1, 1] (n=3) at ε=2" in rising


def test_separated_ends_with_a_weak_rank_correlation_are_no_clear_trend() -> None:
    # 0, 1, 0, 0, 1: the ends' CIs separate but Spearman rho = 0.5 < 0.8
    t = trend([INF, 8, 4, 2, 1], [est(v) for v in (0.0, 1.0, 0.0, 0.0, 1.0)])
    assert t.kind == "no_clear_trend"
    sentence = trend_sentence("K=8", "diverged", "epsilon", t)
    assert sentence.startswith("K=8: divergence rate shows no clear trend as ε decreases")
    assert "separate" in sentence and "|ρ| < 0.8" in sentence


def test_estimate_text() -> None:
    assert estimate_text(Estimate(2 / 3, 1 / 3, 1.0, 3)) == "0.667 [0.333, 1] (n=3)"
    assert estimate_text(Estimate()) == "not measured"


# ---------------------------------------------------------------- breakpoint


def test_every_stability_rule_has_words_in_its_order() -> None:
    assert list(CRITERIA) == list(BREAK_RULES)



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
    assert divergence[0].startswith("K=4: divergence rate shows no clear trend as ε decreases")
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
