"""Convergence-stability diagnostics: per-run summaries (:mod:`.run`), their aggregation
across seeds (:mod:`.aggregate`) and the rules that read trends and breakpoints off the
aggregates (:mod:`.trends`). Pure functions of the rows a run directory holds."""

from dpalign.diagnostics.aggregate import aggregate, bootstrap_ci, numeric_keys, summarize
from dpalign.diagnostics.run import (
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    Divergence,
    RunDiagnostics,
    RunDirError,
    Thresholds,
    best_eval,
    diagnose_run,
    diagnose_run_dir,
    ema,
    final_epsilon,
    final_eval,
    find_divergence,
    kl_drift,
    loss_limit,
    loss_volatility,
    mean_finite,
    steps_to_target,
)

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "Divergence",
    "RunDiagnostics",
    "RunDirError",
    "Thresholds",
    "aggregate",
    "best_eval",
    "bootstrap_ci",
    "diagnose_run",
    "diagnose_run_dir",
    "ema",
    "final_epsilon",
    "final_eval",
    "find_divergence",
    "kl_drift",
    "loss_limit",
    "loss_volatility",
    "mean_finite",
    "numeric_keys",
    "steps_to_target",
    "summarize",
]
