"""Per-run figures of online alignment (``method: online | mixed``), recomputed from the
run's step log (``metrics.jsonl``) when the study's tables are collected.

The trainer logs, per step, how many prompts were answered online (``online_prompts``), how
many of them gave a pair (``online_pairs``; the others were ties), the judge's mean best
score (``online_score_best``) and the step's generation + judging wall time
(``online_seconds``). Per run:

- ``online_pair_yield``: sum ``online_pairs`` / sum ``online_prompts`` (the fraction of
  prompts sampled online that became a training pair);
- ``online_seconds``: sum ``online_seconds`` (the run's time spent generating and judging);
- ``online_score_best_final``: mean ``online_score_best`` over the last
  :data:`FINAL_FRACTION` of the logged steps (at least one), how good the policy's best
  answer is at the end.

All NaN for a run whose log has no online field (offline runs; BDHS, whose rejections are
made before training). RL runs (``method: rloo | grpo``, :mod:`dpalign.study.rl`) log
``online_seconds`` (their generation and scoring time) without ``online_prompts``: theirs is
summed too, the other two stay NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FINAL_FRACTION", "ONLINE_COLUMNS", "online_figures"]

FINAL_FRACTION = 0.1
"""The share of the last logged steps ``online_score_best_final`` averages over."""
ONLINE_COLUMNS = ("online_pair_yield", "online_seconds", "online_score_best_final")


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """``key`` of every row holding a finite number there."""
    out = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            out.append(float(value))
    return out


def online_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """:data:`ONLINE_COLUMNS` of one run's step-log rows (see the module docstring); a step
    logged twice (a resumed run) counts once, its last row."""
    rows = list({row.get("step", i): row for i, row in enumerate(rows)}.values())
    prompts = _values(rows, "online_prompts")
    if not prompts:
        seconds = _values(rows, "online_seconds")  # RL runs: generation + scoring
        return {**dict.fromkeys(ONLINE_COLUMNS, math.nan),
                "online_seconds": sum(seconds) if seconds else math.nan}
    pairs = sum(_values(rows, "online_pairs"))
    logged = [r for r in rows if "online_score_best" in r]
    tail = logged[-max(1, math.ceil(FINAL_FRACTION * len(logged) - 1e-9)):]
    best = _values(tail, "online_score_best")
    return {"online_pair_yield": pairs / sum(prompts) if sum(prompts) else math.nan,
            "online_seconds": sum(_values(rows, "online_seconds")),
            "online_score_best_final": sum(best) / len(best) if best else math.nan}
