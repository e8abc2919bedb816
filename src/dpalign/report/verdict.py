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
from typing import Any

from dpalign.diagnostics.run import Thresholds
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
    "run_finding_rules",
    "run_findings",
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
    "no_clear_change": "{metric} shows no clear trend {phrase}: the 95% CIs {start} and "
                       "{end} overlap ({rho})",
    "no_clear_trend": "{metric} shows no clear trend {phrase}: the end points' 95% CIs "
                      "separate ({start} vs {end}) but |ρ| < {min_rho:g} ({rho})",
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
        min_seeds=thresholds.min_seeds, min_rho=thresholds.min_rho)
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


_UNCLEAR = {"no_clear_change": "shows no clear trend (end points' CIs overlap)",
            "no_clear_trend": "shows no clear trend (|ρ| < {min_rho:g})",
            "too_few_seeds": "cannot be judged (fewer than {min_seeds} seeds at an end point)"}


def _merged_sentence(key: str, along: str, kind: str, labels: Sequence[str],
                     thresholds: VerdictThresholds) -> str:
    """One sentence for several series whose trend is unclear in the same way."""
    verb = _UNCLEAR[kind].format(min_seeds=thresholds.min_seeds, min_rho=thresholds.min_rho)
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
    "no_clear_change": "no clear trend", "no_clear_trend": "no clear trend",
    "too_few_seeds": "too few seeds",
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
        f"A trend is called only when both end points of a series have ≥ "
        f"{thresholds.min_seeds} seeds, their 95% CIs do not overlap AND |Spearman ρ| ≥ "
        f"{thresholds.min_rho:g} (ρ of the means against their order along the series); "
        "everything else is reported as no clear trend.",
        "Stability breaks at the first point, walking from no DP towards smaller ε, where "
        + " or ".join(rule.rule(thresholds) for rule in CRITERIA.values())
        + " (the baseline is the non-private point of the same K, else the least-private "
        "one). That point is named by its ε and its mean noise-to-signal ratio.",
    ]


# ---------------------------------------------------------------- a single run


def _num(d: Mapping[str, Any], key: str) -> float:
    """``d[key]`` as a float; NaN when absent, null or not a number."""
    value = d.get(key)
    try:
        return math.nan if value is None or isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return math.nan


def _flag(d: Mapping[str, Any], key: str) -> bool:
    """``d[key]`` is set and true (absent, null and NaN are not)."""
    value = d.get(key)
    return value is not None and not (isinstance(value, float) and math.isnan(value)) \
        and bool(value)


def _did_not_move(d: Mapping[str, Any]) -> bool:
    """The row says ``moved`` is false (rows without a ``moved`` column moved)."""
    value = d.get("moved")
    return value is not None and not (isinstance(value, float) and math.isnan(value)) \
        and not bool(value)


def _since(d: Mapping[str, Any], key: str) -> tuple[float, str] | None:
    """The value to compare ``final_<key>`` with: the step-0 evaluation's, else the base
    model's; with the words naming it. ``None`` when neither is measured."""
    for prefix, words in (("initial_", "at step 0"), ("base_", "for the base model")):
        value = _num(d, prefix + key)
        if math.isfinite(value):
            return value, words
    return None


def _not_moved_line(d: Mapping[str, Any]) -> str | None:
    """``The run did not move: final held-out reward margin 0.001, training loss 0.693 →
    0.692.``"""
    if not _did_not_move(d):
        return None
    margin, start, end = (_num(d, k) for k in ("final_heldout_reward_margin", "loss_start",
                                               "loss_end"))
    parts = [f"final held-out reward margin {format_number(margin)}"] * math.isfinite(margin)
    parts += [f"training loss {format_number(start)} → {format_number(end)}"] * (
        math.isfinite(start) and math.isfinite(end))
    return "The run did not move" + (": " + ", ".join(parts) if parts else "") + "."


def _collapsed_line(d: Mapping[str, Any]) -> str | None:
    """``Held-out reward accuracy peaked at 0.91 (step 10) and ended at 0.73:
    over-optimised.``"""
    if not _flag(d, "collapsed"):
        return None
    best_step = _num(d, "heldout_best_step")
    at = f" (step {format_number(best_step)})" if math.isfinite(best_step) else ""
    line = (f"Held-out reward accuracy peaked at "
            f"{format_number(_num(d, 'best_heldout_reward_accuracy'))}{at} and ended at "
            f"{format_number(_num(d, 'final_heldout_reward_accuracy'))}: over-optimised.")
    val_drop = _num(d, "val_drop")
    if math.isfinite(val_drop):
        line += (f" On the validation part it fell {format_number(val_drop)} from its peak "
                 f"to {format_number(_num(d, 'final_val_reward_accuracy'))}.")
    return line


def _change_text(d: Mapping[str, Any], key: str, name: str) -> str | None:
    """``F1 fell from 0.72 at step 0 to 0.25`` (or ``F1 0.25`` with nothing to compare)."""
    final = _num(d, f"final_{key}")
    if not math.isfinite(final):
        return None
    since = _since(d, key)
    if since is None:
        return f"{name} {format_number(final)}"
    verb = "fell" if final < since[0] else "rose" if final > since[0] else "stayed"
    if verb == "stayed":
        return f"{name} stayed at {format_number(final)} ({since[1]} too)"
    return f"{name} {verb} from {format_number(since[0])} {since[1]} to {format_number(final)}"


