"""RL under DP: RLOO and GRPO against a reward model (``grid.method: rloo | grpo``) beside
the study's offline DPO runs at each privacy budget, and the reward models themselves
against epsilon. Shown only when the study has what they describe; a study without RL or
reward-model runs renders as before.

- "RL under DP" table (:func:`rl_rows`, :func:`rl_table`): one row per (mechanism, epsilon,
  K, loss, method) tuning group of the offline and RL methods, at its tuned configuration
  (:func:`dpalign.study.analysis.tuned_choices`), with the mean and 95% bootstrap CI over
  its finished runs of each :data:`RL_COMPARED` figure: the per-run figures of
  :mod:`dpalign.study.rl` (judge and reward-model scores at the end, KL to the reference,
  entropy ratio, hacking and entropy-collapse flags: their means are rates), the final
  POPE-adversarial F1 and CHAIR_s, the divergence rate (the per-run rule of
  :func:`dpalign.diagnostics.find_divergence`), the total epsilon (the RL run's composed
  guarantee ``total_epsilon``; an offline run's own ``epsilon``) and wall seconds.
- ``rl.png`` (:func:`rl_figure`): the reward model's and the judge's mean score of each
  step's samples over the steps, one line per RL method and epsilon (mean over the tuned
  configuration's seeds; at a step where a seed sampled nothing, the others' mean).
- "Reward model vs epsilon" table (:func:`reward_rows`, :func:`reward_table`): the runs that
  trained a reward model (``reward_model_run``), per epsilon: held-out pairwise accuracy
  r(chosen) > r(rejected) and the other :data:`REWARD_COMPARED` figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib import colormaps

from dpalign.diagnostics.trends import VerdictThresholds
from dpalign.report.fmt import format_epsilon
from dpalign.report.load import StudyInput
from dpalign.report.methods import (
    MethodRow,
    Reader,
    column,
    comparison_table,
    diverged,
    tuned_rows,
)
from dpalign.report.plot import (
    LINESTYLES,
    STEP_LABEL,
    FigureOut,
    figure_legend,
    new_figure,
    to_png,
)
from dpalign.report.series import Cell
from dpalign.report.tables import Table
from dpalign.rl.config import RL_METHODS
from dpalign.study.analysis import (
    OFFLINE,
    TuneSettings,
    method_order,
    ok_runs,
    with_method,
)
from dpalign.study.rl import ENTROPY_COLLAPSE_RATIO, FINAL_FRACTION, TREND_BLOCKS

__all__ = ["REWARD_COMPARED", "RL_COMPARED", "RL_PLOTTED", "policy_runs", "reward_rows",
           "reward_runs", "reward_table", "rl_figure", "rl_rows", "rl_rules", "rl_table"]

def _total_epsilon(runs: pd.DataFrame) -> pd.Series:
    """The RL run's composed ``total_epsilon``; else the run's own ``epsilon``."""
    return column("total_epsilon")(runs).fillna(column("epsilon")(runs))


RL_COMPARED: dict[str, tuple[str, Reader]] = {
    "judge": ("judge score (end)", column("rl_judge_final")),
    "reward": ("reward-model score (end)", column("rl_reward_final")),
    "kl": ("KL to ref. (end, nats)", column("rl_kl_final")),
    "entropy_ratio": ("entropy ratio (end / start)", column("rl_entropy_ratio")),
    "pope_f1": ("POPE-adv F1", column("final_pope_adversarial_f1")),
    "chair_s": ("CHAIR_s", column("final_chair_s")),
    "diverged": ("divergence rate", diverged),
    "hacking": ("hacking rate", column("rl_hacking")),
    "collapse": ("entropy-collapse rate", column("rl_entropy_collapse")),
    "total_epsilon": ("total ε", _total_epsilon),
    "wall": ("wall s per run", column("wall_seconds")),
}
"""Per figure key of the "RL under DP" table: its header and how a run's value is read."""

REWARD_COMPARED: dict[str, tuple[str, Reader]] = {
    "accuracy": ("held-out reward acc.", column("final_heldout_reward_accuracy")),
    "loss": ("held-out loss", column("final_heldout_loss")),
    "epsilon": ("ε spent", column("epsilon")),
    "diverged": ("divergence rate", diverged),
    "wall": ("wall s per run", column("wall_seconds")),
}
"""Per figure key of the "Reward model vs epsilon" table: its header and reader."""

RL_PLOTTED = (("rl_reward", "reward-model score of the step's samples"),
              ("rl_judge", "judge score of the step's samples (higher is better)"))
"""The figure's panels: (step-log column, y-axis label)."""
DEFAULT_TUNE = TuneSettings()
TREND = VerdictThresholds()
"""The trend test's settings the hacking rule uses (``dpalign.study.rl.step_trend``)."""


def _reward_flags(runs: pd.DataFrame) -> pd.Series:
    if "reward_model_run" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["reward_model_run"].fillna(False).astype(bool)


def reward_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs that trained a reward model (``reward_model_run``)."""
    ok = with_method(ok_runs(runs))
    return ok[_reward_flags(ok)]


def policy_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs that trained a policy (all but the reward-model runs)."""
    ok = with_method(ok_runs(runs))
    return ok[~_reward_flags(ok)]


def rl_rows(runs: pd.DataFrame, tune: TuneSettings = DEFAULT_TUNE) -> list[MethodRow]:
    """A :class:`~dpalign.report.methods.MethodRow` per tuning group of the offline and RL
    methods (no DP first, epsilon from large to small, offline first); ``[]`` when no
    finished policy run is an RL run."""
    ok = policy_runs(runs)
    if not ok["method"].isin(RL_METHODS).any():
        return []
    return tuned_rows(ok[ok["method"].isin((OFFLINE, *RL_METHODS))], tune, RL_COMPARED)


