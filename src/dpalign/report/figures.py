"""The report's figures, drawn with matplotlib's object API (Agg canvas, no pyplot state).

Every builder takes the loaded study (or run) and returns a :class:`FigureOut` holding PNG
bytes, or ``None`` when the study lacks what the figure shows (e.g. no DP runs, a single
mechanism). Epsilon is drawn on a log axis with the non-private point placed to the right of
a dotted break and labelled "∞ (no DP)".
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from dpalign.report.fmt import format_epsilon
from dpalign.report.load import RunInput, StudyInput
from dpalign.report.series import (
    GRID_FIELDS,
    MECHANISM_NAMES,
    METRICS,
    Cell,
    Estimate,
    Series,
    epsilon_series,
    ok_runs,
)

__all__ = ["RUN_FIGURES", "STUDY_FIGURES", "EpsilonScale", "FigureOut", "epsilon_scale",
           "run_figures", "study_figures"]

DPI = 100
FRACTIONS = frozenset({"diverged", "converged"})
MAX_CURVE_ROWS = 6
EMA_DECAY = 0.9
"""Smoothing of single-run curves (bias-corrected EMA, as TensorBoard's 0.9)."""
DODGE = 1.04
"""Horizontal spread (a factor on the log epsilon axis) between series drawn on one panel."""
LOG_Y = frozenset({"loss_volatility", "mean_noise_to_signal"})
"""Metrics that may span orders of magnitude: a log y axis when they do."""
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")
_STEP = "optimizer step"


@dataclass(frozen=True)
class FigureOut:
    """One rendered figure: file stem ``name``, a ``title``, a ``caption`` and PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _new_figure(nrows: int, ncols: int, width: float = 6.0,
                height: float = 3.8) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


# ---------------------------------------------------------------- the epsilon axis


@dataclass(frozen=True)
class EpsilonScale:
    """Where each epsilon goes on a log x axis: finite values at themselves, inf at
    ``inf_at`` (4x the largest finite epsilon) beyond a dotted break."""

    finite: tuple[float, ...]
    has_inf: bool
    inf_at: float

    def x(self, epsilon: float) -> float:
        return self.inf_at if math.isinf(epsilon) else epsilon

    def apply(self, ax: Axes) -> None:
        """Log scale, one tick per grid epsilon, the "∞ (no DP)" tick and the break mark."""
        ax.set_xscale("log")
        ticks = [*self.finite] + ([self.inf_at] if self.has_inf else [])
        labels = [f"{e:g}" for e in self.finite] + (["∞\n(no DP)"] if self.has_inf else [])
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        if self.finite and self.has_inf:
            cut = math.sqrt(self.finite[-1] * self.inf_at)
            ax.axvline(cut, color="0.55", linestyle=(0, (2, 2)), linewidth=0.9)
            ax.text(cut, 0.0, "//", transform=ax.get_xaxis_transform(), ha="center",
                    va="center", fontsize=10, color="0.35",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        low = self.finite[0] if self.finite else self.inf_at
        ax.set_xlim(low / 1.7, self.x(math.inf if self.has_inf else low) * 1.7)
        ax.set_xlabel("target privacy budget ε (log scale; ← more noise)")


def epsilon_scale(epsilons: Iterable[float]) -> EpsilonScale:
    """The :class:`EpsilonScale` for the given grid epsilons."""
    values = list(epsilons)
    finite = tuple(sorted({e for e in values if math.isfinite(e)}))
    return EpsilonScale(finite, any(math.isinf(e) for e in values),
                        finite[-1] * 4.0 if finite else 1.0)


def _yerr(estimates: Sequence[Estimate]) -> np.ndarray:
    """Shape (2, n): distances from each mean down to its CI low and up to its CI high."""
    down = [max(e.mean - e.low, 0.0) for e in estimates]
    up = [max(e.high - e.mean, 0.0) for e in estimates]
    return np.nan_to_num(np.array([down, up], dtype=float))


def _plot_over_epsilon(ax: Axes, scale: EpsilonScale, cells: Sequence[Cell], key: str,
                       style: Mapping[str, object], label: str, dodge: float = 1.0) -> bool:
    """Means with CI error bars at each cell's epsilon (times ``dodge``, so overlapping
    series stay apart); a solid line through the private points, a dotted one across the
    break to the non-private point. False if none measured."""
    points = sorted(((c.epsilon, c.get(key)) for c in cells if c.get(key).measured),
                    key=lambda p: p[0])
    if not points:
        return False
    xs = np.array([scale.x(e) * dodge for e, _ in points])
    ests = [est for _, est in points]
    means = np.array([est.mean for est in ests])
    private = np.array([math.isfinite(e) for e, _ in points])
    color, marker = style["color"], style["marker"]
    ax.errorbar(xs, means, yerr=_yerr(ests), color=color, marker=marker, linestyle="none",
                capsize=3, markersize=5, label=label)
    ax.plot(xs[private], means[private], color=color, linestyle=style["linestyle"])
    if private.any() and not private.all():
        last = np.flatnonzero(private)[-1]
        ax.plot([xs[last], xs[-1]], [means[last], means[-1]], color=color, linestyle=":",
                linewidth=1)
    return True


def _log_y(ax: Axes) -> None:
    """Log y axis with plain tick labels (0.01, 0.1, 1, 2) instead of powers of ten."""
    ax.set_yscale("log")
    ax.set_ylabel(ax.get_ylabel() + " (log scale)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _log_y_if_wide(ax: Axes, decades: float = 1.3) -> None:
    """A log y axis when the plotted positive values span more than ``decades`` decades."""
    low, high = ax.dataLim.intervaly
    if low > 0 and math.log10(high / low) > decades:
        _log_y(ax)


SCALES: dict[str, Callable[[Axes], None]] = {"linear": lambda ax: ax.set_yscale("linear"),
                                              "log": _log_y_if_wide}
"""Y-axis treatment per panel kind, applied after the data is drawn."""


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
        return {"color": colors[s.group[color_by]], "linestyle": _LINESTYLES[i % 4],
                "marker": _MARKERS[i % len(_MARKERS)]}

    return style


def _varying_field(series: Sequence[Series], skip: str) -> str | None:
    """The first grid coordinate other than ``skip`` that differs between the series."""
    return next((name for name in GRID_FIELDS
                 if name != skip and len({s.group[name] for s in series}) > 1), None)


def _metric_panels(series: Sequence[Series], keys: Sequence[str],
                   style: Callable[[Series], dict[str, object]]) -> Figure:
    """One panel per metric in ``keys``, each series a line over epsilon with CI bars."""
    ncols = min(2, len(keys))
    fig, axes = _new_figure(math.ceil(len(keys) / ncols), ncols)
    scale = epsilon_scale(c.epsilon for s in series for c in s.cells)
    for ax, key in zip(axes.ravel(), keys, strict=False):
        drawn = [_plot_over_epsilon(ax, scale, s.cells, key, style(s), s.label,
                                    DODGE ** (i - (len(series) - 1) / 2))
                 for i, s in enumerate(series)]
        scale.apply(ax)
        metric = METRICS[key]
        ax.set_title(metric.label[0].upper() + metric.label[1:])
        ax.set_ylabel(metric.unit)
        ax.grid(alpha=0.3)
        if key in FRACTIONS:
            ax.set_ylim(-0.05, 1.05)
        if key in LOG_Y and any(drawn):
            _log_y_if_wide(ax)
        if not any(drawn):
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center",
                    color="0.4")
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    _figure_legend(fig, axes.ravel(), "mean ± 95% CI")
    return fig


def _figure_legend(fig: Figure, axes: Iterable[Axes], title: str) -> None:
    """One legend for the whole figure (labels of all panels, first occurrence kept)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper",
                   fontsize=8, title=title, title_fontsize=8)