def _silenced_lines(d: Mapping[str, Any]) -> list[str]:
    """``POPE-adversarial yes-ratio 0.135: the model mostly answers 'no'; F1 fell to 0.25.``
    and/or the caption-recall collapse against the base model."""
    if not _flag(d, "silenced"):
        return []
    lines = []
    yes = _num(d, "final_pope_adversarial_yes_ratio")
    if _flag(d, "pope_one_way") and math.isfinite(yes):
        since = _since(d, "pope_adversarial_yes_ratio")
        was = f" ({format_number(since[0])} {since[1]})" if since else ""
        answer = "no" if yes < 0.5 else "yes"
        f1 = _change_text(d, "pope_adversarial_f1", "F1")
        lines.append(f"POPE-adversarial yes-ratio {format_number(yes)}{was}: the model mostly "
                     f"answers '{answer}'" + (f"; {f1}" if f1 else "") + ".")
    if _flag(d, "recall_collapsed"):
        lines.append(f"Caption object recall fell to {format_number(_num(d, 'final_recall'))}, "
                     f"{format_number(_num(d, 'recall_ratio'))}× the base model's "
                     f"{format_number(_num(d, 'base_recall'))}: the captions stop naming "
                     f"the objects in the image.")
    return lines


def run_findings(d: Mapping[str, Any]) -> list[str]:
    """What a run's stability numbers can hide, said first: it did not move, its held-out
    accuracy collapsed after a peak, or its model answers one way / stopped naming objects
    (from the ``moved``, ``collapsed``, ``silenced`` columns of
    :meth:`~dpalign.diagnostics.RunDiagnostics.as_dict`; none when they are absent)."""
    lines = [_not_moved_line(d), _collapsed_line(d)]
    return [line for line in lines if line is not None] + _silenced_lines(d)


_RUN_DEFAULTS = Thresholds()


def run_finding_rules(thresholds: Thresholds = _RUN_DEFAULTS) -> str:
    """How the findings of :func:`run_findings` are decided, with their thresholds."""
    t = thresholds
    return (f"A run did not move when its final {t.margin_key} is below {t.margin_floor:g} in "
            f"size and its EMA-smoothed training loss ended within {t.loss_change_floor:g} of "
            f"its first value (either alone when the other is not logged); then it is not "
            f"said to reach the target, and a target evaluation counts only with a margin ≥ "
            f"{t.margin_floor:g}. A run is over-optimised when its final {t.collapse_key} is "
            f"more than {t.collapse_drop:g} below its best evaluation. A run is silenced when "
            f"its final {t.yes_ratio_key} is outside [{t.yes_ratio_low:g}, "
            f"{t.yes_ratio_high:g}] (it answers POPE one way) or, against a base model, its "
            f"caption object recall is below {t.recall_fraction:g}× the base model's.")


_FINAL_LABELS: dict[str, str] = {
    "heldout_reward_accuracy": "held-out reward accuracy",
    "heldout_reward_margin": "held-out reward margin",
    "pope_adversarial_accuracy": "POPE-adversarial accuracy",
    "pope_adversarial_f1": "POPE-adversarial F1",
    "pope_adversarial_yes_ratio": "POPE-adversarial yes-ratio",
    "chair_s": "CHAIR_s",
    "recall": "caption object recall",
}


def _final_line(d: Mapping[str, Any]) -> str | None:
    """``Final held-out reward accuracy 0.9, POPE-adversarial accuracy 0.66 (0.7 at step 0),
    CHAIR_s 0.02.``: the final evaluation's headline figures, each with its step-0 (else
    base-model) value when the run has one."""
    parts = []
    for key, label in _FINAL_LABELS.items():
        if f"final_{key}" not in d:
            continue
        since = _since(d, key)
        was = f" ({format_number(since[0])} {since[1]})" if since else ""
        parts.append(f"{label} {format_number(d[f'final_{key}'])}{was}")
    return "Final " + ", ".join(parts) + "." if parts else None


def _target_line(d: Mapping[str, Any]) -> str | None:
    """Steps to the target; nothing for a run that did not move (its finding says so)."""
    if _did_not_move(d):
        return None
    if math.isnan(_num(d, "steps_to_target")):
        return "Never reached the target held-out reward accuracy."
    return (f"Reached the target held-out reward accuracy at step "
            f"{format_number(d['steps_to_target'])}.")


_RUN_LINES: tuple[tuple[str, Callable[[Mapping[str, Any]], str | None]], ...] = (
    ("divergence", lambda d: (f"Diverged at step {format_number(d['diverged_step'])} "
                              f"({d['diverged_reason']}) of {d['n_steps']} steps."
                              if d.get("diverged") else
                              f"Did not diverge in {d['n_steps']} steps.")),
    ("volatility", lambda d: f"Loss volatility {format_number(d['loss_volatility'])} "
                             f"(std of the EMA-smoothed loss's per-step change, nats)."),
    ("target", _target_line),
    ("privacy", lambda d: None if math.isinf(d["epsilon"]) else
     (f"ε spent {format_number(d['epsilon'])}; mean clip fraction "
      f"{format_number(d['mean_clip_fraction'])}; mean noise-to-signal "
      f"{format_number(d['mean_noise_to_signal'])}.")),
    ("final", _final_line),
)


def run_summary(diagnostics: Mapping[str, Any]) -> list[str]:
    """Sentences about one run from its :meth:`RunDiagnostics.as_dict` row: the findings of
    :func:`run_findings` first, then divergence, volatility, the target (not for a run that
    did not move), privacy and the final figures."""
    lines = (make(diagnostics) for _, make in _RUN_LINES)
    return run_findings(diagnostics) + [line for line in lines if line is not None]
