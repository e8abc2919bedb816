"""The study page's figures: training curves, stability and the privacy-utility frontier
against epsilon, DP signals during training, comparisons of alignment methods (offline vs
online, :mod:`.methods`; RL against a reward model, :mod:`.rl`), mechanisms and losses, and
(audited studies) claimed vs audited epsilon.

Every builder takes the loaded study and its cells and returns a
:class:`~dpalign.report.plot.FigureOut` holding PNG bytes, or ``None`` when the study lacks
what the figure shows (e.g. no DP runs, a single mechanism).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dpalign.report.audit import claimed_vs_audited
from dpalign.report.fmt import format_epsilon
from dpalign.report.load import StudyInput
from dpalign.report.methods import methods_figure
from dpalign.report.plot import (
    CURVES,
    DP_SIGNALS,
    LINESTYLES,
    MARKERS,
    SCALES,
    STEP_LABEL,
    FigureOut,
    epsilon_scale,
    figure_legend,
    log_y_if_wide,
    new_figure,
    plot_over_epsilon,
    robust_ylim,
    to_png,
)
from dpalign.report.rl import rl_figure
from dpalign.report.series import (
    GRID_FIELDS,
    MECHANISM_NAMES,
    METRICS,
    Cell,
    Series,
    epsilon_series,
    ok_runs,
)
from dpalign.study.analysis import CHANCE, OFFLINE, TEST_METRICS, recommendations

__all__ = ["STUDY_FIGURES", "dp_signals", "privacy_utility", "stability_vs_epsilon",
           "study_figures", "training_curves"]

FRACTIONS = frozenset({"diverged", "converged"})
MAX_CURVE_ROWS = 6
DODGE = 1.04
"""Horizontal spread (a factor on the log epsilon axis) between series drawn on one panel."""
LOG_Y = frozenset({"loss_volatility", "mean_noise_to_signal"})
"""Metrics that may span orders of magnitude: a log y axis when they do."""


def _palette(values: Iterable[object]) -> dict[object, object]:
    ordered = sorted(set(values))
    cmap = colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(ordered)}


def _styler(series: Sequence[Series], color_by: str,
            style_by: str | None) -> Callable[[Series], dict[str, object]]:
    """Colors by the ``color_by`` coordinate, line style and marker by ``style_by``."""
    colors = _palette(s.group[color_by] for s in series)
    kinds = sorted({s.group[style_by] for s in series}, key=str) if style_by else []

    def style(s: Series) -> dict[str, object]:
        i = kinds.index(s.group[style_by]) if style_by else 0
        return {"color": colors[s.group[color_by]], "linestyle": LINESTYLES[i % 4],
                "marker": MARKERS[i % len(MARKERS)]}

    return style


def _varying_field(series: Sequence[Series], skip: str) -> str | None:
    """The first grid coordinate other than ``skip`` that differs between the series."""
    return next((name for name in GRID_FIELDS
                 if name != skip and len({s.group[name] for s in series}) > 1), None)


def _metric_panels(series: Sequence[Series], keys: Sequence[str],
                   style: Callable[[Series], dict[str, object]],
                   references: Mapping[str, tuple[float, str]] | None = None) -> Figure:
    """One panel per metric in ``keys``, each series a line over epsilon with CI bars;
    ``references[key] = (value, label)`` draws a dotted horizontal reference line (the base
    model's figure, chance)."""
    ncols = min(2, len(keys))
    fig, axes = new_figure(math.ceil(len(keys) / ncols), ncols)
    scale = epsilon_scale(c.epsilon for s in series for c in s.cells)
    for ax, key in zip(axes.ravel(), keys, strict=False):
        drawn = [plot_over_epsilon(ax, scale, s.cells, key, style(s), s.label,
                                    DODGE ** (i - (len(series) - 1) / 2))
                 for i, s in enumerate(series)]
        scale.apply(ax)
        metric = METRICS[key]
        if references and key in references:
            value, label = references[key]
            ax.axhline(value, color="0.3", linestyle=":", linewidth=1.2, label=label)
        ax.set_title(metric.label[0].upper() + metric.label[1:])
        ax.set_ylabel(metric.unit)
        ax.grid(alpha=0.3)
        if key in FRACTIONS:
            ax.set_ylim(-0.05, 1.05)
        if key in LOG_Y and any(drawn):
            log_y_if_wide(ax)
        if not any(drawn):
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center",
                    color="0.4")
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    figure_legend(fig, axes.ravel(), "mean ± 95% CI")
    return fig


