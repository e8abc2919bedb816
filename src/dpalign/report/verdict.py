"""The answer, in sentences generated from the numbers (pure functions, no I/O).

The rules that decide every sentence (trend, breakpoint) and their settings
(:class:`~dpalign.diagnostics.trends.VerdictThresholds`) live in
:mod:`dpalign.diagnostics.trends`; this module turns their results into sentences. A
breakpoint's point is named by its epsilon and its mean noise-to-signal ratio, with CIs and
seed counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dpalign.diagnostics.trends import (
    Breakpoint,
    Estimate,
    Trend,
    VerdictThresholds,
    find_breakpoint,
    trend,
)
from dpalign.report.fmt import estimate_text, format_epsilon, format_number
from dpalign.report.series import METRICS, Cell, Series, epsilon_series, k_series

__all__ = [
    "AXES",
    "CRITERIA",
    "KIND_WORDS",
    "QUESTIONS",
    "VERDICT_DEFAULTS",
    "Axis",
    "Verdict",
    "breakpoint_sentence",
    "describe_rules",
    "glance",
    "run_summary",
    "study_verdicts",
    "trend_sentence",
]


VERDICT_DEFAULTS = VerdictThresholds()
"""The rules' default settings."""


@dataclass(frozen=True)
class Verdict:
    """One question and the sentences that answer it."""

    question: str
    sentences: tuple[str, ...]


# ---------------------------------------------------------------- trend


@dataclass(frozen=True)
class Axis:
    """How sentences name a series' coordinate."""

    name: str
    phrase: str
    point: Callable[[float], str]


AXES: dict[str, Axis] = {
    "epsilon": Axis("ε", "as ε decreases (more noise)", lambda x: f"at {format_epsilon(x)}"),
    "k": Axis("K", "as K grows (more shots)", lambda x: f"at K={x:g}"),
}

_TREND_TEXT: dict[str, str] = {
    "rises": "{metric} rises {phrase}: {start} → {end} ({rho})",
    "falls": "{metric} falls {phrase}: {start} → {end} ({rho})",
    "non_monotone": "{metric} changes non-monotonically {phrase}: the end points differ "
                    "({start} vs {end}) but {rho}",
    "no_clear_change": "{metric} shows no clear change {phrase}: the 95% CIs {start} and "
                       "{end} overlap ({rho})",
    "too_few_seeds": "{metric} cannot be judged {phrase}: fewer than {min_seeds} seeds at "
                     "an end point ({start}; {end})",
    "too_few_points": "{metric} is measured at only one {axis} value: {start}",
}


def _end_text(axis: Axis, end: tuple[float, Estimate] | None) -> str:
    return "nowhere" if end is None else f"{estimate_text(end[1])} {axis.point(end[0])}"


def _rho_text(t: Trend, axis: Axis) -> str:
    rho = "undefined" if math.isnan(t.rho) else f"{t.rho:+.2f}"
    return f"Spearman ρ={rho} over {t.n_points} {axis.name} values"


def trend_sentence(label: str, metric_key: str, along: str, t: Trend,
                   thresholds: VerdictThresholds = VERDICT_DEFAULTS) -> str:
    """``K=8: divergence rate rises as ε decreases (more noise): 0 [0, 0] (n=3) at ∞ (no DP)
    → 1 [1, 1] (n=3) at ε=1 (Spearman ρ=+1.00 over 3 ε values).``"""
    axis = AXES[along]
    body = _TREND_TEXT[t.kind].format(
        metric=METRICS[metric_key].label, phrase=axis.phrase, axis=axis.name,
        start=_end_text(axis, t.start), end=_end_text(axis, t.end), rho=_rho_text(t, axis),
        min_seeds=thresholds.min_seeds)
    return f"{label}: {body}."


# ---------------------------------------------------------------- breakpoint


@dataclass(frozen=True)
class Criterion:
    """How sentences name one of :data:`~dpalign.diagnostics.trends.BREAK_RULES`: ``rule``
    states it, ``shows(cell, baseline, t)`` gives the numbers behind it."""

    rule: Callable[[VerdictThresholds], str]
    shows: Callable[[Cell, Cell, VerdictThresholds], str]


def _baseline_name(baseline: Cell) -> str:
    return format_epsilon(baseline.epsilon) if baseline.private else "no-DP"


CRITERIA: dict[str, Criterion] = {
    "divergence": Criterion(
        rule=lambda t: f"divergence rate ≥ {t.divergence_rate:g}",
        shows=lambda c, b, t: (f"divergence rate {estimate_text(c.get('diverged'))} ≥ "
                               f"{t.divergence_rate:g}")),
    "volatility": Criterion(
        rule=lambda t: f"loss volatility > {t.volatility_ratio:g}× the non-private baseline",
        shows=lambda c, b, t: (f"loss volatility {estimate_text(c.get('loss_volatility'))}"
                               f" > {t.volatility_ratio:g}× the {_baseline_name(b)} baseline's "
                               f"{format_number(b.get('loss_volatility').mean)}")),
}
"""The words for each of :data:`~dpalign.diagnostics.trends.BREAK_RULES`, in its order."""


