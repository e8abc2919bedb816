"""Number formatting shared by the verdict sentences, the figures and the tables."""

from __future__ import annotations

import math
from typing import Any

from dpalign.diagnostics.trends import Estimate

__all__ = ["NO_DP", "estimate_text", "format_epsilon", "format_number", "is_number"]

NO_DP = "∞ (no DP)"
"""How a non-private point (epsilon = inf) is named everywhere in the report."""


def is_number(value: Any) -> bool:
    """A real number (bools excluded), NaN and ±inf included."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_number(value: Any) -> str:
    """Three significant digits (``0.667``, ``45``, ``0.0012``), thousands as integers
    (``1,234``), ``—`` for NaN/None, ``∞`` for inf; bools and strings as they are."""
    if value is None:
        return "—"
    if not is_number(value):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def format_epsilon(epsilon: float) -> str:
    """``ε=2`` for a private point, :data:`NO_DP` for epsilon = inf."""
    return NO_DP if math.isinf(epsilon) else f"ε={epsilon:g}"


def estimate_text(estimate: Estimate) -> str:
    """``0.67 [0.33, 1] (n=3)``; ``not measured`` when there is no value."""
    if not estimate.measured:
        return "not measured"
    return (f"{format_number(estimate.mean)} [{format_number(estimate.low)}, "
            f"{format_number(estimate.high)}] (n={estimate.n})")
