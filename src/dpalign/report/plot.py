"""Plot helpers shared by the study and run figures, drawn with matplotlib's object API
(Agg canvas, no pyplot state): the :class:`FigureOut` every builder returns, figure and PNG
plumbing, the epsilon axis (log scale, the non-private point to the right of a dotted break,
labelled "∞ (no DP)"), y-axis treatments and the step-log columns both pages draw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from dpalign.diagnostics.trends import Estimate
from dpalign.report.series import Cell

__all__ = ["CURVES", "DPI", "DP_SIGNALS", "LINESTYLES", "MARKERS", "SCALES", "STEP_LABEL",
           "EpsilonScale", "FigureOut", "epsilon_scale", "figure_legend", "log_y_if_wide",
           "new_figure", "plot_over_epsilon", "robust_ylim", "to_png"]

DPI = 100
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
STEP_LABEL = "optimizer step"


@dataclass(frozen=True)
class FigureOut:
    """One rendered figure: file stem ``name``, a ``title``, a ``caption`` and PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def new_figure(nrows: int, ncols: int, width: float = 6.0,
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


def plot_over_epsilon(ax: Axes, scale: EpsilonScale, cells: Sequence[Cell], key: str,
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


def log_y_if_wide(ax: Axes, decades: float = 1.3) -> None:
    """A log y axis when the plotted positive values span more than ``decades`` decades."""
    low, high = ax.dataLim.intervaly
    if low > 0 and math.log10(high / low) > decades:
        _log_y(ax)


SCALES: dict[str, Callable[[Axes], None]] = {"linear": lambda ax: ax.set_yscale("linear"),
                                              "log": log_y_if_wide}
"""Y-axis treatment per panel kind, applied after the data is drawn."""


def figure_legend(fig: Figure, axes: Iterable[Axes], title: str) -> None:
    """One legend for the whole figure (labels of all panels, first occurrence kept)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper",
                   fontsize=8, title=title, title_fontsize=8)


def robust_ylim(ax: Axes, values: Sequence[np.ndarray]) -> None:
    """Y limits from the 1st-99th percentile of the plotted values (a diverging seed does
    not flatten the others)."""
    flat = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if flat.size == 0:
        return
    low, high = np.percentile(flat, [1, 99])
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.05
    ax.set_ylim(low - pad, high + pad)


CURVES = (("loss", "training loss (nats)"), ("reward_margin", "reward margin (nats)"))

DP_SIGNALS = (("dp_clip_fraction", "clip fraction (fraction of pairs clipped)", "linear"),
              ("dp_noise_to_signal", "noise-to-signal (noise std / ‖mean clipped grad‖)",
               "log"))