def _where(cell: Cell) -> str:
    """``ε=2 (σ 1.3; mean noise-to-signal 1.8 [1.5, 2.1] (n=3))``."""
    if not cell.private:
        return format_epsilon(cell.epsilon)
    nts = cell.get("mean_noise_to_signal")
    sigma = cell.get("sigma")
    extra = [f"σ {format_number(sigma.mean)}"] if sigma.measured else []
    extra += [f"mean noise-to-signal {estimate_text(nts)}"] if nts.measured else []
    return f"{format_epsilon(cell.epsilon)}" + (f" ({'; '.join(extra)})" if extra else "")


def _stable_note(previous: Cell | None) -> str:
    """`` (still stable at ε=8: mean noise-to-signal 0.27)`` for the point before a crossing."""
    if previous is None:
        return ""
    if not previous.private:
        return " (stable without DP)"
    nts = previous.get("mean_noise_to_signal")
    ratio = f": mean noise-to-signal {format_number(nts.mean)}" if nts.measured else ""
    return f" (still stable at {format_epsilon(previous.epsilon)}{ratio})"


def breakpoint_sentence(label: str, b: Breakpoint[Cell],
                        thresholds: VerdictThresholds = VERDICT_DEFAULTS) -> str:
    """The breakpoint of one series: where stability first breaks and why, then where each
    further criterion is first crossed."""
    if b.broken is None:
        rules = " or ".join(CRITERIA[name].rule(thresholds) for name in CRITERIA)
        return (f"{label}: stable down to {_where(b.smallest)}: no point crosses {rules} "
                f"(baseline {format_epsilon(b.baseline.epsilon)}: divergence rate "
                f"{estimate_text(b.baseline.get('diverged'))}, loss volatility "
                f"{estimate_text(b.baseline.get('loss_volatility'))}).")
    first = [c for c in b.crossings if c.cell is b.broken]
    shown = " and ".join(CRITERIA[c.name].shows(c.cell, b.baseline, thresholds)
                         for c in first)
    if b.broken is b.baseline:
        head = f"{label}: unstable already without DP: {shown}."
    else:
        head = (f"{label}: stability breaks at {_where(b.broken)}, where {shown}"
                f"{_stable_note(first[0].previous)}.")
    later = [f" {_capital(CRITERIA[c.name].shows(c.cell, b.baseline, thresholds))} from "
             f"{_where(c.cell)}." for c in b.crossings if c.cell is not b.broken]
    return head + "".join(later)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------- the verdict of a study


QUESTIONS: dict[str, tuple[str, ...]] = {
    "Divergence": ("diverged",),
    "Loss volatility": ("loss_volatility",),
    "Steps to converge": ("steps_to_target", "converged"),
    "Final held-out reward accuracy": ("final_heldout_reward_accuracy",),
    "Hallucination (POPE adversarial, CHAIR)": ("final_pope_adversarial_accuracy",
                                                "final_chair_s"),
}
"""Each question and the metrics whose trends answer it."""


def _multi(series: Sequence[Series]) -> list[Series]:
    return [s for s in series if len(s.cells) > 1]


def _coordinates(s: Series) -> list[float]:
    return [c.epsilon if s.along == "epsilon" else c.k for c in s.cells]


def _trends(key: str, series: Sequence[Series],
            thresholds: VerdictThresholds) -> list[tuple[Series, Trend]]:
    """The trend of metric ``key`` along every series where it is measured somewhere."""
    return [(s, trend(_coordinates(s), [c.get(key) for c in s.cells], thresholds))
            for s in series if any(c.get(key).measured for c in s.cells)]


_UNCLEAR = {"no_clear_change": "shows no clear change",
            "too_few_seeds": "cannot be judged (fewer than {min_seeds} seeds at an end point)"}


def _merged_sentence(key: str, along: str, kind: str, labels: Sequence[str],
                     thresholds: VerdictThresholds) -> str:
    """One sentence for several series whose trend is unclear in the same way."""
    verb = _UNCLEAR[kind].format(min_seeds=thresholds.min_seeds)
    metric = METRICS[key].label
    return (f"{metric[0].upper()}{metric[1:]} {verb} {AXES[along].phrase} at "
            f"{'; '.join(labels)} (end points' 95% CIs in the grid-point table).")


def _question(keys: Sequence[str], by_epsilon: Sequence[Series], by_k: Sequence[Series],
              thresholds: VerdictThresholds) -> tuple[str, ...]:
    """For each metric in ``keys``: one sentence per epsilon series (per K), then one per K
    series (per epsilon) whose trend is clear, and one merged sentence for the K series
    without a clear trend."""
    sentences = []
    for key in keys:
        sentences += [trend_sentence(s.label, key, "epsilon", t, thresholds)
                      for s, t in _trends(key, by_epsilon, thresholds)]
        unclear: dict[str, list[str]] = {}
        for s, t in _trends(key, by_k, thresholds):
            if t.kind in _UNCLEAR:
                unclear.setdefault(t.kind, []).append(s.label)
            else:
                sentences.append(trend_sentence(s.label, key, "k", t, thresholds))
        sentences += [_merged_sentence(key, "k", kind, labels, thresholds)
                      for kind, labels in unclear.items()]
    return tuple(sentences)