# ---------------------------------------------------------------- study figures


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


def _robust_ylim(ax: Axes, values: Sequence[np.ndarray]) -> None:
    """Y limits from the 1st-99th percentile of the plotted values (a diverging seed does
    not flatten the others)."""
    flat = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if flat.size == 0:
        return
    low, high = np.percentile(flat, [1, 99])
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.05
    ax.set_ylim(low - pad, high + pad)


_CURVES = (("loss", "training loss (nats)"), ("reward_margin", "reward margin (nats)"))


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
    for ax, (column, unit) in zip(axes, _CURVES, strict=True):
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
        _robust_ylim(ax, stable or [m for _, m, _ in drawn])
        for steps, mean, color in drawn:
            _mark_off_scale(ax, steps, mean, color)
        ax.set_title(f"{s.label}: {column.replace('_', ' ')}")
        ax.set_xlabel(_STEP)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, title="mean ± std over seeds", title_fontsize=8)


def training_curves(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Loss and reward margin vs step per epsilon, mean ± std over seeds, one row per K."""
    series = epsilon_series(cells)[:MAX_CURVE_ROWS]
    if not study.logs or not series:
        return None
    fig, axes = _new_figure(len(series), 2, height=3.4)
    for row, s in zip(axes, series, strict=True):
        _curve_row(row, study, s)
    return FigureOut("curves", "Training curves",
                     "Training loss and reward margin per optimizer step: line = mean over "
                     "seeds, band = ± one standard deviation; one color per ε (black: no DP).",
                     _png(fig))


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
                     "seeds, bar = 95% bootstrap CI; one line per K.",
                     _png(_metric_panels(series, _STABILITY, style)))


def privacy_utility(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """The privacy-utility (hallucination) frontier: POPE-adversarial accuracy and CHAIR_s."""
    series = epsilon_series(cells)
    keys = ("final_pope_adversarial_accuracy", "final_chair_s")
    if not any(c.get(k).measured for c in cells for k in keys):
        return None
    style = _styler(series, "k", _varying_field(series, "k"))
    return FigureOut("frontier", "Privacy-utility frontier (hallucination)",
                     "Final POPE-adversarial accuracy (higher is better) and CHAIR_s (lower is "
                     "better) against ε; mean and 95% CI over seeds, one line per K.",
                     _png(_metric_panels(series, keys, style)))


def _smooth(values: pd.Series) -> pd.Series:
    """Rolling mean over ~2% of the steps (at least 1) to show the trend of noisy signals."""
    window = max(1, len(values) // 50)
    return values.rolling(window, min_periods=1, center=True).mean()


_DP_SIGNALS = (("dp_clip_fraction", "clip fraction (fraction of pairs clipped)", "linear"),
               ("dp_noise_to_signal", "noise-to-signal (noise std / ‖mean clipped grad‖)",
                "log"))


def dp_signals(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Clip fraction and noise-to-signal vs step, mean over seeds per DP grid point."""
    private = [c for c in cells if c.private]
    frames = {c.point: _point_frames(study, c.point) for c in private}
    if not any(column in f for fs in frames.values() for f in fs for column, _, _ in
               _DP_SIGNALS):
        return None
    colors = _epsilon_colors(c.epsilon for c in private)
    ks = sorted({c.k for c in private})
    fig, axes = _new_figure(1, 2)
    for ax, (column, unit, yscale) in zip(axes[0], _DP_SIGNALS, strict=True):
        for cell in sorted(private, key=lambda c: (c.k, -c.epsilon)):
            band = _band(frames[cell.point], column)
            if band is None:
                continue
            steps, mean, _ = band
            ax.plot(steps, _smooth(pd.Series(mean)).to_numpy(), color=colors[cell.epsilon],
                    linestyle=_LINESTYLES[ks.index(cell.k) % 4], linewidth=1.2,
                    label=f"{MECHANISM_NAMES.get(cell.mechanism, cell.mechanism)}, "
                          f"{format_epsilon(cell.epsilon)}, K={cell.k}")
        SCALES[yscale](ax)
        ax.set_xlabel(_STEP)
        ax.set_ylabel(unit)
        ax.set_title(unit.split(" (")[0].capitalize() + " vs step")
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0], "mean over seeds (smoothed)")
    return FigureOut("dp_signals", "Clipping and noise during training",
                     "Fraction of pairs whose gradient was clipped, and the ratio of noise std "
                     "to the mean clipped gradient's norm, per step (rolling mean over ~2% of "
                     "the steps, mean over seeds); color = ε, line style = K.", _png(fig))


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
                         _png(_metric_panels(series, _COMPARED, style)))

    return build


