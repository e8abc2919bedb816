"""The decision rules behind the study verdict, as pure functions of numbers (no prose; the
sentences are made by :mod:`dpalign.report.verdict`). Their settings live in
:class:`VerdictThresholds`.

**Trend** (:func:`trend`): walk a series of :class:`Estimate` in its reading order (epsilon
from no DP down to the smallest epsilon, i.e. more noise; K from few to many shots) and
compare its two end points. A trend is called only when both ends have at least ``min_seeds``
seeds, their 95% bootstrap CIs do not overlap AND ``|Spearman rho| >= min_rho`` (default 0.8;
rho of the means against the position along the series); then the metric "rises" or "falls"
(or "changes non-monotonically" when rho has the other sign). Everything else is "no clear
trend": ``no_clear_change`` when the CIs overlap, ``no_clear_trend`` when they separate but
|rho| < ``min_rho`` (or rho is undefined).

**Breakpoint** (:func:`find_breakpoint`): walking an epsilon series towards more noise,
stability breaks at the first point where the divergence rate is ``>= divergence_rate``
(default 0.5) or the mean loss volatility is ``> volatility_ratio`` (default 2) times that of
the non-private baseline (the least-private point when the study has no baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "BREAK_RULES",
    "Breakpoint",
    "Crossing",
    "Estimate",
    "Point",
    "Trend",
    "VerdictThresholds",
    "find_breakpoint",
    "intervals_overlap",
    "spearman",
    "trend",
]


@dataclass(frozen=True)
class VerdictThresholds:
    """The settings of the two rules (see the module docstring)."""

    divergence_rate: float = 0.5
    volatility_ratio: float = 2.0
    min_seeds: int = 2
    min_rho: float = 0.8


@dataclass(frozen=True)
class Estimate:
    """A cross-seed mean with its 95% bootstrap interval and the number of seeds behind it."""

    mean: float = math.nan
    low: float = math.nan
    high: float = math.nan
    n: int = 0

    @property
    def measured(self) -> bool:
        return self.n > 0 and not math.isnan(self.mean)


# ---------------------------------------------------------------- trend


def spearman(values: Sequence[float]) -> float:
    """Spearman's rank correlation of ``values`` with their positions 0..n-1 (ties get
    average ranks); NaN with fewer than 2 values or when all values are equal."""
    y = np.asarray(values, dtype=float)
    if y.size < 2 or np.all(y == y[0]):
        return math.nan
    return float(np.corrcoef(np.arange(y.size), rankdata(y))[0, 1])


def intervals_overlap(a: Estimate, b: Estimate) -> bool:
    """Whether the CIs ``[low, high]`` of ``a`` and ``b`` share a point."""
    return a.low <= b.high and b.low <= a.high


@dataclass(frozen=True)
class Trend:
    """How a metric moves along a series: ``kind`` is one of ``rises``, ``falls``,
    ``non_monotone``, ``no_clear_change`` (end CIs overlap), ``no_clear_trend`` (end CIs
    separate but |rho| < ``min_rho``), ``too_few_seeds``, ``too_few_points``; ``start``
    and ``end`` are the end points (coordinate, estimate); ``rho`` is Spearman's rho."""

    kind: str
    start: tuple[float, Estimate] | None = None
    end: tuple[float, Estimate] | None = None
    rho: float = math.nan
    n_points: int = 0


def trend(xs: Sequence[float], estimates: Sequence[Estimate],
          thresholds: VerdictThresholds = VerdictThresholds()) -> Trend:
    """The :class:`Trend` of ``estimates`` at coordinates ``xs``, given in reading order
    (unmeasured points are skipped)."""
    kept = [(x, e) for x, e in zip(xs, estimates, strict=True) if e.measured]
    if len(kept) < 2:
        return Trend("too_few_points", start=kept[0] if kept else None, n_points=len(kept))
    start, end = kept[0], kept[-1]
    rho = spearman([e.mean for _, e in kept])
    enough = min(start[1].n, end[1].n) >= thresholds.min_seeds
    if not enough:
        kind = "too_few_seeds"
    elif intervals_overlap(start[1], end[1]):
        kind = "no_clear_change"
    elif math.isnan(rho) or abs(rho) < thresholds.min_rho:
        kind = "no_clear_trend"
    else:
        sign = 1.0 if end[1].mean > start[1].mean else -1.0
        kind = ("non_monotone" if not math.isnan(rho) and rho * sign <= 0
                else {1.0: "rises", -1.0: "falls"}[sign])
    return Trend(kind, start, end, rho, len(kept))


# ---------------------------------------------------------------- breakpoint


class Point(Protocol):
    """A grid point as the breakpoint rule reads it (e.g. the report's ``Cell``)."""

    @property
    def private(self) -> bool: ...

    def get(self, key: str) -> Estimate: ...


P = TypeVar("P", bound=Point)


def _volatility_fires(point: Point, baseline: Point, t: VerdictThresholds) -> bool:
    base = baseline.get("loss_volatility").mean
    value = point.get("loss_volatility").mean
    return point is not baseline and base > 0 and value > t.volatility_ratio * base


BREAK_RULES: dict[str, Callable[[Point, Point, VerdictThresholds], bool]] = {
    "divergence": lambda p, b, t: p.get("diverged").mean >= t.divergence_rate,
    "volatility": _volatility_fires,
}
"""Each way stability breaks: ``fires(point, baseline, thresholds)``, checked at every point
of an epsilon series."""


@dataclass(frozen=True)
class Crossing(Generic[P]):
    """The first point of a series meeting rule ``name``; ``previous`` is the point just
    before it in the walk (``None`` when it is the first)."""

    name: str
    cell: P
    previous: P | None


@dataclass(frozen=True)
class Breakpoint(Generic[P]):
    """Where an epsilon series breaks: the first crossing of each of :data:`BREAK_RULES` in
    walk order (``crossings`` is empty when the series stays stable). ``broken`` is the first
    point that crosses any rule."""

    baseline: P
    crossings: tuple[Crossing[P], ...]
    smallest: P

    @property
    def broken(self) -> P | None:
        return self.crossings[0].cell if self.crossings else None


def find_breakpoint(cells: Sequence[P],
                    thresholds: VerdictThresholds = VerdictThresholds()) -> Breakpoint[P]:
    """Walk ``cells`` (an epsilon series in reading order: no DP first) and record, for each
    of :data:`BREAK_RULES`, the first point meeting it. The baseline is the first non-private
    point, else the first point."""
    baseline = next((c for c in cells if not c.private), cells[0])
    crossings = []
    for name, fires in BREAK_RULES.items():
        hit = next((i for i, c in enumerate(cells) if fires(c, baseline, thresholds)), None)
        if hit is not None:
            crossings.append((hit, Crossing(name, cells[hit], cells[hit - 1] if hit else None)))
    ordered = tuple(c for _, c in sorted(crossings, key=lambda pair: pair[0]))
    return Breakpoint(baseline, ordered, cells[-1])