def _point_frames(study: StudyInput, point: str) -> list[pd.DataFrame]:
    """Step logs of a grid point's finished runs."""
    runs = ok_runs(study.runs[study.runs["point"] == point])
    return [study.logs[name] for name in runs["run"].astype(str) if name in study.logs]


def _band(frames: Sequence[pd.DataFrame], column: str
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(steps, mean, std)`` of ``column`` across runs, aligned on step; std is the
    population std (0 for one seed). ``None`` when no run logs ``column``."""
    columns = [f[column].rename(i) for i, f in enumerate(frames) if column in f]
    if not columns:
        return None
    table = pd.concat(columns, axis=1)
    return (table.index.to_numpy(), table.mean(axis=1).to_numpy(),
            table.std(axis=1, ddof=0).fillna(0.0).to_numpy())


def _epsilon_colors(epsilons: Iterable[float]) -> dict[float, object]:
    """Private epsilons from dark (small, noisy) to light along viridis; no DP in black."""
    finite = sorted({e for e in epsilons if math.isfinite(e)})
    cmap = colormaps["viridis"]
    colors: dict[float, object] = {
        e: cmap(0.1 + 0.75 * i / max(len(finite) - 1, 1)) for i, e in enumerate(finite)}
    return colors | {math.inf: "black"}


def _mark_off_scale(ax: Axes, steps: np.ndarray, mean: np.ndarray, color: object) -> None:
    """An arrow at the top edge where a mean curve leaves the y range for its longest
    stretch (a diverging run, rather than one noisy step)."""
    above = np.concatenate([[False], mean > ax.get_ylim()[1], [False]])
    edges = np.flatnonzero(np.diff(above.astype(int)))
    if edges.size:
        starts, ends = edges[::2], edges[1::2]
        start = starts[np.argmax(ends - starts)]
        ax.annotate("↑ off scale", (steps[start], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(0, -12), textcoords="offset points", color=color, fontsize=8,
                    ha="center")


def _curve_row(axes: Sequence[Axes], study: StudyInput, s: Series) -> None:
    """Loss and reward margin of one series; y limits from its non-diverging points (a
    diverging mean curve runs off the top, marked "↑ off scale")."""
    colors = _epsilon_colors(c.epsilon for c in s.cells)
    for ax, (column, unit) in zip(axes, CURVES, strict=True):
        drawn, stable = [], []
        for cell in s.cells:
            frames = _point_frames(study, cell.point)
            band = _band(frames, column)
            if band is None:
                continue
            steps, mean, std = band
            color = colors[cell.epsilon]
            ax.plot(steps, mean, color=color, linewidth=1.3,
                    label=f"{format_epsilon(cell.epsilon)} (n={len(frames)})")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18,
                            linewidth=0)
            drawn.append((steps, mean, color))
            if not cell.get("diverged").mean > 0:
                stable += [mean - std, mean + std]
        robust_ylim(ax, stable or [m for _, m, _ in drawn])
        for steps, mean, color in drawn:
            _mark_off_scale(ax, steps, mean, color)
        ax.set_title(f"{s.label}: {column.replace('_', ' ')}")
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, title="mean ± std over seeds", title_fontsize=8)


def training_curves(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Loss and reward margin vs step per epsilon, mean ± std over seeds, one row per K."""
    series = epsilon_series(cells)[:MAX_CURVE_ROWS]
    if not study.logs or not series:
        return None
    fig, axes = new_figure(len(series), 2, height=3.4)
    for row, s in zip(axes, series, strict=True):
        _curve_row(row, study, s)
    return FigureOut("curves", "Training curves",
                     "Training loss and reward margin per optimizer step: line = mean over "
                     "seeds, band = ± one standard deviation; one color per ε (black: no DP).",
                     to_png(fig))


_STABILITY = ("diverged", "loss_volatility", "steps_to_target",
              "final_heldout_reward_accuracy")


def stability_vs_epsilon(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Each stability metric vs epsilon, one line per K, with 95% CI bars."""
    series = epsilon_series(cells)
    if not series:
        return None
    style = _styler(series, "k", _varying_field(series, "k"))
    return FigureOut("stability", "Stability vs privacy budget",
                     "Divergence rate, loss volatility, steps to reach the target held-out "
                     "reward accuracy and final reward accuracy against ε: marker = mean over "
                     "seeds, bar = 95% bootstrap CI; one line per K; dotted: chance (0.5), "
                     "what the base model's all-tie pairs amount to.",
                     to_png(_metric_panels(series, _STABILITY, style, {
                         "final_heldout_reward_accuracy": (CHANCE, "chance (base model)")})))


def privacy_utility(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """The privacy-utility (hallucination) frontier: POPE-adversarial accuracy and CHAIR_s."""
    series = epsilon_series(cells)
    keys = ("final_pope_adversarial_accuracy", "final_chair_s")
    if not any(c.get(k).measured for c in cells for k in keys):
        return None
    style = _styler(series, "k", _varying_field(series, "k"))
    references = {key: (float(study.base[name]), "base model (untrained)")
                  for key, name in zip(keys, ("pope_adversarial_accuracy", "chair_s"),
                                       strict=True)
                  if isinstance(study.base.get(name), int | float)}
    return FigureOut("frontier", "Privacy-utility frontier (hallucination)",
                     "Final POPE-adversarial accuracy (higher is better) and CHAIR_s (lower is "
                     "better) against ε; mean and 95% CI over seeds, one line per K"
                     + ("; dotted: the untrained base model (base.json)." if references
                        else "."),
                     to_png(_metric_panels(series, keys, style, references)))


def tuned_series(study: StudyInput) -> list[Series]:
    """One series per (mechanism, K, loss, method): the tuned configuration of each epsilon
    (and the tuned no-DP one), its cell holding the test figures (``TEST_METRICS``)."""
    recs = recommendations(study.runs, study.tune, study.base)
    cells: dict[tuple[Any, ...], list[Cell]] = {}
    for rec in recs:
        g = rec.tuned.group
        method = str(g.get("method", OFFLINE))
        cell = Cell(point=rec.tuned.point, mechanism=str(g["mechanism"]),
                    epsilon=float(g["epsilon_target"]), k=int(g["k"]), loss=str(g["loss"]),
                    stats=dict(rec.tuned.test), method=method)
        cells.setdefault((int(g["k"]), str(g["loss"]), method), []).append(cell)
    losses = {loss for _, loss, _ in cells}
    methods = {method for _, _, method in cells}
    out = []
    for (k, loss, method), members in sorted(cells.items()):
        label = (f"K={k}" + (f", {loss}" if len(losses) > 1 else "")
                 + (f", {method}" if len(methods) > 1 else ""))
        mechanism = next((c.mechanism for c in members if c.private), "none")
        out.append(Series("epsilon", {"mechanism": mechanism, "k": k, "loss": loss,
                                      "method": method, "lr": None},
                          tuple(sorted(members, key=lambda c: -c.epsilon)), label))
    return out


def tuned_frontier(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """The answer as a figure: the tuned configuration's TEST figures against epsilon, one
    line per K (the recommendation table's rows)."""
    del cells
    series = tuned_series(study)
    if not any(c.get(TEST_METRICS[0]).measured for s in series for c in s.cells):
        return None
    style = _styler(series, "k", _varying_field(series, "k"))
    references = {TEST_METRICS[0]: (CHANCE, "chance (base model: all ties)")}
    for key, name in zip(TEST_METRICS[1:], ("pope_adversarial_accuracy", "chair_s"),
                         strict=True):
        if isinstance(study.base.get(name), int | float):
            references[key] = (float(study.base[name]), "base model (untrained)")
    return FigureOut("tuned", "The tuned configuration at each ε (the answer)",
                     "Per ε and K, the configuration chosen on the validation pairs: its test "
                     "held-out reward accuracy, POPE-adversarial accuracy and CHAIR_s (mean and "
                     "95% CI over its seeds); dotted: chance and the untrained base model.",
                     to_png(_metric_panels(series, TEST_METRICS, style, references)))


def _smooth(values: pd.Series) -> pd.Series:
    """Rolling mean over ~2% of the steps (at least 1) to show the trend of noisy signals."""
    window = max(1, len(values) // 50)
    return values.rolling(window, min_periods=1, center=True).mean()


def dp_signals(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Clip fraction and noise-to-signal vs step, mean over seeds per DP grid point."""
    private = [c for c in cells if c.private]
    frames = {c.point: _point_frames(study, c.point) for c in private}
    if not any(column in f for fs in frames.values() for f in fs for column, _, _ in
               DP_SIGNALS):
        return None
    colors = _epsilon_colors(c.epsilon for c in private)
    ks = sorted({c.k for c in private})
    fig, axes = new_figure(1, 2)
    for ax, (column, unit, yscale) in zip(axes[0], DP_SIGNALS, strict=True):
        for cell in sorted(private, key=lambda c: (c.k, -c.epsilon)):
            band = _band(frames[cell.point], column)
            if band is None:
                continue
            steps, mean, _ = band
            ax.plot(steps, _smooth(pd.Series(mean)).to_numpy(), color=colors[cell.epsilon],
                    linestyle=LINESTYLES[ks.index(cell.k) % 4], linewidth=1.2,
                    label=f"{MECHANISM_NAMES.get(cell.mechanism, cell.mechanism)}, "
                          f"{format_epsilon(cell.epsilon)}, K={cell.k}")
        SCALES[yscale](ax)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(unit)
        ax.set_title(unit.split(" (")[0].capitalize() + " vs step")
        ax.grid(alpha=0.3)
    figure_legend(fig, axes[0], "mean over seeds (smoothed)")
    return FigureOut("dp_signals", "Clipping and noise during training",
                     "Fraction of pairs whose gradient was clipped, and the ratio of noise std "
                     "to the mean clipped gradient's norm, per step (rolling mean over ~2% of "
                     "the steps, mean over seeds); color = ε, line style = K.", to_png(fig))


_COMPARED = ("diverged", "loss_volatility", "final_heldout_reward_accuracy",
             "final_pope_adversarial_accuracy")


def _comparison(field: str, name: str, title: str, what: str
                ) -> Callable[[StudyInput, Sequence[Cell]], FigureOut | None]:
    """A builder comparing the values of grid coordinate ``field`` (only when the study has
    two or more of them among its private points)."""

    def build(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
        if len({getattr(c, field) for c in cells if c.private}) < 2:
            return None
        series = [s for s in epsilon_series(cells) if any(c.private for c in s.cells)]
        style = _styler(series, field, _varying_field(series, field))
        return FigureOut(name, title,
                         f"{what}: divergence rate, loss volatility, final reward accuracy and "
                         "POPE-adversarial accuracy against ε (mean and 95% CI over seeds); "
                         "color = " + field + ", line style = the other grid coordinate.",
                         to_png(_metric_panels(series, _COMPARED, style)))

    return build


STUDY_FIGURES: dict[str, Callable[[StudyInput, Sequence[Cell]], FigureOut | None]] = {
    "tuned": tuned_frontier,
    "methods": methods_figure,
    "rl": rl_figure,
    "curves": training_curves,
    "stability": stability_vs_epsilon,
    "frontier": privacy_utility,
    "dp_signals": dp_signals,
    "mechanisms": _comparison("mechanism", "mechanisms", "DP-SGD vs label-DP",
                              "Privacy mechanisms compared"),
    "losses": _comparison("loss", "losses", "Alignment losses compared (e.g. DPO vs mDPO)",
                          "Losses compared"),
    "audit": claimed_vs_audited,
}
"""Study figures in page order; a builder returning ``None`` is left out."""


def study_figures(study: StudyInput, cells: Sequence[Cell]) -> list[FigureOut]:
    """Every study figure that applies."""
    built = (build(study, cells) for build in STUDY_FIGURES.values())
    return [figure for figure in built if figure is not None]


