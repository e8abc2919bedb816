"""The study's results: ``runs.parquet`` (a row per run) and ``points.parquet`` (a row per
grid point, aggregated over seeds), both rebuilt from the run directories alone.

``runs.parquet`` columns: the grid's (``run, point, mechanism, epsilon_target, k, loss,
method, seed`` and one per setting axis, named by its dotted key), the run's effective settings
(``dpalign.study.grid.EFFECTIVE``: ``lr``, ``optimizer``, ``batch_size``, ``sample_rate``,
``steps``, ``max_grad_norm``, ``clipping``, ``lora_r``), ``status`` (ok | failed | pending
| pruned), ``error``, ``sigma`` (DP-SGD noise multiplier),
``epsilon`` (spent: DP-SGD's accountant value; label-DP's label-level epsilon, a different
guarantee; inf without noise), ``epsilon_kind`` (example | user | label | none),
``wall_seconds``, the online figures of :data:`dpalign.study.online.ONLINE_COLUMNS`
(``online_pair_yield``, ``online_seconds``, ``online_score_best_final``: NaN for runs
without online steps), the RL figures of :data:`dpalign.study.rl.RL_COLUMNS` and
:data:`dpalign.study.rl.RL_PRIVACY_COLUMNS` (``rl_reward_final``, ``rl_judge_final``,
``rl_kl_final``, ``rl_entropy_final``, ``rl_entropy_ratio``, ``rl_reward_slope``,
``rl_judge_slope``, ``rl_hacking``, ``rl_entropy_collapse``, ``total_epsilon``,
``reward_model_epsilon``: NaN for runs other than RL), ``reward_model_run`` (the run trains a
reward model: ``reward.enabled``; carried to ``points.parquet`` like the grid columns) and
every diagnostic of ``dpalign.diagnostics.RunDiagnostics.as_dict``
(``final_pope_adversarial_accuracy``, ``loss_volatility``, ...). Runs with ``audit.json`` (an
audited study, ``dpalign.audit``) add :data:`AUDIT_COLUMNS` (``audit_claimed_epsilon``: inf
where the claim is infinite, ``audit_epsilon_lower_bound``, ``audit_auc``, ...); NaN in the
rows of runs without one, and absent when no run has one.

``points.parquet``: the grid and effective-setting columns without ``run``/``seed``,
``n_runs``, ``n_failed``, and
``dpalign.diagnostics.aggregate`` over the point's finished runs (``<x>_mean``, ``_std``,
``_ci_low``, ``_ci_high``, ``_n``, ``divergence_rate``, ``converged_fraction``), plus
:data:`POINT_EXTRAS` where their column exists (``audit_epsilon_lower_bound_max``: the
largest audited lower bound over the point's seeds).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dpalign.diagnostics import aggregate
from dpalign.io import atomic_write_bytes
from dpalign.rundir import RunDir
from dpalign.study.grid import EFFECTIVE, Point, effective_settings
from dpalign.study.online import online_figures
from dpalign.study.rl import rl_figures, rl_privacy
from dpalign.train.config import TrainConfig

GRID_COLUMNS = ("point", "mechanism", "epsilon_target", "k", "loss", "method",
                "reward_model_run", *EFFECTIVE)
NOT_AGGREGATED = ("seed", "diverged_step", *GRID_COLUMNS)


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _privacy_columns(result: dict[str, Any]) -> dict[str, Any]:
    privacy = result.get("privacy") or {}
    if "epsilon" in privacy:
        return {"sigma": privacy["sigma"], "epsilon": privacy["epsilon"],
                "epsilon_kind": privacy.get("unit", "example")}
    if "label_epsilon" in privacy:
        return {"sigma": math.nan, "epsilon": privacy["label_epsilon"], "epsilon_kind": "label"}
    return {"sigma": math.nan, "epsilon": math.inf, "epsilon_kind": "none"}


AUDIT_COLUMNS = {  # runs.parquet column -> audit.json key
    "audit_claimed_epsilon": "claimed_epsilon", "audit_epsilon_lower_bound": "epsilon_lower_bound",
    "audit_auc": "auc", "audit_tpr_at_1pct_fpr": "tpr_at_1pct_fpr",
    "audit_consistent": "consistent", "audit_kind": "kind", "audit_canaries": "canaries",
}


def audit_columns(audit: dict[str, Any] | None) -> dict[str, Any]:
    """The :data:`AUDIT_COLUMNS` of a run's ``audit.json`` (``{}`` without one); a claimed
    epsilon of ``null`` (infinite: a non-private run audited as its DP-SGD limit) is inf."""
    if audit is None:
        return {}
    row = {column: audit.get(key) for column, key in AUDIT_COLUMNS.items()}
    claimed = row["audit_claimed_epsilon"]
    return {**row, "audit_claimed_epsilon": math.inf if claimed is None else float(claimed)}


def trains_reward_model(config: TrainConfig) -> bool:
    """Whether the run trains a reward model (``reward.enabled``) rather than a policy."""
    return bool(getattr(getattr(config, "reward", None), "enabled", False))


def run_row(point: Point, run_dir: Path, config: TrainConfig, pruned: bool = False
            ) -> dict[str, Any]:
    """One row of ``runs.parquet`` from a run directory (finished, failed, pending, or
    pruned by successive halving) and the run's config (its effective settings)."""
    row: dict[str, Any] = {**point.columns(), "reward_model_run": trains_reward_model(config),
                           **effective_settings(config),
                           "status": "pruned" if pruned else "pending", "error": None}
    files = RunDir(run_dir)
    error, result = _json(files.error), _json(files.result)
    if error is not None:
        return {**row, "status": "failed", "error": error["error"]}
    if result is None:
        return row
    diagnostics = _json(files.diagnostics) or {}
    steps = files.read_metrics() if files.metrics.is_file() else []
    return {**row, "status": "ok", **_privacy_columns(result),
            "wall_seconds": result.get("wall_seconds"), "stopped": result.get("stopped"),
            **online_figures(steps), **rl_figures(steps), **rl_privacy(result),
            **{k: v for k, v in diagnostics.items() if k != "epsilon"},
            **audit_columns(_json(files.audit))}