STUDY_FIGURES: dict[str, Callable[[StudyInput, Sequence[Cell]], FigureOut | None]] = {
    "curves": training_curves,
    "stability": stability_vs_epsilon,
    "frontier": privacy_utility,
    "dp_signals": dp_signals,
    "mechanisms": _comparison("mechanism", "mechanisms", "DP-SGD vs label-DP",
                              "Privacy mechanisms compared"),
    "losses": _comparison("loss", "losses", "Alignment losses compared (e.g. DPO vs mDPO)",
                          "Losses compared"),
}
"""Study figures in page order; a builder returning ``None`` is left out."""


def study_figures(study: StudyInput, cells: Sequence[Cell]) -> list[FigureOut]:
    """Every study figure that applies."""
    built = (build(study, cells) for build in STUDY_FIGURES.values())
    return [figure for figure in built if figure is not None]


# ---------------------------------------------------------------- single-run figures


def _raw_and_ema(ax: Axes, frame: pd.DataFrame, column: str, color: str) -> bool:
    if column not in frame or frame[column].notna().sum() == 0:
        return False
    values = frame[column].dropna()
    ax.plot(values.index, values.to_numpy(), color=color, alpha=0.3, linewidth=0.8,
            label="per step")
    ax.plot(values.index, values.ewm(alpha=1 - EMA_DECAY).mean().to_numpy(), color=color,
            linewidth=1.6, label=f"EMA (decay {EMA_DECAY:g})")
    return True


