"""The study's answer as pure functions of its runs table (``runs.parquet``, a row per run;
a grid point is a ``point`` value, its rows are its seeds). Nothing here reads files.

**Tuning protocol** (:func:`tuned_choices`): for each (mechanism, epsilon_target, k, loss,
method) the configuration (point) with the best mean *validation* score over its finished seeds
(``tune.metric``, default ``final_val_reward_accuracy``; higher is better, lower for CHAIR-type
metrics) is chosen, and its *test* figures are reported: the held-out pairs' test part
(``final_heldout_reward_accuracy``), POPE-adversarial accuracy and CHAIR_s, each a mean with
a 95% bootstrap CI over seeds. The alignment method (offline / online / mixed / bdhs,
``method``; ``offline`` for tables written before it existed, :func:`with_method`) is
compared, never tuned over. Beside it, :func:`fixed_choices` gives the point "at fixed
settings" (``tune.fixed``; axes not named take their first value). Choosing hyperparameters on
*private* validation data is itself a release that epsilon does not count (Papernot &
Steinke 2022, "Hyperparameter Tuning with Renyi Differential Privacy"); ``tune.split =
public`` tunes on a public split instead.

**Stability measures**:

- *stable learning-rate window* (:func:`lr_window`, :func:`stable_lr_window`): the swept lrs
  at which every seed converges (``converged``, else ``steps_to_target`` reached), does not
  diverge and does not collapse on held-out; the window is the widest contiguous run of stable
  lrs in the sorted swept list and its width is ``log10(high / low)`` (0 for a single stable
  lr; ``None`` when no lr is stable). Other settings are held at the tuned configuration's.
- *held-out collapse / over-optimisation* (:func:`heldout_drop`, :func:`collapsed`): the drop
  from a run's best held-out reward accuracy to its final one; a run *collapses* when it
  loses more than :data:`COLLAPSE_DROP` (0.05).
- *seed dispersion* (:func:`seed_dispersion`): the std over seeds (ddof=1) of each final
  figure of a point.
- *better than the base* (:func:`versus_base`, :func:`better_than_base`): the base
  (untrained) model's held-out reward accuracy is 0 by construction (policy == reference:
  every pair is a tie), so "better than the base on held-out" means test reward accuracy
  > :data:`CHANCE` (0.5). POPE-adversarial accuracy must exceed and CHAIR_s fall below the
  base's (``base.json``); a run whose recall falls below :data:`RECALL_COLLAPSE_RATIO` x the
  base's recall is *recall-collapsed* (its captions stop naming objects): its lower CHAIR is
  not counted as less hallucination.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dpalign.diagnostics import LOWER_IS_BETTER, summarize
from dpalign.diagnostics.trends import Estimate
from dpalign.rl.config import METHODS

__all__ = [
    "CHANCE",
    "COLLAPSE_DROP",
    "GROUP",
    "RECALL_COLLAPSE_RATIO",
    "SETTINGS",
    "TEST_METRICS",
    "Choice",
    "LrWindow",
    "Recommendation",
    "TuneSettings",
    "better_than_base",
    "collapse_fraction",
    "collapsed",
    "converged",
    "estimate",
    "fixed_choices",
    "heldout_drop",
    "lr_window",
    "method_order",
    "ok_runs",
    "recall_collapsed",
    "recommendations",
    "seed_dispersion",
    "setting_columns",
    "stable",
    "stable_lr_window",
    "tuned_choices",
    "versus_base",
    "with_method",
]

CHANCE = 0.5
"""Held-out reward accuracy of a coin flip; the base model's pairs are all ties (0)."""
COLLAPSE_DROP = 0.05
"""A run collapses when its held-out reward accuracy falls more than this from its best."""
RECALL_COLLAPSE_RATIO = 0.5
"""A run's captions have stopped naming objects when recall < this x the base's recall."""
GROUP = ("mechanism", "epsilon_target", "k", "loss", "method")
"""What a configuration is tuned per (the method is compared, never tuned over)."""
OFFLINE = "offline"
"""The method of runs tables without a ``method`` column (studies before online DPO)."""
SETTINGS = ("lr", "max_grad_norm", "clipping", "optimizer", "batch_size", "sample_rate",
            "steps", "lora_r")
