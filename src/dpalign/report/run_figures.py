"""The run page's figures: training curves and DP signals per step (with the same EMA the
loss-volatility diagnostic smooths with), the evaluations during training, and an audited
run's canary scores (``audit/scores.png``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from matplotlib.axes import Axes

from dpalign.diagnostics import Thresholds, ema
from dpalign.report.audit import run_audit_figure
from dpalign.report.load import RunInput
from dpalign.report.plot import (
    CURVES,
    DP_SIGNALS,
    MARKERS,
    SCALES,
    STEP_LABEL,
    FigureOut,
    new_figure,
    robust_ylim,
    to_png,
)
from dpalign.report.series import METRICS

__all__ = ["EMA_DECAY", "EMA_LABEL", "RUN_FIGURES", "ema_series", "plot_raw_and_ema",
           "run_curves", "run_dp_signals", "run_evals", "run_figures"]

EMA_DECAY = Thresholds().ema_decay
"""The decay of the run diagnostics' EMA (their default :class:`Thresholds`, as the run page
diagnoses the run with)."""
EMA_LABEL = f"trend-started EMA (decay {EMA_DECAY:g}), as loss volatility smooths"


def ema_series(values: pd.Series, decay: float = EMA_DECAY) -> pd.Series:
    """The logged values of one column (NaN dropped, in step order) smoothed with the
    diagnostics' :func:`~dpalign.diagnostics.ema`, indexed by step."""
    logged = values.dropna()
    return pd.Series(ema(logged.to_numpy(dtype=float), decay), index=logged.index)


def plot_raw_and_ema(ax: Axes, frame: pd.DataFrame, column: str, color: str) -> bool:
    """Draw ``frame[column]`` per step (thin) and its :func:`ema_series` (thick) on ``ax``;
    False (nothing drawn) when the column is absent or never logged."""
    if column not in frame or frame[column].notna().sum() == 0:
        return False
    values = frame[column].dropna()
    ax.plot(values.index, values.to_numpy(), color=color, alpha=0.3, linewidth=0.8,
            label="per step")
    smooth = ema_series(values)
    ax.plot(smooth.index, smooth.to_numpy(), color=color, linewidth=1.6, label=EMA_LABEL)
    return True


def _run_panels(run: RunInput, columns: Sequence[tuple[str, str, str]], name: str,
                title: str, caption: str) -> FigureOut | None:
    present = [c for c in columns if c[0] in run.metrics and run.metrics[c[0]].notna().any()]
    if not present:
        return None
    fig, axes = new_figure(1, len(present))
    for ax, (column, unit, yscale) in zip(axes[0], present, strict=True):
        plot_raw_and_ema(ax, run.metrics, column, "tab:blue")
        SCALES[yscale](ax)
        if yscale == "linear":
            robust_ylim(ax, [run.metrics[column].to_numpy(dtype=float)])
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(unit)
        ax.set_title(unit.split(" (")[0].capitalize())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return FigureOut(name, title, caption, to_png(fig))


def run_curves(run: RunInput) -> FigureOut | None:
    """Loss and reward margin vs step (per step and EMA-smoothed)."""
    columns = [(c, unit, "linear") for c, unit in CURVES]
    return _run_panels(run, columns, "curves", "Training curves",
                       "Training loss and reward margin per optimizer step (thin) and their "
                       "trend-started exponential moving average (decay 0.9, thick; the "
                       "smoothing the loss-volatility diagnostic uses).")


def run_dp_signals(run: RunInput) -> FigureOut | None:
    """Clip fraction and noise-to-signal vs step (DP runs only)."""
    return _run_panels(run, DP_SIGNALS, "dp_signals", "Clipping and noise during training",
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
    fig, axes = new_figure(1, 1, width=7.0)
    ax = axes[0][0]
    for key, marker in zip(keys, MARKERS, strict=False):
        ax.plot(frame["step"], frame[key], marker=marker, label=METRICS[f"final_{key}"].label
                .removeprefix("final "))
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("fraction (accuracy, or captions hallucinating)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return FigureOut("evals", "Evaluations during training",
                     "Held-out reward accuracy and POPE-adversarial accuracy (higher is better) "
                     "and CHAIR_s (lower is better) at each evaluation step.", to_png(fig))


RUN_FIGURES: dict[str, Callable[[RunInput], FigureOut | None]] = {
    "curves": run_curves,
    "dp_signals": run_dp_signals,
    "evals": run_evals,
    "audit_scores": run_audit_figure,
}
"""Single-run figures in page order."""


def run_figures(run: RunInput) -> list[FigureOut]:
    """Every single-run figure that applies."""
    built = (build(run) for build in RUN_FIGURES.values())
    return [figure for figure in built if figure is not None]