def study_verdicts(cells: Sequence[Cell],
                   thresholds: VerdictThresholds = VERDICT_DEFAULTS) -> list[Verdict]:
    """The answer to each of :data:`QUESTIONS` (over epsilon per K, then over K per epsilon),
    then where stability breaks along each epsilon series."""
    by_epsilon, by_k = _multi(epsilon_series(cells)), _multi(k_series(cells))
    verdicts = []
    for question, keys in QUESTIONS.items():
        sentences = _question(keys, by_epsilon, by_k, thresholds)
        if not sentences:
            sentences = (f"Not measured: no series has two or more grid points with "
                         f"{' or '.join(METRICS[k].label for k in keys)}.",)
        verdicts.append(Verdict(question, sentences))
    breaks = tuple(breakpoint_sentence(s.label, find_breakpoint(s.cells, thresholds),
                                       thresholds) for s in epsilon_series(cells))
    verdicts.append(Verdict("Where stability breaks", breaks))
    return verdicts


KIND_WORDS: dict[str, str] = {
    "rises": "↑ rises", "falls": "↓ falls", "non_monotone": "↕ non-monotone",
    "no_clear_change": "no clear change", "too_few_seeds": "too few seeds",
    "too_few_points": "n/a",
}
"""How the at-a-glance table names each :class:`Trend` kind."""


def glance(cells: Sequence[Cell], thresholds: VerdictThresholds = VERDICT_DEFAULTS
           ) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The epsilon trends as a matrix: column labels (one per epsilon series, i.e. per K)
    and one row per question metric with the :data:`KIND_WORDS` of its trend in each."""
    series = _multi(epsilon_series(cells))
    rows = []
    for keys in QUESTIONS.values():
        for key in keys:
            kinds = [trend(_coordinates(s), [c.get(key) for c in s.cells], thresholds).kind
                     for s in series]
            if any(kind != "too_few_points" for kind in kinds):
                rows.append((METRICS[key].label, [KIND_WORDS[kind] for kind in kinds]))
    return [s.label for s in series], rows


def describe_rules(thresholds: VerdictThresholds = VERDICT_DEFAULTS) -> list[str]:
    """The rules behind the sentences, stated with their thresholds."""
    return [
        "Intervals are 95% percentile-bootstrap CIs of the mean over seeds; n is the number "
        "of seeds behind a value (failed runs excluded).",
        f"A trend is clear when both end points of a series have ≥ {thresholds.min_seeds} "
        "seeds and their CIs do not overlap; otherwise it is reported as no clear change. "
        "Spearman's ρ of the means along the series gives the shape (monotone or not).",
        "Stability breaks at the first point, walking from no DP towards smaller ε, where "
        + " or ".join(rule.rule(thresholds) for rule in CRITERIA.values())
        + " (the baseline is the non-private point of the same K, else the least-private "
        "one). That point is named by its ε and its mean noise-to-signal ratio.",
    ]


# ---------------------------------------------------------------- a single run


_FINAL_KEYS = ("final_heldout_reward_accuracy", "final_pope_adversarial_accuracy",
               "final_chair_s")


def _final_line(d: Mapping[str, float]) -> str | None:
    """``Final held-out reward accuracy 0.9, POPE-adversarial accuracy 0.66, CHAIR_s 0.02.``"""
    present = [k for k in _FINAL_KEYS if k in d]
    if not present:
        return None
    return "Final " + ", ".join(f"{METRICS[k].label.removeprefix('final ')} "
                                f"{format_number(d[k])}" for k in present) + "."


_RUN_LINES: tuple[tuple[str, Callable[[Mapping[str, float]], str | None]], ...] = (
    ("divergence", lambda d: (f"Diverged at step {format_number(d['diverged_step'])} "
                              f"({d['diverged_reason']}) of {d['n_steps']} steps."
                              if d.get("diverged") else
                              f"Did not diverge in {d['n_steps']} steps.")),
    ("volatility", lambda d: f"Loss volatility {format_number(d['loss_volatility'])} "
                             f"(std of the EMA-smoothed loss's per-step change, nats)."),
    ("target", lambda d: ("Never reached the target held-out reward accuracy."
                          if math.isnan(d["steps_to_target"]) else
                          f"Reached the target held-out reward accuracy at step "
                          f"{format_number(d['steps_to_target'])}.")),
    ("privacy", lambda d: None if math.isinf(d["epsilon"]) else
     (f"ε spent {format_number(d['epsilon'])}; mean clip fraction "
      f"{format_number(d['mean_clip_fraction'])}; mean noise-to-signal "
      f"{format_number(d['mean_noise_to_signal'])}.")),
    ("final", lambda d: _final_line(d)),
)


def run_summary(diagnostics: Mapping[str, float]) -> list[str]:
    """Sentences about one run from its :meth:`RunDiagnostics.as_dict` row."""
    lines = (make(diagnostics) for _, make in _RUN_LINES)
    return [line for line in lines if line is not None]
