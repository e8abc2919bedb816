"""Claimed vs audited epsilon: what the report shows of audits (``dpalign.audit``).

A study whose runs were audited has the ``audit_*`` columns of
:data:`dpalign.study.store.AUDIT_COLUMNS` in ``runs.parquet``; its page gains a table (one
row per grid point: the claimed epsilon, the audited lower bound's mean and max over seeds,
the AUC, how many runs' bounds stay within their claim) and a plot of lower bound against
claimed epsilon with the identity line. A single audited run (``audit.json``) shows its key
figures and ``audit/scores.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dpalign.report.fmt import NO_DP
from dpalign.report.load import RunInput, StudyInput
from dpalign.report.plot import FigureOut, epsilon_scale, new_figure, to_png
from dpalign.report.series import MECHANISM_NAMES, Cell, ok_runs
from dpalign.report.tables import Table, cell, key_value_table

__all__ = ["AUDIT_TITLE", "RUN_AUDIT_KEYS", "audit_points", "audit_table", "audited_runs",
           "claimed_vs_audited", "run_audit_figure", "run_audit_table"]

AUDIT_TITLE = "Claimed vs audited epsilon"
RUN_AUDIT_KEYS = ("kind", "canaries", "included", "claimed_epsilon", "delta",
                  "epsilon_lower_bound", "consistent", "level", "auc", "tpr_at_1pct_fpr",
                  "tpr_at_01pct_fpr", "audited", "fault", "sample_rate", "noise_multiplier",
                  "steps", "max_grad_norm", "score")
"""The ``audit.json`` entries the run page shows, in order."""


def audited_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs with an audited lower bound (none when the study has no audit
    columns)."""
    if "audit_epsilon_lower_bound" not in runs:
        return runs.iloc[0:0]
    ok = ok_runs(runs)
    return ok[pd.to_numeric(ok["audit_epsilon_lower_bound"], errors="coerce").notna()]


def audit_points(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per audited grid point, in ``runs`` order: ``point, mechanism,
    epsilon_target, claimed`` (mean claimed epsilon over seeds; inf when infinite),
    ``bound_mean, bound_max, auc_mean, consistent`` (runs whose bound <= claim), ``runs``."""
    audited = audited_runs(runs)
    records = []
    for point, group in audited.groupby("point", sort=False):
        bound = group["audit_epsilon_lower_bound"].astype(float)
        consistent = group["audit_consistent"].map(lambda v: v is True or v == 1)
        records.append({
            "point": str(point), "mechanism": group["mechanism"].iloc[0],
            "epsilon_target": float(group["epsilon_target"].iloc[0]),
            "claimed": float(group["audit_claimed_epsilon"].astype(float).mean()),
            "bound_mean": float(bound.mean()), "bound_max": float(bound.max()),
            "auc_mean": float(pd.to_numeric(group["audit_auc"], errors="coerce").mean()),
            "consistent": int(consistent.sum()), "runs": len(group)})
    return records


def _epsilon_cell(value: float) -> Any:
    return cell(value, NO_DP if math.isinf(value) else None)


def audit_table(runs: pd.DataFrame) -> Table | None:
    """The claimed-vs-audited table (``None`` when no run was audited)."""
    records = audit_points(runs)
    if not records:
        return None
    rows = tuple((cell(r["point"]), cell(MECHANISM_NAMES.get(r["mechanism"], r["mechanism"])),
                  _epsilon_cell(r["epsilon_target"]), _epsilon_cell(r["claimed"]),
                  cell(r["bound_mean"]), cell(r["bound_max"]), cell(r["auc_mean"]),
                  cell(r["consistent"], f"{r['consistent']}/{r['runs']}"))
                 for r in records)
    return Table("audit", AUDIT_TITLE,
                 "Per grid point: the ε the accountant claims (∞ for a non-private run, "
                 "audited as its DP-SGD limit), the one-run audit's lower bound on ε (mean and "
                 "max over seeds), the membership-inference AUC of the canary scores (mean), "
                 "and how many runs' bounds stay at or below their claim (a bound above it "
                 "means the implementation leaks more than it claims).",
                 ("point", "mechanism", "ε target", "ε claimed", "audited ε ≥ (mean)",
                  "audited ε ≥ (max)", "AUC", "consistent"), rows)


def claimed_vs_audited(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Each audited run's lower bound against its claimed epsilon (log x; an infinite claim
    at the right edge beyond a break, as on the other epsilon axes) with the identity line
    (``None`` when no run was audited)."""
    audited = audited_runs(study.runs)
    if audited.empty:
        return None
    claimed = audited["audit_claimed_epsilon"].astype(float).to_numpy()
    bound = audited["audit_epsilon_lower_bound"].astype(float).to_numpy()
    scale = epsilon_scale(claimed)
    fig, axes = new_figure(1, 1, width=7.0)
    ax = axes[0][0]
    xs = np.array([scale.x(e) for e in claimed])
    consistent = bound <= claimed
    ax.scatter(xs[consistent], bound[consistent], marker="o", color="tab:blue",
               label="bound ≤ claim", zorder=3)
    if (~consistent).any():
        ax.scatter(xs[~consistent], bound[~consistent], marker="x", color="tab:red",
                   label="bound > claim (leak)", zorder=3)
    scale.apply(ax)
    if scale.finite:
        line = np.geomspace(scale.finite[0] / 1.7, scale.finite[-1] * 1.7, 50)
        ax.plot(line, line, color="0.4", linestyle="--", linewidth=1, label="audited = claimed")
    ax.set_xlabel("claimed ε (accountant; log scale)")
    ax.set_ylabel("audited lower bound on ε")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return FigureOut("audit", AUDIT_TITLE,
                     "One point per audited run: the one-run audit's lower bound on ε against "
                     "the ε its accountant claims; a sound implementation stays below the "
                     "dashed identity line. Non-private runs (claim ∞) sit at the right edge.",
                     to_png(fig))


def run_audit_table(audit: Mapping[str, Any]) -> Table:
    """The run page's audit table: :data:`RUN_AUDIT_KEYS` of ``audit.json`` (a claimed
    epsilon of ``null`` shown as ∞)."""
    values = {k: audit.get(k) for k in RUN_AUDIT_KEYS if k in audit}
    if "claimed_epsilon" in values and values["claimed_epsilon"] is None:
        values["claimed_epsilon"] = math.inf
    return key_value_table("audit", "Audit (audit.json)",
                           "The one-run privacy audit: the ε the accountant claims against "
                           "the audit's lower bound on ε (consistent: bound ≤ claim), and the "
                           "canaries' membership-inference figures.", values)


def run_audit_figure(run: RunInput) -> FigureOut | None:
    """``audit/scores.png`` as it is (``None`` when the run has none)."""
    if run.audit_scores is None:
        return None
    return FigureOut("audit_scores", "Audit: canary scores",
                     "Scores of the canaries included in training (in) and left out (out); "
                     "the further apart, the more the run reveals (audit/scores.png).",
                     run.audit_scores)
