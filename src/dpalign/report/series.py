"""From a study's tables to plain objects: one :class:`Cell` per grid point holding an
:class:`~dpalign.diagnostics.trends.Estimate` (mean, 95% CI, seed count) per metric, and the
:class:`Series` the verdict and the figures walk along (over epsilon at fixed K, or over K at
fixed epsilon).

Everything after :func:`cells_from_tables` is free of pandas, so the verdict logic can be
tested on hand-made cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from dpalign.diagnostics.trends import Estimate
from dpalign.report.fmt import format_epsilon
from dpalign.study.analysis import OFFLINE, estimate, method_order, ok_runs

__all__ = [
    "GRID_FIELDS",
    "MECHANISM_NAMES",
    "METRICS",
    "Cell",
    "Metric",
    "Series",
    "cells_from_tables",
    "epsilon_series",
    "k_series",
    "ok_runs",
]


@dataclass(frozen=True)
class Metric:
    """A per-run quantity: its ``column`` in ``runs.parquet``, a ``label`` for sentences and
    an axis ``unit``. ``derive`` computes it from the runs table when it is not a column
    (e.g. "reached the target" from ``steps_to_target``)."""

    column: str
    label: str
    unit: str
    derive: Callable[[pd.DataFrame], pd.Series] | None = None


def _indicator(column: str, hit: Callable[[pd.Series], pd.Series]) -> Callable[
        [pd.DataFrame], pd.Series]:
    """A 0/1 column from ``hit(runs[column])`` (NaN where ``column`` is absent)."""

    def derive(runs: pd.DataFrame) -> pd.Series:
        if column not in runs:
            return pd.Series(math.nan, index=runs.index)
        return hit(runs[column]).astype(float)

    return derive


METRICS: dict[str, Metric] = {
    "diverged": Metric("diverged", "divergence rate", "fraction of seeds that diverged",
                       _indicator("diverged", lambda s: s.fillna(False).astype(bool))),
    "loss_volatility": Metric("loss_volatility", "loss volatility",
                              "std of Δ EMA(loss) per step (nats)"),
    "steps_to_target": Metric("steps_to_target", "steps to converge",
                              "optimizer steps (seeds that reached the target)"),
    "converged": Metric("converged", "fraction of seeds reaching the target",
                        "fraction of seeds",
                        _indicator("steps_to_target", lambda s: s.notna())),
    "final_heldout_reward_accuracy": Metric("final_heldout_reward_accuracy",
                                            "final held-out reward accuracy",
                                            "accuracy (fraction of pairs)"),
    "final_pope_adversarial_accuracy": Metric("final_pope_adversarial_accuracy",
                                              "final POPE-adversarial accuracy",
                                              "accuracy (fraction of questions)"),
    "final_chair_s": Metric("final_chair_s", "final CHAIR_s",
                            "CHAIR_s (fraction of captions hallucinating)"),
    "mean_noise_to_signal": Metric("mean_noise_to_signal", "mean noise-to-signal ratio",
                                   "noise std / ‖mean clipped grad‖"),
    "mean_clip_fraction": Metric("mean_clip_fraction", "mean clip fraction",
                                 "fraction of pairs clipped"),
    "sigma": Metric("sigma", "noise multiplier σ", "σ (noise std / clip norm)"),
    "epsilon": Metric("epsilon", "ε spent", "ε"),
    "kl_final": Metric("kl_final", "final KL to the reference", "nats per token"),
}
"""Every metric the report estimates per grid point, by key."""

MECHANISM_NAMES: dict[str, str] = {"none": "no DP", "dp_sgd": "DP-SGD", "label_dp": "label-DP"}

GRID_FIELDS = ("mechanism", "loss", "method", "lr", "k")
"""The grid coordinates besides epsilon; a series holds all but the one it walks along."""


@dataclass(frozen=True)
class Cell:
    """One grid point: its coordinates, run counts and an :class:`Estimate` per metric."""

    point: str
    mechanism: str
    epsilon: float
    k: int
    loss: str = "dpo"
    lr: float | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    n_runs: int = 0
    n_failed: int = 0
    stats: Mapping[str, Estimate] = field(default_factory=dict)
    method: str = OFFLINE

    @property
    def private(self) -> bool:
        return not math.isinf(self.epsilon)

    def get(self, key: str) -> Estimate:
        """The estimate of metric ``key`` (an unmeasured :class:`Estimate` when absent)."""
        return self.stats.get(key, Estimate())


def _estimate_from_row(row: Mapping[str, Any], key: str) -> Estimate | None:
    """The ``<key>_mean/_ci_low/_ci_high/_n`` columns of a ``points.parquet`` row."""
    if f"{key}_mean" not in row:
        return None
    n = row.get(f"{key}_n", 0)
    return Estimate(float(row[f"{key}_mean"]), float(row.get(f"{key}_ci_low", math.nan)),
                    float(row.get(f"{key}_ci_high", math.nan)),
                    0 if n is None or pd.isna(n) else int(n))


def _estimate_from_runs(runs: pd.DataFrame, metric: Metric) -> Estimate:
    """Mean, bootstrap CI and count of ``metric`` over the given runs (NaN dropped)."""
    if metric.derive is not None:
        values = metric.derive(runs)
    elif metric.column in runs:
        values = pd.to_numeric(runs[metric.column], errors="coerce")
    else:
        return Estimate()
    return estimate(values.astype(float).to_numpy())


def _learning_rate(value: Any) -> float | None:
    """The grid's lr: ``None`` when the point uses the base config's (null / NaN / absent),
    so that points compare equal on it."""
    return None if value is None or pd.isna(value) else float(value)


def _grid_lr(row: Mapping[str, Any]) -> float | None:
    """The lr as a grid axis: the ``optim.lr`` column (``grid.lr`` or ``grid.optim.lr``);
    None when the study does not sweep it. Tables that carry effective settings (an
    ``optimizer`` column) hold the effective lr in ``lr``, which differs between mechanisms
    by their overrides and is no axis; older tables hold the grid's lr there."""
    if "optim.lr" in row:
        return _learning_rate(row["optim.lr"])
    return None if "optimizer" in row else _learning_rate(row.get("lr"))


