"""Across the seeds of one grid point: mean, spread and a bootstrap interval per column.

Input rows are flat dicts such as :meth:`dpalign.diagnostics.RunDiagnostics.as_dict`, one per
seed. A value counts as numeric when it is a real number (bools as 0/1); ``None`` or a missing
key is "not measured" (NaN) and dropped from that column's statistics.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["aggregate", "bootstrap_ci", "numeric_keys", "summarize"]

Row = Mapping[str, Any]

DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples per interval: Monte-Carlo error of a 95% bound ~1% of its width."""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real | np.bool_)


def bootstrap_ci(values: Iterable[float], *, level: float = 0.95,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval ``(low, high)`` for the mean of ``values``.

    NaNs are dropped, leaving ``x`` (n,). Resample ``x`` with replacement ``n_resamples``
    times (``scipy.stats.bootstrap``, ``method="percentile"``, generator
    ``np.random.default_rng(seed)``) and return the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled means. Degenerate cases return
    ``(mean, mean)``: one value, all values equal, or a ±inf among them (then the mean is
    ±inf or NaN); no values give ``(nan, nan)``.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1 or not np.isfinite(x).all() or (x == x[0]).all():
        with np.errstate(invalid="ignore"):
            mean = float(x.mean())
        return mean, mean
    from scipy.stats import bootstrap  # scipy comes with dp-accounting; imported on first use

    result = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=level,
                       method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def summarize(values: Iterable[float], *, level: float = 0.95,
              n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """``{"mean", "std", "ci_low", "ci_high", "n"}`` of the non-NaN ``values``.

    ``std`` is the sample standard deviation (ddof=1; NaN with fewer than 2 values, NaN when
    a value is ±inf); ``mean`` is NaN with no values; the interval is :func:`bootstrap_ci`.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    with np.errstate(invalid="ignore"):
        mean = float(x.mean()) if x.size else math.nan
        std = float(x.std(ddof=1)) if x.size >= 2 else math.nan
    low, high = bootstrap_ci(x, level=level, n_resamples=n_resamples, seed=seed)
    return {"mean": mean, "std": std, "ci_low": low, "ci_high": high, "n": int(x.size)}


def numeric_keys(rows: Sequence[Row]) -> list[str]:
    """Keys (first-seen order) whose every non-None value over ``rows`` is a number."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return [key for key in keys
            if all(_is_number(row[key]) for row in rows if row.get(key) is not None)]


def _column(rows: Sequence[Row], key: str) -> np.ndarray:
    """Shape (len(rows),): ``key`` per row as float; missing, None or non-numbers -> NaN."""
    return np.array([float(row[key]) if _is_number(row.get(key)) else math.nan
                     for row in rows], dtype=float)


def _rate(rows: Sequence[Row], key: str, hit: Any) -> float:
    """Fraction of the rows holding ``key`` (None included) for which ``hit(value)``;
    NaN when no row holds ``key``."""
    held = [row[key] for row in rows if key in row]
    return sum(map(bool, map(hit, held))) / len(held) if held else math.nan


def _reached(value: Any) -> bool:
    """``steps_to_target`` was reached: a number that is not NaN (None / NaN mean never)."""
    return _is_number(value) and not math.isnan(float(value))


def aggregate(rows: Sequence[Row], *, keys: Sequence[str] | None = None, level: float = 0.95,
              n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """Summary of one grid point's runs (one row per seed) as one flat dict.

    For every key in ``keys`` (default :func:`numeric_keys`): ``<key>_mean``, ``<key>_std``,
    ``<key>_ci_low``, ``<key>_ci_high``, ``<key>_n`` from :func:`summarize` (NaN/None
    dropped; bools as 0/1). Plus:

    - ``n_runs``: ``len(rows)``;
    - ``divergence_rate``: fraction of the rows holding ``diverged`` whose value is truthy;
    - ``converged_fraction``: fraction of the rows holding ``steps_to_target`` whose value is
      a number other than NaN (None/NaN = target never reached).

    The two rates are NaN when no row holds the key.
    """
    chosen = numeric_keys(rows) if keys is None else list(keys)
    out: dict[str, float] = {"n_runs": len(rows)}
    for key in chosen:
        stats = summarize(_column(rows, key), level=level, n_resamples=n_resamples, seed=seed)
        out.update({f"{key}_{name}": value for name, value in stats.items()})
    out["divergence_rate"] = _rate(rows, "diverged", lambda v: v)
    out["converged_fraction"] = _rate(rows, "steps_to_target", _reached)
    return out
