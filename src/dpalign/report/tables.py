"""The report's tables as plain data: every cell has display text and a sort key (the raw
number, so a click on a header sorts numerically)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dpalign.diagnostics.trends import Estimate
from dpalign.report.fmt import NO_DP, format_number, is_number
from dpalign.report.series import MECHANISM_NAMES, METRICS, Cell

__all__ = ["SETTINGS", "Table", "TableCell", "key_value_table", "points_table",
           "records_table", "runs_table"]


@dataclass(frozen=True)
class TableCell:
    """``text`` shown, ``sort`` the value the header click sorts on ("" sorts last)."""

    text: str
    sort: str


@dataclass(frozen=True)
class Table:
    """A titled table with a caption, header names and rows of cells."""

    id: str
    title: str
    caption: str
    headers: tuple[str, ...]
    rows: tuple[tuple[TableCell, ...], ...]


def _sort_key(value: Any) -> str:
    """A number's repr (``Infinity`` for inf, "" for NaN/None) or the text itself."""
    if value is None:
        return ""
    if isinstance(value, bool | int):
        return str(int(value))
    if is_number(value):
        x = float(value)
        return "" if math.isnan(x) else ("Infinity" if x == math.inf else
                                         "-Infinity" if x == -math.inf else repr(x))
    return str(value)


def cell(value: Any, text: str | None = None) -> TableCell:
    """A :class:`TableCell` for ``value`` (numbers via :func:`format_number`)."""
    if text is None:
        text = "yes" if value is True else "no" if value is False else format_number(value)
    return TableCell(text, _sort_key(value))


def _estimate_cell(est: Estimate) -> TableCell:
    if not est.measured:
        return cell(None)
    return TableCell(f"{format_number(est.mean)} [{format_number(est.low)}, "
                     f"{format_number(est.high)}]", _sort_key(est.mean))


def _epsilon_cell(epsilon: Any) -> TableCell:
    infinite = is_number(epsilon) and math.isinf(float(epsilon))
    return cell(epsilon, NO_DP if infinite else None)


SETTINGS: tuple[tuple[str, str], ...] = (
    ("lr", "lr"), ("optimizer", "optimizer"), ("batch", "batch_size"),
    ("sample rate", "sample_rate"), ("steps planned", "steps"),
    ("max grad norm", "max_grad_norm"), ("clipping", "clipping"), ("LoRA r", "lora_r"),
)
"""(header, column) of each run's effective settings (``dpalign.study.grid.EFFECTIVE``, what
it trained with after the base config, the mechanism's overrides and the grid) in
``runs.parquet`` / ``points.parquet``; older studies lack them and show none (``lr`` there
is the grid's value, ``—`` when the grid did not set one)."""

_POINT_COORDINATES: tuple[tuple[str, Callable[[Cell], TableCell]], ...] = (
    ("point", lambda c: cell(c.point)),
    ("mechanism", lambda c: cell(MECHANISM_NAMES.get(c.mechanism, c.mechanism))),
    ("ε target", lambda c: _epsilon_cell(c.epsilon)),
    ("K", lambda c: cell(c.k)),
    ("loss", lambda c: cell(c.loss)),
)
_METHOD_COORDINATE: tuple[str, Callable[[Cell], TableCell]] = ("method", lambda c: cell(c.method))
_POINT_COUNTS: tuple[tuple[str, Callable[[Cell], TableCell]], ...] = (
    ("runs", lambda c: cell(c.n_runs)),
    ("failed", lambda c: cell(c.n_failed)),
)
_POINT_METRICS = ("diverged", "converged", "loss_volatility", "steps_to_target",
                  "final_heldout_reward_accuracy", "final_pope_adversarial_accuracy",
                  "final_chair_s", "mean_noise_to_signal", "mean_clip_fraction", "sigma",
                  "epsilon", "kl_final")


def _point_settings(cells: Sequence[Cell], points: pd.DataFrame | None
                    ) -> tuple[list[str], list[tuple[TableCell, ...]]]:
    """Headers and, per cell, the effective-setting cells of :data:`SETTINGS` that
    ``points`` (the study's ``points.parquet``, one row per ``point``) has; without it only
    ``lr``, from the cell (``—`` where the grid did not set one: never a made-up "base")."""
    if points is None or "point" not in points:
        return ["lr"], [(cell(c.lr),) for c in cells]
    present = [(h, col) for h, col in SETTINGS if col in points]
    if "lr" not in points:
        present.insert(0, ("lr", ""))
    by_point = {str(r["point"]): r for r in points.to_dict(orient="records")}
    rows = []
    for c in cells:
        record = by_point.get(c.point, {})
        rows.append(tuple(cell(c.lr) if col == "" else cell(_python(record.get(col)))
                          for _, col in present))
    return [h for h, _ in present], rows