def reward_rows(runs: pd.DataFrame, tune: TuneSettings = DEFAULT_TUNE) -> list[MethodRow]:
    """A row per (mechanism, epsilon, K, loss) group of the reward-model runs at its tuned
    configuration; ``[]`` without reward-model runs."""
    ok = reward_runs(runs)
    return tuned_rows(ok, tune, REWARD_COMPARED) if not ok.empty else []


def rl_table(rows: Sequence[MethodRow]) -> Table | None:
    """The "RL under DP" table (``None`` without rows)."""
    if not rows:
        return None
    return comparison_table(
        "rl", "RL under DP",
        "Per ε and K, offline DPO on the recorded pairs and RL against the reward model "
        "(rloo: leave-one-out baseline; grpo: group-normalised advantages; each step samples "
        "online.samples answers per prompt) at their tuned configuration: mean [95% bootstrap "
        "CI] over the finished runs. Judge and reward-model scores, KL to the reference and "
        f"entropy are the means of each run's last {FINAL_FRACTION:.0%} of logged steps "
        "(the entropy ratio divides by its first ones; — for offline runs, which sample "
        "nothing); POPE-adversarial F1 and CHAIR_s at the last step; the divergence, hacking "
        "and entropy-collapse rates are fractions of runs (rules below the verdict); total ε "
        "composes the policy's and the reward model's guarantees (an offline run's own ε). "
        "Click a header to sort.", rows, RL_COMPARED)


def reward_table(rows: Sequence[MethodRow]) -> Table | None:
    """The "Reward model vs epsilon" table (``None`` without rows)."""
    if not rows:
        return None
    return comparison_table(
        "reward", "Reward model vs epsilon",
        "The study's reward models (Bradley-Terry, reward.enabled) per ε and K at their tuned "
        "configuration: held-out pairwise accuracy (the fraction of held-out pairs with "
        "r(chosen) > r(rejected)), held-out loss, ε spent, divergence rate and wall seconds, "
        "mean [95% bootstrap CI] over the finished runs. Click a header to sort.",
        rows, REWARD_COMPARED, method=False)


def rl_rules(runs: pd.DataFrame) -> list[str]:
    """How the RL figures are decided (``[]`` when the study has no RL run)."""
    ok = policy_runs(runs)
    if not ok["method"].isin(RL_METHODS).any():
        return []
    return [f"RL runs: a run hacks its reward model when the reward model's score rises while "
            f"the judge's falls over training. Each score's logged steps are cut into up to "
            f"{TREND_BLOCKS} blocks of consecutive steps (at least 2 steps each); the trend "
            f"rule above reads the blocks' means and 95% CIs in step order (first and last "
            f"blocks' CIs apart and |Spearman ρ| ≥ {TREND.min_rho:g}, at its default "
            f"settings); fewer than 4 logged steps: not "
            f"measured. A run's entropy collapses when the mean entropy of its last "
            f"{FINAL_FRACTION:.0%} of logged steps is below {ENTROPY_COLLAPSE_RATIO:g} × that "
            f"of its first {FINAL_FRACTION:.0%}."]


def _step_mean(frames: Sequence[pd.DataFrame], column: str) -> pd.Series | None:
    """The per-step mean of ``column`` over the runs logging it (NaN steps skipped)."""
    columns = [f[column].rename(i) for i, f in enumerate(frames) if column in f]
    if not columns:
        return None
    mean = pd.concat(columns, axis=1).mean(axis=1)
    return mean[mean.notna()]


def rl_figure(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Reward-model and judge scores over the steps, one line per RL method (color) and
    epsilon (line style), mean over seeds (``None`` without RL runs)."""
    del cells
    rows = [r for r in rl_rows(study.runs, study.tune) if r.method in RL_METHODS]
    if not rows:
        return None
    runs = ok_runs(study.runs)
    methods = sorted({r.method for r in rows}, key=method_order)
    colors = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    epsilons = sorted({r.epsilon for r in rows}, reverse=True)
    several_k = len({r.k for r in rows}) > 1
    fig, axes = new_figure(1, len(RL_PLOTTED))
    drawn = False
    for ax, (key, unit) in zip(axes.ravel(), RL_PLOTTED, strict=True):
        for row in rows:
            names = runs.loc[runs["point"] == row.point, "run"].astype(str)
            frames = [study.logs[n] for n in names if n in study.logs]
            mean = _step_mean(frames, key)
            if mean is None or mean.empty:
                continue
            label = ", ".join([row.method, format_epsilon(row.epsilon),
                               *([f"K={row.k}"] if several_k else []), f"n={len(frames)}"])
            ax.plot(mean.index.to_numpy(), mean.to_numpy(), color=colors[row.method],
                    linestyle=LINESTYLES[epsilons.index(row.epsilon) % len(LINESTYLES)],
                    linewidth=1.3, label=label)
            drawn = True
        ax.set_title(unit[0].upper() + unit[1:].split(" of ")[0])
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    if not drawn:
        return None
    figure_legend(fig, axes.ravel(), "mean over seeds")
    return FigureOut("rl", "RL under DP: reward model vs judge",
                     "Per step, the mean reward-model score and the mean judge score of the "
                     "step's sampled answers, averaged over the seeds of each RL method's "
                     "tuned configuration (color: method; line style: ε; at a step where a "
                     "seed sampled nothing, the mean of the others). A reward-model "
                     "score that keeps rising while the judge's falls is reward hacking "
                     "(the table \"RL under DP\" has the rates).", to_png(fig))
