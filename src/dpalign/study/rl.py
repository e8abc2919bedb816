"""Per-run figures of RL against a reward model (``method: rloo | grpo``), recomputed from
the run's step log (``metrics.jsonl``) and ``result.json`` when the study's tables are
collected.

The trainer logs, per step, the mean reward-model score of the step's samples
(``rl_reward``), the mean score of the world's exact judge on the same samples
(``rl_judge``; higher is better), the mean sequence log-ratio to the reference
(``rl_kl``, nats), an entropy estimate (``rl_entropy``: mean per-token negative log-prob of
the sampled tokens) and how many prompts were sampled (``rl_prompts``). Any ``rl_*`` may be
null on a step that sampled no prompt (Poisson sampling); such values are skipped, so
"the logged steps" of a field below are the steps holding a finite value of it (a step
logged twice, a resumed run, counts once: its last row). Per run:

- ``rl_reward_final``, ``rl_judge_final``, ``rl_kl_final``, ``rl_entropy_final``: the mean
  over the last :data:`FINAL_FRACTION` of the field's logged steps (at least one);
- ``rl_entropy_ratio``: ``rl_entropy_final`` / the mean over the *first*
  :data:`FINAL_FRACTION` of the logged steps (NaN when that start is not > 0);
- ``rl_reward_slope``, ``rl_judge_slope``: the least-squares slope of the field against the
  step number (score units per step; NaN with fewer than two logged steps);
- ``rl_hacking`` (1.0 / 0.0, NaN when not measurable): **reward hacking** — the reward
  model's score rises while the judge's falls. Each field's logged steps are cut, in step
  order, into ``min(TREND_BLOCKS, n // 2)`` contiguous blocks of near-equal size (at least
  two steps each); a block's :class:`~dpalign.diagnostics.trends.Estimate` is its mean with a
  95% bootstrap CI over its steps (:func:`dpalign.diagnostics.summarize`). The existing trend
  test (:func:`dpalign.diagnostics.trends.trend`, default
  :class:`~dpalign.diagnostics.trends.VerdictThresholds`) then reads the blocks like an
  epsilon series: a trend is called only when the first and last blocks' CIs do not overlap
  and |Spearman rho| of the block means against block order is >= 0.8. The run hacks when
  the reward's trend is ``rises`` AND the judge's is ``falls``; NaN when either field has
  fewer than four logged steps (fewer than two blocks);
- ``rl_entropy_collapse`` (1.0 / 0.0, NaN when the ratio is NaN): ``rl_entropy_ratio <``
  :data:`ENTROPY_COLLAPSE_RATIO` (0.5): the policy's sampled tokens lost more than half
  their entropy from the start of training to its end.

All NaN for a run whose log has no ``rl_prompts`` value (offline, online, BDHS and reward
model runs). From ``result.json`` (:func:`rl_privacy`): ``total_epsilon`` (the composed
guarantee of the policy and its reward model, ``privacy.total_epsilon``) and
``reward_model_epsilon`` (``privacy.reward_model.epsilon``); NaN when absent (runs other than
RL, whose own ``epsilon`` is their whole guarantee).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dpalign.diagnostics import summarize
from dpalign.diagnostics.trends import Estimate, Trend, trend

__all__ = ["ENTROPY_COLLAPSE_RATIO", "FINAL_FRACTION", "RL_COLUMNS", "RL_PRIVACY_COLUMNS",
           "TREND_BLOCKS", "final_mean", "hacking", "rl_figures", "rl_privacy", "slope",
           "start_mean", "step_trend"]

FINAL_FRACTION = 0.1
"""The share of the last (and, for the entropy ratio, first) logged steps averaged over."""
TREND_BLOCKS = 5
"""How many blocks of consecutive logged steps the hacking rule's trend test reads."""
ENTROPY_COLLAPSE_RATIO = 0.5
"""A run's entropy collapsed when its final entropy is below this x its starting entropy."""
RL_COLUMNS = ("rl_reward_final", "rl_judge_final", "rl_kl_final", "rl_entropy_final",
              "rl_entropy_ratio", "rl_reward_slope", "rl_judge_slope", "rl_hacking",
              "rl_entropy_collapse")
RL_PRIVACY_COLUMNS = ("total_epsilon", "reward_model_epsilon")


