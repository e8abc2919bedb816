"""The run page plots what is measured: its smoothed curves are the loss-volatility
diagnostic's EMA of the same logged values, so the volatility reported is the std of the
step-to-step change of the thick line drawn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from report_fixtures import Recipe, write_run

from dpalign.diagnostics import diagnose_run_dir, ema
from dpalign.report.load import RunInput, load_input
from dpalign.report.run_figures import EMA_DECAY, EMA_LABEL, plot_raw_and_ema, run_figures
from dpalign.rundir import RunDir


def _run(tmp_path: Path) -> RunInput:
    path = tmp_path / "run"
    write_run(path, Recipe(diverge_below=2.0, noisy=True), epsilon=1.0, k=8, seed=0,
              mechanism="dp_sgd", loss="dpo")
    run = load_input(path)
    assert isinstance(run, RunInput)
    return run


def _finite_losses(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of the logged finite losses, in step order, as the diagnostic reads
    them."""
    rows = sorted(RunDir(path).read_metrics(), key=lambda row: row["step"])
    kept = [(r["step"], float(r["loss"])) for r in rows
            if r.get("loss") is not None and math.isfinite(float(r["loss"]))]
    return np.array([s for s, _ in kept]), np.array([x for _, x in kept])


def test_the_plotted_ema_is_the_diagnostics_ema_of_the_logged_loss(tmp_path: Path) -> None:
    run = _run(tmp_path)
    ax = Figure().subplots()
    assert plot_raw_and_ema(ax, run.metrics, "loss", "tab:blue")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"per step", EMA_LABEL}
    steps, losses = _finite_losses(run.path)
    smooth = lines[EMA_LABEL]
    np.testing.assert_array_equal(smooth.get_xdata(), steps)
    np.testing.assert_allclose(smooth.get_ydata(), ema(losses, EMA_DECAY), rtol=0, atol=1e-12)
    volatility = diagnose_run_dir(run.path).as_dict()["loss_volatility"]
    assert math.isclose(np.std(np.diff(smooth.get_ydata())), volatility, rel_tol=1e-12)


def test_the_ema_label_says_what_it_is() -> None:
    assert EMA_LABEL == "trend-started EMA (decay 0.9), as loss volatility smooths"


def test_run_figure_names_are_unchanged(tmp_path: Path) -> None:
    assert [f.name for f in run_figures(_run(tmp_path))] == ["curves", "dp_signals", "evals"]
