"""The answer, in sentences generated from the numbers (pure functions, no I/O).

Two rules decide every sentence; their settings live in :class:`VerdictThresholds`.

**Trend** (:func:`trend`): walk a :class:`~dpalign.report.series.Series` in its reading
order (epsilon from no DP down to the smallest epsilon, i.e. more noise; K from few to many
shots) and compare its two end points. The change is *clear* when both ends have at least
``min_seeds`` seeds and their 95% bootstrap CIs do not overlap; then the metric "rises" or
"falls" (or "changes non-monotonically" when Spearman's rho along the series has the other
sign); otherwise there is "no clear change". Spearman's rho of the means against the position
along the series is reported as the shape of the trend.

**Breakpoint** (:func:`find_breakpoint`): walking an epsilon series towards more noise,
stability breaks at the first point where the divergence rate is ``>= divergence_rate``
(default 0.5) or the mean loss volatility is ``> volatility_ratio`` (default 2) times that of
the non-private baseline (the least-private point when the study has no baseline). The point
is named by its epsilon and its mean noise-to-signal ratio, with CIs and seed counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from dpalign.report.fmt import format_epsilon, format_number
from dpalign.report.series import METRICS, Cell, Estimate, Series, epsilon_series, k_series

__all__ = [
    "AXES",
    "CRITERIA",
    "KIND_WORDS",
    "QUESTIONS",
    "Axis",
    "Breakpoint",
    "Crossing",
    "Trend",
    "Verdict",
    "VerdictThresholds",
    "breakpoint_sentence",
    "describe_rules",
    "find_breakpoint",
    "glance",
    "intervals_overlap",
    "run_summary",
    "spearman",
    "study_verdicts",
    "trend",
    "trend_sentence",
]


@dataclass(frozen=True)
class VerdictThresholds:
    """The settings of the two rules (see the module docstring)."""

    divergence_rate: float = 0.5
    volatility_ratio: float = 2.0
    min_seeds: int = 2


@dataclass(frozen=True)
class Verdict:
    """One question and the sentences that answer it."""

    question: str
    sentences: tuple[str, ...]


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
    ``non_monotone``, ``no_clear_change``, ``too_few_seeds``, ``too_few_points``; ``start``
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
    else:
        sign = 1.0 if end[1].mean > start[1].mean else -1.0
        kind = ("non_monotone" if not math.isnan(rho) and rho * sign <= 0
                else {1.0: "rises", -1.0: "falls"}[sign])
    return Trend(kind, start, end, rho, len(kept))


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
    return "nowhere" if end is None else f"{end[1].text()} {axis.point(end[0])}"


def _rho_text(t: Trend, axis: Axis) -> str:
    rho = "undefined" if math.isnan(t.rho) else f"{t.rho:+.2f}"
    return f"Spearman ρ={rho} over {t.n_points} {axis.name} values"


def trend_sentence(label: str, metric_key: str, along: str, t: Trend,
                   thresholds: VerdictThresholds = VerdictThresholds()) -> str:
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
    """One way stability breaks: ``rule`` states it, ``fires(cell, baseline, t)`` tests a
    point, ``shows(cell, baseline, t)`` gives the numbers behind it."""

    rule: Callable[[VerdictThresholds], str]
    fires: Callable[[Cell, Cell, VerdictThresholds], bool]
    shows: Callable[[Cell, Cell, VerdictThresholds], str]


def _baseline_name(baseline: Cell) -> str:
    return format_epsilon(baseline.epsilon) if baseline.private else "no-DP"


def _volatility_fires(cell: Cell, baseline: Cell, t: VerdictThresholds) -> bool:
    base = baseline.get("loss_volatility").mean
    value = cell.get("loss_volatility").mean
    return cell is not baseline and base > 0 and value > t.volatility_ratio * base


CRITERIA: dict[str, Criterion] = {
    "divergence": Criterion(
        rule=lambda t: f"divergence rate ≥ {t.divergence_rate:g}",
        fires=lambda c, b, t: c.get("diverged").mean >= t.divergence_rate,
        shows=lambda c, b, t: (f"divergence rate {c.get('diverged').text()} ≥ "
                               f"{t.divergence_rate:g}")),
    "volatility": Criterion(
        rule=lambda t: f"loss volatility > {t.volatility_ratio:g}× the non-private baseline",
        fires=_volatility_fires,
        shows=lambda c, b, t: (f"loss volatility {c.get('loss_volatility').text()} > "
                               f"{t.volatility_ratio:g}× the {_baseline_name(b)} baseline's "
                               f"{format_number(b.get('loss_volatility').mean)}")),
}
"""The stability criteria, each checked at every point of an epsilon series."""


@dataclass(frozen=True)
class Crossing:
    """The first point of a series meeting criterion ``name``; ``previous`` is the point
    just before it in the walk (``None`` when it is the first)."""

    name: str
    cell: Cell
    previous: Cell | None


@dataclass(frozen=True)
class Breakpoint:
    """Where an epsilon series breaks: the first crossing of each of :data:`CRITERIA` in walk
    order (``crossings`` is empty when the series stays stable). ``broken`` is the first
    point that crosses any criterion."""

    baseline: Cell
    crossings: tuple[Crossing, ...]
    smallest: Cell

    @property
    def broken(self) -> Cell | None:
        return self.crossings[0].cell if self.crossings else None


def find_breakpoint(cells: Sequence[Cell],
                    thresholds: VerdictThresholds = VerdictThresholds()) -> Breakpoint:
    """Walk ``cells`` (an epsilon series in reading order: no DP first) and record, for each
    of :data:`CRITERIA`, the first point meeting it. The baseline is the first non-private
    point, else the first point."""
    baseline = next((c for c in cells if not c.private), cells[0])
    crossings = []
    for name, rule in CRITERIA.items():
        hit = next((i for i, c in enumerate(cells) if rule.fires(c, baseline, thresholds)),
                   None)
        if hit is not None:
            crossings.append((hit, Crossing(name, cells[hit], cells[hit - 1] if hit else None)))
    ordered = tuple(c for _, c in sorted(crossings, key=lambda pair: pair[0]))
    return Breakpoint(baseline, ordered, cells[-1])


def _where(cell: Cell) -> str:
    """``ε=2 (σ 1.3; mean noise-to-signal 1.8 [1.5, 2.1] (n=3))``."""
    if not cell.private:
        return format_epsilon(cell.epsilon)
    nts = cell.get("mean_noise_to_signal")
    sigma = cell.get("sigma")
    extra = [f"σ {format_number(sigma.mean)}"] if sigma.measured else []
    extra += [f"mean noise-to-signal {nts.text()}"] if nts.measured else []
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


def breakpoint_sentence(label: str, b: Breakpoint,
                        thresholds: VerdictThresholds = VerdictThresholds()) -> str:
    """The breakpoint of one series: where stability first breaks and why, then where each
    further criterion is first crossed."""
    if b.broken is None:
        rules = " or ".join(CRITERIA[name].rule(thresholds) for name in CRITERIA)
        return (f"{label}: stable down to {_where(b.smallest)}: no point crosses {rules} "
                f"(baseline {format_epsilon(b.baseline.epsilon)}: divergence rate "
                f"{b.baseline.get('diverged').text()}, loss volatility "
                f"{b.baseline.get('loss_volatility').text()}).")
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
                   thresholds: VerdictThresholds = VerdictThresholds()) -> list[Verdict]:
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


def glance(cells: Sequence[Cell], thresholds: VerdictThresholds = VerdictThresholds()
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


def describe_rules(thresholds: VerdictThresholds = VerdictThresholds()) -> list[str]:
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