def _number(value: Any) -> float:
    """A finite number as float; NaN for anything else (null, bool, inf, text)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding a finite ``key``, in step order."""
    pairs = [(float(r["step"]), v) for r in rows if "step" in r
             and not math.isnan(v := _number(r.get(key)))]
    if not pairs:
        return np.empty(0), np.empty(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, float), np.asarray(values, float)


def _window(n: int) -> int:
    """How many of ``n`` logged steps :data:`FINAL_FRACTION` covers (at least one)."""
    return max(1, math.ceil(FINAL_FRACTION * n - 1e-9))


def final_mean(values: np.ndarray) -> float:
    """Mean of the last :data:`FINAL_FRACTION` of ``values`` (at least one); NaN if empty."""
    return float(values[-_window(values.size):].mean()) if values.size else math.nan


def start_mean(values: np.ndarray) -> float:
    """Mean of the first :data:`FINAL_FRACTION` of ``values`` (at least one); NaN if empty."""
    return float(values[:_window(values.size)].mean()) if values.size else math.nan


def slope(steps: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against ``steps``; NaN with < 2 distinct steps."""
    if steps.size < 2 or np.all(steps == steps[0]):
        return math.nan
    x = steps - steps.mean()
    return float((x * (values - values.mean())).sum() / (x * x).sum())


def step_trend(values: np.ndarray) -> Trend:
    """The trend test of :mod:`dpalign.diagnostics.trends` over blocks of consecutive
    logged steps (see the module docstring); ``too_few_points`` with < 4 values."""
    blocks = min(TREND_BLOCKS, values.size // 2)
    if blocks < 2:
        return Trend("too_few_points", n_points=blocks)
    estimates = []
    for block in np.array_split(values, blocks):
        s = summarize(block)
        estimates.append(Estimate(s["mean"], s["ci_low"], s["ci_high"], int(s["n"])))
    return trend(list(range(blocks)), estimates)


_MEASURED = frozenset({"rises", "falls", "non_monotone", "no_clear_change", "no_clear_trend"})


def hacking(reward: np.ndarray, judge: np.ndarray) -> float:
    """1.0 when the reward model's score rises and the judge's falls (:func:`step_trend`),
    0.0 otherwise, NaN when either trend cannot be tested."""
    up, down = step_trend(reward), step_trend(judge)
    if up.kind not in _MEASURED or down.kind not in _MEASURED:
        return math.nan
    return float(up.kind == "rises" and down.kind == "falls")


def rl_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """:data:`RL_COLUMNS` of one run's step-log rows (see the module docstring)."""
    rows = list({row.get("step", i): row for i, row in enumerate(rows)}.values())
    rows.sort(key=lambda r: _number(r.get("step")))
    if not any(not math.isnan(_number(r.get("rl_prompts"))) for r in rows):
        return dict.fromkeys(RL_COLUMNS, math.nan)
    series = {key: _series(rows, f"rl_{key}") for key in ("reward", "judge", "kl", "entropy")}
    out = {f"rl_{key}_final": final_mean(values) for key, (_, values) in series.items()}
    entropy = series["entropy"][1]
    start = start_mean(entropy)
    ratio = out["rl_entropy_final"] / start if start > 0 else math.nan
    return {**out, "rl_entropy_ratio": ratio,
            "rl_reward_slope": slope(*series["reward"]),
            "rl_judge_slope": slope(*series["judge"]),
            "rl_hacking": hacking(series["reward"][1], series["judge"][1]),
            "rl_entropy_collapse": (math.nan if math.isnan(ratio)
                                    else float(ratio < ENTROPY_COLLAPSE_RATIO))}


def rl_privacy(result: Mapping[str, Any] | None) -> dict[str, float]:
    """:data:`RL_PRIVACY_COLUMNS` of a run's ``result.json`` (NaN where absent; a
    non-private policy's ``total_epsilon`` may be inf)."""
    privacy = (result or {}).get("privacy") or {}
    reward_model = privacy.get("reward_model") or {}

    def number(value: Any) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return math.nan

    return {"total_epsilon": number(privacy.get("total_epsilon")),
            "reward_model_epsilon": number(reward_model.get("epsilon")
                                           if isinstance(reward_model, Mapping) else None)}
