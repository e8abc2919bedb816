"""The verdict's decision rules on hand-made numbers: trend kinds decided by CI overlap and
seed counts, Spearman's rho by hand, and breakpoints by the stated thresholds (the sentences
made from them are tested in tests/report/test_report_verdict.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from dpalign.diagnostics.trends import (
    Estimate,
    VerdictThresholds,
    find_breakpoint,
    intervals_overlap,
    spearman,
    trend,
)

INF = math.inf


def est(mean: float, half: float = 0.0, n: int = 3) -> Estimate:
    return Estimate(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Point:
    """The least a grid point needs for the breakpoint rule (the report's is its ``Cell``)."""

    private: bool
    stats: Mapping[str, Estimate]

    def get(self, key: str) -> Estimate:
        return self.stats[key]


def point(epsilon: float, diverged: float = 0.0, volatility: float = 0.01) -> Point:
    return Point(math.isfinite(epsilon),
                 {"diverged": est(diverged), "loss_volatility": est(volatility)})


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


def test_an_estimate_without_seeds_or_mean_is_not_measured() -> None:
    assert est(0.5).measured
    assert not Estimate().measured
    assert not Estimate(0.5, 0.4, 0.6, 0).measured


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


def test_disjoint_ends_with_a_weak_rank_trend_are_no_clear_trend() -> None:
    # ends 0.5 -> 0.55 (disjoint) while the ranks 3,7,6,5,2,1,4 fall:
    # sum d^2 = 82, rho = 1 - 6 * 82 / (7 * 48) = -13/28; |rho| < 0.8: no trend is called;
    # with the rho bar removed the ends against the rank trend read as non-monotone
    means = [0.5, 0.9, 0.8, 0.7, 0.1, 0.0, 0.55]
    t = trend(range(7), [est(m) for m in means])
    assert t.kind == "no_clear_trend" and t.rho == pytest.approx(-13 / 28)
    loose = trend(range(7), [est(m) for m in means], VerdictThresholds(min_rho=0.0))
    assert loose.kind == "non_monotone"


def test_rho_of_0_2_gives_no_trend_and_0_9_with_separated_cis_gives_one() -> None:
    weak = [0.1, 0.4, 0.5, 0.2, 0.3]  # ranks 1,4,5,2,3: sum d^2 = 0+4+4+4+4 = 16 -> 0.2
    t = trend(range(5), [est(m, 0.01) for m in weak])
    assert t.rho == pytest.approx(0.2) and t.kind == "no_clear_trend"  # ends 0.1 vs 0.3 apart
    strong = [0.1, 0.3, 0.2, 0.4, 0.5]  # ranks 1,3,2,4,5: sum d^2 = 2 -> rho = 0.9
    t = trend(range(5), [est(m, 0.01) for m in strong])
    assert t.rho == pytest.approx(0.9) and t.kind == "rises"
    assert trend(range(5), [est(m, 0.3) for m in strong]).kind == "no_clear_change"


def test_unmeasured_points_are_skipped() -> None:
    t = trend([INF, 8, 1], [est(0.0), Estimate(), est(1.0)])
    assert t.kind == "rises" and t.n_points == 2 and t.end == (1, est(1.0))
    alone = trend([INF, 1], [est(0.2), Estimate()])
    assert alone.kind == "too_few_points" and alone.n_points == 1
    assert alone.start == (INF, est(0.2))


# ---------------------------------------------------------------- breakpoint


def test_divergence_breaks_at_the_first_point_at_the_rate() -> None:
    points = [point(INF), point(8, diverged=0.49), point(2, diverged=0.5), point(1, 1.0)]
    b = find_breakpoint(points)
    assert b.baseline is points[0] and b.smallest is points[-1]
    assert b.broken is points[2]
    assert [(c.name, c.cell, c.previous) for c in b.crossings] == [
        ("divergence", points[2], points[1])]


def test_volatility_breaks_above_the_ratio_to_the_baseline_and_crossings_are_in_walk_order(
        ) -> None:
    # 0.02 is exactly 2x the baseline's 0.01: not above it
    points = [point(INF, volatility=0.01), point(8, volatility=0.02),
              point(2, volatility=0.021), point(1, diverged=0.5, volatility=0.05)]
    b = find_breakpoint(points)
    assert [(c.name, c.cell) for c in b.crossings] == [("volatility", points[2]),
                                                       ("divergence", points[3])]
    assert find_breakpoint(points, VerdictThresholds(volatility_ratio=6.0,
                                                     divergence_rate=0.6)).broken is None


def test_without_a_non_private_point_the_least_private_is_the_baseline() -> None:
    points = [point(8, volatility=0.01), point(1, volatility=0.03)]
    b = find_breakpoint(points)
    assert b.baseline is points[0]
    assert [(c.name, c.cell, c.previous) for c in b.crossings] == [
        ("volatility", points[1], points[0])]


def test_a_diverging_baseline_is_the_first_crossing_with_no_previous_point() -> None:
    points = [point(INF, diverged=1.0), point(1, diverged=1.0)]
    b = find_breakpoint(points)
    assert b.broken is points[0] and b.crossings[0].previous is None