"""Effective-setting columns (constant within a point)."""
TEST_METRICS = ("final_heldout_reward_accuracy", "final_pope_adversarial_accuracy",
                "final_chair_s")
"""The test figures reported for a chosen configuration."""
HELDOUT = "heldout_reward_accuracy"


@dataclass(frozen=True)
class TuneSettings:
    """``study.json``'s ``config.tune`` (defaults when missing)."""

    metric: str = "final_val_reward_accuracy"
    split: str = "private"
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> TuneSettings:
        tune = dict((config or {}).get("tune") or {})
        return cls(metric=str(tune.get("metric") or cls.metric),
                   split=str(tune.get("split") or cls.split),
                   fixed=dict(tune.get("fixed") or {}))


# ---------------------------------------------------------------- small helpers


def with_method(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``method`` column: :data:`OFFLINE` where missing (older tables)."""
    if "method" in runs and runs["method"].notna().all():
        return runs
    method = runs["method"] if "method" in runs else pd.Series(None, index=runs.index,
                                                                dtype=object)
    return runs.assign(method=method.fillna(OFFLINE).astype(str))


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs (``status == "ok"``; all when there is no status column)."""
    return runs[runs["status"] == "ok"] if "status" in runs else runs


def _numbers(runs: pd.DataFrame, column: str) -> pd.Series:
    if column not in runs:
        return pd.Series(math.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[column], errors="coerce").astype(float)


def _flags(runs: pd.DataFrame, column: str) -> pd.Series:
    """A boolean column (missing / None -> False)."""
    return runs[column].fillna(False).astype(bool)


def estimate(values: Any) -> Estimate:
    """Mean and 95% bootstrap CI over the non-NaN ``values`` (see
    :func:`dpalign.diagnostics.summarize`)."""
    s = summarize(np.asarray(list(values), dtype=float))
    return Estimate(s["mean"], s["ci_low"], s["ci_high"], int(s["n"]))


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN == NaN / None == NaN and floats compared with a tolerance."""
    a_missing = a is None or (isinstance(a, float) and math.isnan(a))
    b_missing = b is None or (isinstance(b, float) and math.isnan(b))
    if a_missing or b_missing:
        return a_missing and b_missing
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """The settings present: :data:`SETTINGS` columns, then extra grid axes (dotted names)."""
    return [c for c in SETTINGS if c in runs] + [c for c in runs.columns if "." in str(c)]


def _column_for(runs: pd.DataFrame, key: str) -> str | None:
    """The column a ``tune.fixed`` key names: itself, else its last dotted part."""
    if key in runs:
        return key
    tail = key.rsplit(".", 1)[-1]
    return tail if tail in runs else None


def _lower_is_better(metric: str) -> bool:
    return metric.removeprefix("final_").removeprefix("best_") in LOWER_IS_BETTER


def _group_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(c) for c in GROUP)


def _group_order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """No DP first, then epsilon from large to small, K ascending; offline first, then the
    other methods in ``dpalign.rl.config.METHODS`` order."""
    mechanism, epsilon, k, loss, method = key
    return (mechanism != "none", str(mechanism), -float(epsilon), int(k), str(loss),
            method_order(str(method)))


def method_order(method: str) -> tuple[int, str]:
    """Sort key of a method: offline first, then ``dpalign.rl.config.METHODS`` order."""
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def _groups(runs: pd.DataFrame) -> list[tuple[tuple[Any, ...], pd.DataFrame]]:
    ok = with_method(ok_runs(runs))
    if ok.empty:
        return []
    keyed = {key: frame for key, frame in ok.groupby(list(GROUP), sort=False, dropna=False)}
    return [(k, keyed[k]) for k in sorted(keyed, key=_group_order)]


# ---------------------------------------------------------------- per-run measures


def heldout_drop(runs: pd.DataFrame, key: str = HELDOUT) -> pd.Series:
    """Per run: best minus final held-out ``key`` (``heldout_drop`` when the table has it and
    ``key`` is the default; NaN when not measured)."""
    if key == HELDOUT and "heldout_drop" in runs:
        return _numbers(runs, "heldout_drop")
    best, final = _numbers(runs, f"best_{key}"), _numbers(runs, f"final_{key}")
    return final - best if _lower_is_better(key) else best - final


def collapsed(runs: pd.DataFrame, threshold: float = COLLAPSE_DROP) -> pd.Series:
    """Per run: the held-out drop exceeds ``threshold``. Where the drop is not measured, the
    table's ``collapsed`` column decides (False when absent)."""
    drop = heldout_drop(runs)
    out = drop > threshold
    if "collapsed" in runs:
        out = out.where(drop.notna(), _flags(runs, "collapsed"))
    return out.astype(bool)


def collapse_fraction(runs: pd.DataFrame, threshold: float = COLLAPSE_DROP) -> float:
    """Fraction of finished runs with a measured drop (or ``collapsed`` flag) that collapse;
    NaN when none is measured."""
    ok = ok_runs(runs)
    measured = heldout_drop(ok).notna()
    if "collapsed" in ok:
        measured |= ok["collapsed"].notna()
    return float(collapsed(ok, threshold)[measured].mean()) if measured.any() else math.nan


def converged(runs: pd.DataFrame) -> pd.Series:
    """Per run: ``converged`` when the table has it, else ``steps_to_target`` was reached."""
    if "converged" in runs:
        return _flags(runs, "converged")
    return _numbers(runs, "steps_to_target").notna()


def stable(runs: pd.DataFrame, threshold: float = COLLAPSE_DROP) -> pd.Series:
    """Per run: converged, not diverged, not collapsed."""
    diverged = _flags(runs, "diverged") if "diverged" in runs else False
    return converged(runs) & ~diverged & ~collapsed(runs, threshold)


def seed_dispersion(runs: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Std over seeds (ddof=1; NaN with one seed) of each final figure, a row per point
    (index ``point``); ``columns`` default: every ``final_*`` column."""
    ok = ok_runs(runs)
    columns = list(columns) if columns is not None else [
        c for c in ok.columns if str(c).startswith("final_")]
    frame = pd.DataFrame({c: _numbers(ok, c) for c in columns}, index=ok.index)
    frame["point"] = ok["point"]
    return frame.groupby("point", sort=False).std(ddof=1)


def recall_collapsed(runs: pd.DataFrame, base: Mapping[str, Any],
                     ratio: float = RECALL_COLLAPSE_RATIO) -> pd.Series:
    """Per run: final recall < ``ratio`` x the base's recall (the table's
    ``recall_collapsed`` decides where that cannot be computed; else False)."""
    base_recall = base.get("recall")
    recall = _numbers(runs, "final_recall")
    if isinstance(base_recall, numbers.Real) and not math.isnan(float(base_recall)):
        out = recall < ratio * float(base_recall)
        known = recall.notna()
    else:
        out = pd.Series(False, index=runs.index)
        known = pd.Series(False, index=runs.index)
    if "recall_collapsed" in runs:
        out = out.where(known, _flags(runs, "recall_collapsed"))
    return out.astype(bool)


def _base_number(base: Mapping[str, Any], key: str) -> float:
    value = base.get(key)
    return float(value) if isinstance(value, numbers.Real) else math.nan


def versus_base(runs: pd.DataFrame, base: Mapping[str, Any]) -> pd.DataFrame:
    """Per run, 1.0 / 0.0 (NaN when not measurable): ``heldout`` (final test reward accuracy
    > :data:`CHANCE`), ``pope`` (final POPE-adversarial accuracy > the base's), ``chair``
    (final CHAIR_s < the base's and not recall-collapsed), and ``recall_collapsed``."""
    out = pd.DataFrame(index=runs.index)
    acc = _numbers(runs, f"final_{HELDOUT}")
    out["heldout"] = (acc > CHANCE).astype(float).where(acc.notna())
    pope, base_pope = (_numbers(runs, "final_pope_adversarial_accuracy"),
                       _base_number(base, "pope_adversarial_accuracy"))
    out["pope"] = (pope > base_pope).astype(float).where(pope.notna() & (base_pope == base_pope))
    silenced = recall_collapsed(runs, base)
    chair, base_chair = _numbers(runs, "final_chair_s"), _base_number(base, "chair_s")
    out["chair"] = ((chair < base_chair) & ~silenced).astype(float).where(
        chair.notna() & (base_chair == base_chair))
    out["recall_collapsed"] = silenced.astype(float)
    return out


def better_than_base(runs: pd.DataFrame, base: Mapping[str, Any]) -> dict[str, float]:
    """Fractions of the finished runs better than the base (see :func:`versus_base`; NaN when
    not measured) and ``n_recall_collapsed``, the runs flagged as silenced."""
    table = versus_base(ok_runs(runs), base)
    out = {name: float(table[name].mean()) if table[name].notna().any() else math.nan
           for name in ("heldout", "pope", "chair")}
    out["n_recall_collapsed"] = float(table["recall_collapsed"].sum())
    return out


# ---------------------------------------------------------------- lr window


@dataclass(frozen=True)
class LrWindow:
    """The stable learning-rate window: ``swept`` lrs (sorted), the ``stable`` ones, and the
    widest contiguous run of stable lrs ``low..high``; ``width`` in log10(lr) (0 for a single
    stable lr, ``None`` when no lr is stable)."""

    swept: tuple[float, ...] = ()
    stable: tuple[float, ...] = ()
    low: float | None = None
    high: float | None = None
    seeds: int = 0

    @property
    def width(self) -> float | None:
        if self.low is None or self.high is None:
            return None
        return math.log10(self.high / self.low)


def lr_window(stable_by_lr: Mapping[float, bool], seeds: int = 0) -> LrWindow:
    """The widest (in log10 lr, then in count) contiguous run of stable lrs in the sorted
    swept list; the lower one on a tie."""
    swept = sorted(float(lr) for lr in stable_by_lr)
    runs: list[list[float]] = []
    previous = False
    for lr in swept:
        if stable_by_lr[lr]:
            if previous:
                runs[-1].append(lr)
            else:
                runs.append([lr])
        previous = bool(stable_by_lr[lr])
    best = max(runs, key=lambda r: (math.log10(r[-1] / r[0]), len(r)), default=[])
    ok = tuple(lr for lr in swept if stable_by_lr[lr])
    return LrWindow(tuple(swept), ok, best[0] if best else None, best[-1] if best else None,
                    seeds)


def _matches(runs: pd.DataFrame, settings: Mapping[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=runs.index)
    for column, value in settings.items():
        if column in runs:
            mask &= runs[column].map(lambda v, value=value: _same(v, value))
    return mask


def stable_lr_window(runs: pd.DataFrame, fixed: Mapping[str, Any] | None = None,
                     threshold: float = COLLAPSE_DROP) -> LrWindow:
    """The :class:`LrWindow` of one (mechanism, epsilon, K, loss, method) group's finished
    ``runs`` whose other settings equal ``fixed`` (columns ending in ``lr`` are ignored there: they
    are the lr axis). An lr is stable when every seed at it is :func:`stable`."""
    ok = ok_runs(runs)
    others = {c: v for c, v in (fixed or {}).items() if not str(c).endswith("lr")}
    ok = ok[_matches(ok, others)]
    lrs = _numbers(ok, "lr")
    ok = ok[lrs.notna()]
    if ok.empty:
        return LrWindow()
    flags = stable(ok, threshold)
    by_lr: dict[float, bool] = {}
    counts: dict[float, int] = {}
    for lr, flag in zip(_numbers(ok, "lr"), flags, strict=True):
        by_lr[lr] = by_lr.get(lr, True) and bool(flag)
        counts[lr] = counts.get(lr, 0) + 1
    window = lr_window(by_lr)
    inside = [n for lr, n in counts.items()
              if window.low is not None and window.low <= lr <= (window.high or lr)]
    return LrWindow(window.swept, window.stable, window.low, window.high,
                    min(inside) if inside else min(counts.values()))


# ---------------------------------------------------------------- tuning


@dataclass(frozen=True)
class Choice:
    """A chosen configuration of one group: ``point``, its ``settings`` (the setting columns'
    values), the validation ``score`` over seeds, the ``test`` figures (Estimates of
    :data:`TEST_METRICS`), how many configurations competed and on what ``basis`` it was
    chosen (``validation``, ``only configuration``, ``fixed settings``)."""

    group: Mapping[str, Any]
    point: str
    settings: Mapping[str, Any]
    score: Estimate
    test: Mapping[str, Estimate]
    n_candidates: int
    basis: str

    @property
    def private(self) -> bool:
        return not math.isinf(float(self.group["epsilon_target"]))


def _python(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return None if value is pd.NA else value


def _choice(key: tuple[Any, ...], group: pd.DataFrame, point: str, metric: str,
            n_candidates: int, basis: str) -> Choice:
    rows = group[group["point"] == point]
    first = rows.iloc[0]
    settings = {c: _python(first[c]) for c in setting_columns(group)}
    return Choice(dict(zip(GROUP, key, strict=True)), str(point), settings,
                  estimate(_numbers(rows, metric)),
                  {m: estimate(_numbers(rows, m)) for m in TEST_METRICS},
                  n_candidates, basis)


def _fixed_point(group: pd.DataFrame, fixed: Mapping[str, Any]) -> str | None:
    """The point of the first row of ``group`` (grid order) matching ``fixed``."""
    settings = {col: v for k, v in fixed.items() if (col := _column_for(group, k)) is not None}
    hits = group[_matches(group, settings)]
    return None if hits.empty else str(hits.iloc[0]["point"])


def fixed_choices(runs: pd.DataFrame, tune: TuneSettings = TuneSettings()) -> list[Choice]:
    """Per group, the point at ``tune.fixed`` (a dotted key or a column; axes not named take
    their first value, i.e. the first matching row in grid order); groups with no match are
    left out."""
    out = []
    for key, group in _groups(runs):
        point = _fixed_point(group, tune.fixed)
        if point is not None:
            out.append(_choice(key, group, point, tune.metric, group["point"].nunique(),
                               "fixed settings"))
    return out


def tuned_choices(runs: pd.DataFrame, tune: TuneSettings = TuneSettings()) -> list[Choice]:
    """Per group (no DP first, epsilon from large to small, K ascending), the point with the
    best mean ``tune.metric`` over its finished seeds (first in grid order on a tie). When no
    point of a group has the metric, the point at fixed settings stands in."""
    out = []
    for key, group in _groups(runs):
        scores = _numbers(group, tune.metric).groupby(group["point"], sort=False).mean()
        n = len(scores)
        scored = scores.dropna()
        if scored.empty:
            point = _fixed_point(group, tune.fixed) or str(group.iloc[0]["point"])
            basis = "only configuration" if n == 1 else "fixed settings"
        else:
            point = str(scored.idxmin() if _lower_is_better(tune.metric) else scored.idxmax())
            basis = "only configuration" if n == 1 else "validation"
        out.append(_choice(key, group, point, tune.metric, n, basis))
    return out


# ---------------------------------------------------------------- recommendation


@dataclass(frozen=True)
class Recommendation:
    """One row of the recommendation table: the ``tuned`` choice of a group, the choice at
    ``fixed`` settings, the stable lr ``window`` (other settings at the tuned ones'), the
    tuned point's fractions of seeds better than the base (:func:`better_than_base`), its
    ``collapse`` fraction, its seed ``dispersion`` (std per test metric), and ``beats_base``:
    whether the 95% CI of its test held-out reward accuracy lies above :data:`CHANCE`
    (``None`` when not measured)."""

    tuned: Choice
    fixed: Choice | None
    window: LrWindow
    versus_base: Mapping[str, float]
    collapse: float
    dispersion: Mapping[str, float]
    beats_base: bool | None


def recommendations(runs: pd.DataFrame, tune: TuneSettings = TuneSettings(),
                    base: Mapping[str, Any] | None = None,
                    threshold: float = COLLAPSE_DROP) -> list[Recommendation]:
    """A :class:`Recommendation` per group, in :func:`tuned_choices` order."""
    base = base or {}
    fixed = {c.point: c for c in fixed_choices(runs, tune)}
    fixed_by_group = {tuple(c.group.values()): c for c in fixed.values()}
    groups = dict(_groups(runs))
    out = []
    for choice in tuned_choices(runs, tune):
        key = tuple(choice.group.values())
        group = groups[key]
        rows = group[group["point"] == choice.point]
        held = choice.test[f"final_{HELDOUT}"]
        dispersion = seed_dispersion(rows, TEST_METRICS)
        out.append(Recommendation(
            tuned=choice, fixed=fixed_by_group.get(key),
            window=stable_lr_window(group, choice.settings, threshold),
            versus_base=better_than_base(rows, base),
            collapse=collapse_fraction(rows, threshold),
            dispersion={m: float(dispersion[m].iloc[0]) if len(dispersion) else math.nan
                        for m in TEST_METRICS},
            beats_base=None if not held.measured else bool(held.low > CHANCE)))
    return out