def _run_panels(run: RunInput, columns: Sequence[tuple[str, str, str]], name: str,
                title: str, caption: str) -> FigureOut | None:
    present = [c for c in columns if c[0] in run.metrics and run.metrics[c[0]].notna().any()]
    if not present:
        return None
    fig, axes = _new_figure(1, len(present))
    for ax, (column, unit, yscale) in zip(axes[0], present, strict=True):
        _raw_and_ema(ax, run.metrics, column, "tab:blue")
        SCALES[yscale](ax)
        if yscale == "linear":
            _robust_ylim(ax, [run.metrics[column].to_numpy(dtype=float)])
        ax.set_xlabel(_STEP)
        ax.set_ylabel(unit)
        ax.set_title(unit.split(" (")[0].capitalize())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return FigureOut(name, title, caption, _png(fig))


def run_curves(run: RunInput) -> FigureOut | None:
    """Loss and reward margin vs step (per step and EMA-smoothed)."""
    columns = [(c, unit, "linear") for c, unit in _CURVES]
    return _run_panels(run, columns, "curves", "Training curves",
                       "Training loss and reward margin per optimizer step (thin) and their "
                       "exponential moving average (decay 0.9, thick).")


def run_dp_signals(run: RunInput) -> FigureOut | None:
    """Clip fraction and noise-to-signal vs step (DP runs only)."""
    return _run_panels(run, _DP_SIGNALS, "dp_signals", "Clipping and noise during training",
                       "Fraction of pairs clipped and noise std over the mean clipped "
                       "gradient's norm, per step (thin) and EMA-smoothed (thick).")


_RUN_EVALS = ("heldout_reward_accuracy", "pope_adversarial_accuracy", "chair_s")


def run_evals(run: RunInput) -> FigureOut | None:
    """Held-out reward accuracy, POPE-adversarial accuracy and CHAIR_s per evaluation."""
    frame = pd.DataFrame(run.evals)
    keys = [k for k in _RUN_EVALS if k in frame]
    if frame.empty or not keys:
        return None
    frame = frame.sort_values("step")
    fig, axes = _new_figure(1, 1, width=7.0)
    ax = axes[0][0]
    for key, marker in zip(keys, _MARKERS, strict=False):
        ax.plot(frame["step"], frame[key], marker=marker, label=METRICS[f"final_{key}"].label
                .removeprefix("final "))
    ax.set_xlabel(_STEP)
    ax.set_ylabel("fraction (accuracy, or captions hallucinating)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return FigureOut("evals", "Evaluations during training",
                     "Held-out reward accuracy and POPE-adversarial accuracy (higher is better) "
                     "and CHAIR_s (lower is better) at each evaluation step.", _png(fig))


RUN_FIGURES: dict[str, Callable[[RunInput], FigureOut | None]] = {
    "curves": run_curves,
    "dp_signals": run_dp_signals,
    "evals": run_evals,
}
"""Single-run figures in page order."""


def run_figures(run: RunInput) -> list[FigureOut]:
    """Every single-run figure that applies."""
    built = (build(run) for build in RUN_FIGURES.values())
    return [figure for figure in built if figure is not None]