def points_table(cells: Sequence[Cell], points: pd.DataFrame | None = None) -> Table:
    """One row per grid point: coordinates, effective settings (from ``points``, the study's
    ``points.parquet``, when given; see :data:`SETTINGS`), counts and mean [95% CI] per
    metric."""
    keys = [k for k in _POINT_METRICS if any(c.get(k).measured for c in cells)]
    setting_headers, setting_cells = _point_settings(cells, points)
    coordinates = _POINT_COORDINATES + ((_METHOD_COORDINATE,)
                                        if len({c.method for c in cells}) > 1 else ())
    headers = ([name for name, _ in coordinates] + setting_headers
               + [name for name, _ in _POINT_COUNTS] + [METRICS[k].label for k in keys])
    rows = tuple(tuple(make(c) for _, make in coordinates) + settings
                 + tuple(make(c) for _, make in _POINT_COUNTS)
                 + tuple(_estimate_cell(c.get(k)) for k in keys)
                 for c, settings in zip(cells, setting_cells, strict=True))
    return Table("points", "Grid points",
                 "Effective settings (— where not recorded), then mean [95% bootstrap CI] "
                 "over the finished seeds of each grid point. Click a header to sort.",
                 tuple(headers), rows)


_RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"), ("status", "status"), ("mechanism", "mechanism"),
    ("ε target", "epsilon_target"), ("K", "k"), ("seed", "seed"), ("loss", "loss"),
    ("method", "method"),
    *SETTINGS, ("σ", "sigma"), ("ε spent", "epsilon"),
    ("audited ε ≥", "audit_epsilon_lower_bound"), ("audit AUC", "audit_auc"),
    ("steps run", "n_steps"),
    ("diverged", "diverged"), ("diverged at", "diverged_step"), ("why", "diverged_reason"),
    ("moved", "moved"), ("over-optimised", "collapsed"), ("silenced", "silenced"),
    ("loss volatility", "loss_volatility"), ("steps to target", "steps_to_target"),
    ("clip fraction", "mean_clip_fraction"), ("noise/signal", "mean_noise_to_signal"),
    ("KL final", "kl_final"), ("reward acc.", "final_heldout_reward_accuracy"),
    ("POPE adv. acc.", "final_pope_adversarial_accuracy"), ("CHAIR_s", "final_chair_s"),
    ("CHAIR_i", "final_chair_i"), ("wall s", "wall_seconds"),
    ("generation s", "online_seconds"), ("pair yield", "online_pair_yield"),
    ("best online score (end)", "online_score_best_final"),
    ("reward-model score (end)", "rl_reward_final"), ("judge score (end)", "rl_judge_final"),
    ("total ε", "total_epsilon"), ("error", "error"),
)
_SHOWN_WHEN: dict[str, Callable[[pd.Series], bool]] = {
    "method": lambda s: s.nunique(dropna=False) > 1,
    **dict.fromkeys(("online_seconds", "online_pair_yield", "online_score_best_final",
                     "rl_reward_final", "rl_judge_final", "total_epsilon"),
                    lambda s: bool(s.notna().any())),
}
"""Columns shown only when they say something: the method when the study compares several,
the online figures when some run sampled online, the RL figures when some run is RL."""
_CELL_MAKERS: dict[str, Callable[[Any], TableCell]] = {
    "epsilon_target": _epsilon_cell,
    "epsilon": _epsilon_cell,
    "total_epsilon": _epsilon_cell,
    "mechanism": lambda v: cell(MECHANISM_NAMES.get(v, v)),
}


def _python(value: Any) -> Any:
    """numpy scalars to Python ones; pandas' missing markers to None."""
    if hasattr(value, "item"):
        value = value.item()
    return None if value is pd.NA or value is pd.NaT else value


def runs_table(runs: pd.DataFrame) -> Table:
    """One row per run, the columns of :data:`_RUN_COLUMNS` that the study has."""
    present = [(h, c) for h, c in _RUN_COLUMNS
               if c in runs and _SHOWN_WHEN.get(c, lambda _: True)(runs[c])]
    rows = tuple(
        tuple(_CELL_MAKERS.get(column, cell)(_python(record[column])) for _, column in present)
        for record in runs.to_dict(orient="records"))
    return Table("runs", "Runs", "One row per run (grid point and seed), with the settings "
                 "it trained with (after the base config, the mechanism's overrides and the "
                 "grid; — where not recorded); ε spent is inf for non-private runs. Click a "
                 "header to sort.",
                 tuple(h for h, _ in present), rows)


def records_table(id_: str, title: str, caption: str,
                  records: Sequence[Mapping[str, Any]]) -> Table:
    """A table of dict rows, one column per key (first-seen order)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    rows = tuple(tuple(cell(_python(r.get(k))) for k in keys) for r in records)
    return Table(id_, title, caption, tuple(keys), rows)


def key_value_table(id_: str, title: str, caption: str, values: Mapping[str, Any]) -> Table:
    """A two-column table (name, value)."""
    rows = tuple((cell(k), cell(_python(v))) for k, v in values.items())
    return Table(id_, title, caption, ("quantity", "value"), rows)
