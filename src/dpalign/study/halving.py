"""Successive halving over a study's configurations (pure functions over the runs table).

A tuning group is the runs that share (mechanism, epsilon, K, loss, method); its
configurations are its grid points. The method is compared, never tuned over: each method's
configurations compete only among themselves, so no method is pruned in favour of another.
After the first rung (every point with the first seeds), a group keeps its
``ceil(keep x n)`` best points by the mean of the tuning metric over their finished runs;
only those run the other seeds. Ties and missing values: a point with no finished run, or
a NaN mean, ranks last; equal means keep the point that sorts first by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from dpalign.study.grid import OFFLINE, Point


def _configurations(points: Sequence[Point]
                    ) -> dict[tuple[str, float, int, str, str], set[str]]:
    """Each tuning group's configurations (grid point names without the seed)."""
    groups: dict[tuple[str, float, int, str, str], set[str]] = {}
    for p in points:
        method = getattr(p, "method", OFFLINE)  # any object with Point's fields will do
        groups.setdefault((p.mechanism, p.epsilon, p.k, p.loss, method), set()).add(p.point)
    return groups


def kept_count(n_points: int, keep: float) -> int:
    """How many of a group's ``n_points`` configurations go on: ``ceil(keep n)``, >= 1."""
    return max(1, math.ceil(keep * n_points - 1e-9))


def rungs(points: Sequence[Point], seeds: Sequence[int], first: int, keep: float
          ) -> tuple[list[Point], list[Point], int]:
    """The first rung (the runs of the first ``first`` of ``seeds``), the other runs, and
    how many of those will run: ``kept_count`` configurations of each group, each with every
    remaining seed."""
    leading = set(seeds[:first])
    rung1 = [p for p in points if p.seed in leading]
    rest = [p for p in points if p.seed not in leading]
    later = sum(kept_count(len(names), keep) for names in _configurations(rung1).values())
    return rung1, rest, later * len(set(seeds) - leading)


def promoted(points: Sequence[Point], runs: pd.DataFrame, metric: str, keep: float
             ) -> set[str]:
    """The grid points (names without the seed) that run the remaining seeds.

    ``runs``: the first rung's rows (``point``, ``status``, ``metric``). Each group of
    ``points`` keeps ``kept_count`` points, best mean ``metric`` first."""
    ok = runs[runs["status"] == "ok"]
    means = (ok.groupby("point")[metric].mean() if metric in ok.columns and len(ok)
             else pd.Series(dtype=float))
    kept: set[str] = set()
    for names in _configurations(points).values():
        def score(name: str) -> tuple[float, str]:
            value = float(means.get(name, math.nan))
            return (-value if math.isfinite(value) else math.inf, name)
        kept |= set(sorted(names, key=score)[:kept_count(len(names), keep)])
    return kept