def _settings(row: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The point's setting axes (dotted columns) besides the lr, in name order; a setting
    the point does not have (NaN: e.g. ``privacy.*`` without DP) is left out."""
    return tuple(sorted((key, value) for key, value in row.items()
                        if "." in key and key != "optim.lr" and value is not None
                        and not (isinstance(value, float) and math.isnan(value))))


def _method(row: Mapping[str, Any]) -> str:
    """The point's alignment method (``offline`` in tables written before there were
    others)."""
    value = row.get("method")
    return OFFLINE if value is None or (isinstance(value, float) and math.isnan(value)) \
        else str(value)


def _cell(row: Mapping[str, Any], runs: pd.DataFrame) -> Cell:
    """One :class:`Cell` from a points row and that point's finished runs. Indicator
    metrics are always computed from the runs; the others come from ``points.parquet`` when
    it has them."""
    stats = {}
    for key, metric in METRICS.items():
        from_row = None if metric.derive is not None else _estimate_from_row(row, key)
        stats[key] = from_row if from_row is not None else _estimate_from_runs(runs, metric)
    return Cell(point=str(row["point"]), mechanism=str(row["mechanism"]),
                epsilon=float(row["epsilon_target"]), k=int(row["k"]),
                loss=str(row.get("loss", "dpo")), lr=_grid_lr(row),
                settings=_settings(row), n_runs=int(row.get("n_runs", len(runs))),
                n_failed=int(row.get("n_failed", 0) or 0), stats=stats,
                method=_method(row))


def cells_from_tables(points: pd.DataFrame, runs: pd.DataFrame) -> list[Cell]:
    """One :class:`Cell` per row of ``points`` (the study's ``points.parquet``), estimates
    taken from its aggregate columns or computed from the matching ``runs`` rows."""
    ok = ok_runs(runs)
    by_point = {name: group for name, group in ok.groupby("point")}
    empty = ok.iloc[0:0]
    return [_cell(row, by_point.get(row["point"], empty))
            for row in points.to_dict(orient="records")]


# ---------------------------------------------------------------- series


@dataclass(frozen=True)
class Series:
    """Grid points that differ in one coordinate, ``along`` ("epsilon" or "k"), ordered in
    the direction the verdict reads them: epsilon from no DP down to the smallest epsilon
    (more noise), K from few to many shots. ``group`` holds the fixed coordinates."""

    along: str
    group: Mapping[str, Any]
    cells: tuple[Cell, ...]
    label: str


_FIELD_TEXT: dict[str, Callable[[Any], str]] = {
    "mechanism": lambda v: MECHANISM_NAMES.get(v, str(v)),
    "loss": lambda v: str(v).upper() if len(str(v)) <= 4 else str(v),
    "method": str,
    "lr": lambda v: "base lr" if v is None else f"lr={v:g}",
    "k": lambda v: f"K={v}",
    "epsilon": format_epsilon,
}


def _lr_key(lr: float | None) -> float:
    return -1.0 if lr is None else lr


def _varying(cells: Sequence[Cell], name: str) -> bool:
    return len({getattr(c, name) for c in cells}) > 1


def _setting_text(key: str, value: Any) -> str:
    return f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float) else \
        f"{key.rsplit('.', 1)[-1]}={value}"


def _label(group: Mapping[str, Any], shown: Iterable[str]) -> str:
    """``DP-SGD, K=8, clipping=adaptive``: the named coordinates of ``group``, in
    :data:`_FIELD_TEXT` order, then the settings the study varies (the mechanism is left out
    for non-private points: their epsilon says "no DP")."""
    shown = set(shown) - ({"mechanism"} if group.get("epsilon") == math.inf else set())
    fields = [_FIELD_TEXT[name](group[name]) for name in _FIELD_TEXT
              if name in shown and name in group]
    settings = [_setting_text(k, v) for k, v in group.get("settings", ()) if k in shown]
    return ", ".join(fields + settings)


def _varying_settings(cells: Sequence[Cell]) -> set[str]:
    values: dict[str, set[Any]] = {}
    for c in cells:
        for key, value in c.settings:
            values.setdefault(key, set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1}


def _public(settings: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """The settings a non-private point shares with a DP one (``privacy.*`` dropped)."""
    return tuple((k, v) for k, v in settings if not k.startswith("privacy."))


def _dp_mechanisms(cells: Sequence[Cell]) -> list[str]:
    return sorted({c.mechanism for c in cells if c.private}) or ["none"]


def _family_key(f: tuple[str, float | None, int, tuple[tuple[str, Any], ...], str]) -> tuple:
    return (f[0], _lr_key(f[1]), f[2], [(k, str(v)) for k, v in f[3]], method_order(f[4]))


def epsilon_series(cells: Sequence[Cell]) -> list[Series]:
    """One series per DP mechanism and (loss, method, lr, K, settings): that mechanism's
    points plus the non-private points of the same (loss, method, lr, K) and non-privacy
    settings, ordered from no DP to the smallest epsilon. Labels name K always and the
    mechanism, loss, method, lr and settings when the study varies them."""
    dp_cells = [c for c in cells if c.private]
    shown = ({"k"} | {name for name in ("loss", "method", "lr") if _varying(cells, name)}
             | _varying_settings(cells))
    if len({c.mechanism for c in dp_cells}) > 1:
        shown.add("mechanism")
    out = []
    for mechanism in _dp_mechanisms(cells):
        sources = [c for c in cells if c.mechanism == mechanism] or list(cells)
        families = sorted({(c.loss, c.lr, c.k, c.settings, c.method) for c in sources},
                          key=_family_key)
        for loss, lr, k, settings, method in families:
            members = [c for c in cells if (c.loss, c.lr, c.k, c.method) == (loss, lr, k, method)
                       and ((c.mechanism == mechanism and c.settings == settings)
                            or (not c.private and c.settings == _public(settings)))]
            if not members:
                continue
            group = {"mechanism": mechanism, "loss": loss, "method": method, "lr": lr, "k": k,
                     "settings": settings}
            ordered = tuple(sorted(members, key=lambda c: -c.epsilon))
            out.append(Series("epsilon", group, ordered, _label(group, shown)))
    return out


def k_series(cells: Sequence[Cell]) -> list[Series]:
    """One series per (mechanism, loss, lr, epsilon, settings, method) over K, ordered by K.
    Labels name epsilon always and the mechanism, loss, method, lr and settings when the
    study varies them."""
    shown = ({"epsilon"} | {n for n in ("loss", "method", "lr") if _varying(cells, n)}
             | _varying_settings(cells))
    if len({c.mechanism for c in cells if c.private}) > 1:
        shown.add("mechanism")
    keys = sorted({(c.mechanism, c.loss, c.lr, c.epsilon, c.settings, c.method) for c in cells},
                  key=lambda key: (key[0] != "none", key[0], key[1], _lr_key(key[2]),
                                   -key[3], [(k, str(v)) for k, v in key[4]],
                                   method_order(key[5])))
    out = []
    for mechanism, loss, lr, epsilon, settings, method in keys:
        members = sorted((c for c in cells
                          if (c.mechanism, c.loss, c.lr, c.epsilon, c.settings, c.method)
                          == (mechanism, loss, lr, epsilon, settings, method)),
                         key=lambda c: c.k)
        group = {"mechanism": mechanism, "loss": loss, "method": method, "lr": lr,
                 "epsilon": epsilon, "settings": settings}
        out.append(Series("k", group, tuple(members), _label(group, shown)))
    return out