def runs_table(points: Sequence[Point], runs_dir: Path, configs: Mapping[str, TrainConfig],
               pruned: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """A row per run; ``configs`` maps run names to their configs, ``pruned`` names the runs
    successive halving did not run."""
    return pd.DataFrame([run_row(p, runs_dir / p.name, configs[p.name], p.name in pruned)
                         for p in points])


def _setting_columns(runs: pd.DataFrame) -> list[str]:
    """Grid and setting columns, constant within a point: carried, not aggregated."""
    return [*(c for c in GRID_COLUMNS if c in runs.columns),
            *(c for c in runs.columns if "." in c)]


POINT_EXTRAS = {  # points.parquet column -> (runs.parquet column, reduction over seeds)
    "audit_epsilon_lower_bound_max": ("audit_epsilon_lower_bound", "max"),
}


def _extras(ok: pd.DataFrame) -> dict[str, Any]:
    """:data:`POINT_EXTRAS` of one point's finished runs (those whose column exists)."""
    return {name: getattr(pd.to_numeric(ok[column], errors="coerce"), how)()
            for name, (column, how) in POINT_EXTRAS.items() if column in ok}


def points_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the finished runs of each grid point over seeds."""
    rows = []
    for _, group in runs.groupby("point", sort=False):
        ok = group[group["status"] == "ok"]
        carried = _setting_columns(runs)
        numeric = [c for c in ok.columns if c not in NOT_AGGREGATED and c not in carried
                   and (pd.api.types.is_numeric_dtype(ok[c]) or pd.api.types.is_bool_dtype(ok[c]))]
        records = ok[numeric].to_dict("records")
        stats = aggregate(records, keys=numeric) if records else {}
        rows.append({**{c: group.iloc[0][c] for c in carried}, **stats, **_extras(ok),
                     "n_runs": len(ok), "n_failed": int((group["status"] == "failed").sum())})
    return pd.DataFrame(rows)


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Atomically write ``frame`` (pyarrow)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return atomic_write_bytes(path, buffer.getvalue())


SUMMARY_COLUMNS = {  # points.parquet column -> summary heading
    "n_runs": "runs", "divergence_rate": "diverged", "loss_volatility_mean": "volatility",
    "converged_fraction": "converged", "steps_to_target_mean": "steps to 0.7",
    "final_heldout_reward_accuracy_mean": "reward acc", "mean_noise_to_signal_mean": "noise/signal",
    "final_pope_adversarial_accuracy_mean": "POPE adv", "final_chair_s_mean": "CHAIR_s",
    "epsilon_mean": "eps spent",
}


def summary_rows(points: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headings and formatted rows of the study summary (one row per grid point)."""
    present = [c for c in SUMMARY_COLUMNS if c in points.columns]
    headings = ["point", *(SUMMARY_COLUMNS[c] for c in present)]

    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return headings, [[str(r["point"]), *(fmt(r[c]) for c in present)]
                      for _, r in points.iterrows()]
