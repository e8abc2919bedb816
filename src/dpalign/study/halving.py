"""Successive halving over a study's configurations (pure functions over the runs table).

A tuning group is the runs that share (mechanism, epsilon, K, loss); its configurations are
its grid points. After the first rung (every point with the first seeds), a group keeps its
``ceil(keep x n)`` best points by the mean of the tuning metric over their finished runs;
only those run the other seeds. Ties and missing values: a point with no finished run, or
a NaN mean, ranks last; equal means keep the point that sorts first by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from dpalign.study.grid import Point

GROUP = ("mechanism", "epsilon", "k", "loss")


def _group(p: Point) -> tuple[str, float, int, str]:
    return p.mechanism, p.epsilon, p.k, p.loss


def kept_count(n_points: int, keep: float) -> int:
    """How many of a group's ``n_points`` configurations go on: ``ceil(keep n)``, >= 1."""
    return max(1, math.ceil(keep * n_points - 1e-9))


def promoted(points: Sequence[Point], runs: pd.DataFrame, metric: str, keep: float
             ) -> set[str]:
    """The grid points (names without the seed) that run the remaining seeds.

    ``runs``: the first rung's rows (``point``, ``status``, ``metric``). Each group of
    ``points`` keeps ``kept_count`` points, best mean ``metric`` first."""
    ok = runs[runs["status"] == "ok"]
    means = (ok.groupby("point")[metric].mean() if metric in ok.columns and len(ok)
             else pd.Series(dtype=float))
    groups: dict[tuple[str, float, int, str], set[str]] = {}
    for p in points:
        groups.setdefault(_group(p), set()).add(p.point)
    kept: set[str] = set()
    for names in groups.values():
        def score(name: str) -> tuple[float, str]:
            value = float(means.get(name, math.nan))
            return (-value if math.isfinite(value) else math.inf, name)
        kept |= set(sorted(names, key=score)[:kept_count(len(names), keep)])
    return kept
