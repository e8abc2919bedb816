"""Offline vs online alignment: the study's methods (``grid.method``: offline, online,
mixed, bdhs) side by side at each privacy budget, as the seed paper (2407.02477) compares
offline and online DPO. Shown only when the study has two or more methods.

One row per (mechanism, epsilon, K, loss, method) tuning group: the runs of its tuned
configuration (:func:`dpalign.study.analysis.tuned_choices`; every run of the group when
it has one configuration) and, per :data:`COMPARED` figure, the mean and 95% bootstrap CI
over those runs (:func:`dpalign.study.analysis.estimate`, as everywhere in the report).
The generation share of a run is ``online_seconds / wall_seconds`` (NaN when the run
sampled nothing online: offline and BDHS runs, whose rejections are made before training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
from matplotlib import colormaps

from dpalign.diagnostics.trends import Estimate
from dpalign.report.fmt import NO_DP, format_number
from dpalign.report.load import StudyInput
from dpalign.report.plot import (
    LINESTYLES,
    MARKERS,
    FigureOut,
    epsilon_scale,
    figure_legend,
    new_figure,
    plot_over_epsilon,
    to_png,
)
from dpalign.report.series import MECHANISM_NAMES, Cell
from dpalign.report.tables import Table, TableCell, cell
from dpalign.study.analysis import (
    TuneSettings,
    estimate,
    ok_runs,
    tuned_choices,
    with_method,
)

__all__ = ["COMPARED", "PLOTTED", "MethodRow", "Reader", "column", "comparison_table",
           "diverged", "method_rows", "methods_figure", "methods_table", "tuned_rows"]


Reader = Callable[[pd.DataFrame], pd.Series]
"""A figure's reader: runs table -> one number per run."""


def column(name: str) -> Reader:
    """A runs-table column as numbers (NaN when absent)."""

    def read(runs: pd.DataFrame) -> pd.Series:
        if name not in runs:
            return pd.Series(math.nan, index=runs.index, dtype=float)
        return pd.to_numeric(runs[name], errors="coerce").astype(float)

    return read


def diverged(runs: pd.DataFrame) -> pd.Series:
    """1.0 for a diverged run, else 0.0 (NaN when the table has no ``diverged``)."""
    if "diverged" not in runs:
        return pd.Series(math.nan, index=runs.index, dtype=float)
    return runs["diverged"].fillna(False).astype(bool).astype(float)


def _generation_share(runs: pd.DataFrame) -> pd.Series:
    return column("online_seconds")(runs) / column("wall_seconds")(runs)


COMPARED: dict[str, tuple[str, Callable[[pd.DataFrame], pd.Series]]] = {
    "heldout": ("held-out reward acc.", column("final_heldout_reward_accuracy")),
    "pope_acc": ("POPE-adv acc.", column("final_pope_adversarial_accuracy")),
    "pope_f1": ("POPE-adv F1", column("final_pope_adversarial_f1")),
    "chair_s": ("CHAIR_s", column("final_chair_s")),
    "chair_i": ("CHAIR_i", column("final_chair_i")),
    "recall": ("recall", column("final_recall")),
    "diverged": ("divergence rate", diverged),
    "volatility": ("loss volatility", column("loss_volatility")),
    "wall": ("wall s per run", column("wall_seconds")),
    "generation": ("generation share of wall", _generation_share),
    "pair_yield": ("online pair yield", column("online_pair_yield")),
}
"""Per figure key: the table header and how a run's value is read from the runs table."""

PLOTTED = (("heldout", "accuracy (fraction of pairs)"),
           ("pope_acc", "accuracy (fraction of questions)"),
           ("chair_s", "fraction of captions hallucinating"),
           ("wall", "seconds per run"))
"""The figure's panels: (figure key, y-axis unit)."""
DEFAULT_TUNE = TuneSettings()


@dataclass(frozen=True)
class MethodRow:
    """One tuning group's comparison figures: its coordinates, the tuned ``point``, the
    number of finished runs ``n`` and an :class:`Estimate` per :data:`COMPARED` key."""

    mechanism: str
    epsilon: float
    k: int
    loss: str
    method: str
    point: str
    n: int
    stats: Mapping[str, Estimate]

    def cell(self) -> Cell:
        """The row as a report :class:`Cell` (for :func:`plot_over_epsilon`)."""
        return Cell(point=self.point, mechanism=self.mechanism, epsilon=self.epsilon,
                    k=self.k, loss=self.loss, n_runs=self.n, stats=dict(self.stats),
                    method=self.method)


def _several_methods(runs: pd.DataFrame) -> bool:
    return with_method(ok_runs(runs))["method"].nunique() > 1


def method_rows(runs: pd.DataFrame, tune: TuneSettings = DEFAULT_TUNE) -> list[MethodRow]:
    """A :class:`MethodRow` per tuning group (no DP first, epsilon from large to small, K
    ascending, offline first); ``[]`` when the study has one method."""
    if not _several_methods(runs):
        return []
    return tuned_rows(with_method(ok_runs(runs)), tune, COMPARED)


def tuned_rows(runs: pd.DataFrame, tune: TuneSettings,
               compared: Mapping[str, tuple[str, Reader]]) -> list[MethodRow]:
    """A :class:`MethodRow` per tuning group of ``runs`` (finished, with ``method``) at its
    tuned configuration, with an :class:`Estimate` of each ``compared`` figure."""
    out = []
    for choice in tuned_choices(runs, tune):
        g = choice.group
        rows = runs[runs["point"] == choice.point]
        out.append(MethodRow(str(g["mechanism"]), float(g["epsilon_target"]), int(g["k"]),
                             str(g["loss"]), str(g["method"]), choice.point, len(rows),
                             {key: estimate(read(rows)) for key, (_, read)
                              in compared.items()}))
    return out


def _estimate_cell(est: Estimate) -> TableCell:
    if not est.measured:
        return cell(None)
    return TableCell(f"{format_number(est.mean)} [{format_number(est.low)}, "
                     f"{format_number(est.high)}]", repr(float(est.mean)))


def _coordinates(rows: Sequence[MethodRow]
                 ) -> list[tuple[str, Callable[[MethodRow], TableCell]]]:
    """The row's coordinate columns: ε, K and method always; mechanism and loss when they
    vary."""
    out: list[tuple[str, Callable[[MethodRow], TableCell]]] = []
    if len({r.mechanism for r in rows if math.isfinite(r.epsilon)}) > 1:
        out.append(("mechanism", lambda r: cell(MECHANISM_NAMES.get(r.mechanism,
                                                                    r.mechanism))))
    out += [("ε", lambda r: cell(r.epsilon, NO_DP if math.isinf(r.epsilon) else None)),
            ("K", lambda r: cell(r.k))]
    if len({r.loss for r in rows}) > 1:
        out.append(("loss", lambda r: cell(r.loss)))
    return [*out, ("method", lambda r: cell(r.method)),
            ("tuned point", lambda r: cell(r.point)), ("runs", lambda r: cell(r.n))]


def methods_table(rows: Sequence[MethodRow]) -> Table | None:
    """The "Offline vs online alignment" table (``None`` without rows)."""
    if not rows:
        return None
    return comparison_table(
        "methods", "Offline vs online alignment",
                 "Per ε and K, each alignment method (offline: the recorded pairs; online: "
                 "pairs sampled from the current policy each step, best vs worst by the "
                 "judge; mixed: some of each; bdhs: the recorded chosen vs a rejection "
                 "sampled by the base model with the image masked) at its tuned "
                 "configuration: mean [95% bootstrap CI] over its finished runs. Test "
                 "figures at the last step; the divergence rate and loss volatility as "
                 "stability figures; the generation share is the part of each run's wall "
                 "time spent sampling and judging answers (— where nothing was sampled "
                 "during training); the pair yield is the fraction of prompts sampled "
                 "online whose answers were not all tied. Methods are compared, never "
                 "tuned over. Click a header to sort.", rows, COMPARED)


def comparison_table(table_id: str, title: str, caption: str, rows: Sequence[MethodRow],
                     compared: Mapping[str, tuple[str, Reader]], method: bool = True) -> Table:
    """A table of :class:`MethodRow` s: their coordinate columns (``method`` among them
    unless ``method`` is False), then each ``compared`` figure's estimate."""
    coordinates = [(h, make) for h, make in _coordinates(rows) if method or h != "method"]
    headers = (*(h for h, _ in coordinates), *(h for h, _ in compared.values()))
    body = tuple((*(make(r) for _, make in coordinates),
                  *(_estimate_cell(r.stats[key]) for key in compared)) for r in rows)
    return Table(table_id, title, caption, headers, body)


def _series(rows: Sequence[MethodRow]) -> list[tuple[str, str, list[Cell]]]:
    """(method, label, cells) per line: a method's cells at one K, loss and DP mechanism
    (with the no-DP cell of the same K, loss and method)."""
    cells = [r.cell() for r in rows]
    mechanisms = sorted({c.mechanism for c in cells if c.private}) or ["none"]
    ks, losses = {c.k for c in cells}, {c.loss for c in cells}
    out = []
    for method in dict.fromkeys(c.method for c in cells):
        for mechanism in mechanisms:
            for k in sorted(ks):
                for loss in sorted(losses):
                    members = [c for c in cells if (c.method, c.k, c.loss) == (method, k, loss)
                               and (c.mechanism == mechanism or not c.private)]
                    if not members:
                        continue
                    label = ", ".join([method, *([f"K={k}"] if len(ks) > 1 else []),
                                       *([loss] if len(losses) > 1 else []),
                                       *([MECHANISM_NAMES.get(mechanism, mechanism)]
                                         if len(mechanisms) > 1 else [])])
                    out.append((method, label, members))
    return out


def methods_figure(study: StudyInput, cells: Sequence[Cell]) -> FigureOut | None:
    """Held-out reward accuracy, POPE-adversarial accuracy, CHAIR_s and wall time against
    epsilon, one line per method (color and marker; line style: K) (``None`` with one
    method)."""
    del cells
    rows = method_rows(study.runs, study.tune)
    if not rows:
        return None
    lines = _series(rows)
    methods = list(dict.fromkeys(m for m, _, _ in lines))
    colors = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    ks = sorted({r.k for r in rows})
    fig, axes = new_figure(2, 2)
    scale = epsilon_scale(r.epsilon for r in rows)
    for ax, (key, unit) in zip(axes.ravel(), PLOTTED, strict=True):
        for i, (method, label, members) in enumerate(lines):
            style = {"color": colors[method],
                     "linestyle": LINESTYLES[ks.index(members[0].k) % len(LINESTYLES)],
                     "marker": MARKERS[methods.index(method) % len(MARKERS)]}
            plot_over_epsilon(ax, scale, members, key, style, label,
                              1.04 ** (i - (len(lines) - 1) / 2))
        scale.apply(ax)
        ax.set_title(COMPARED[key][0][0].upper() + COMPARED[key][0][1:])
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes.ravel(), "mean ± 95% CI")
    return FigureOut("methods", "Offline vs online alignment",
                     "Per ε, each alignment method at its tuned configuration: test held-out "
                     "reward accuracy, POPE-adversarial accuracy, CHAIR_s (lower is better) "
                     "and wall seconds per run (mean and 95% CI over seeds); one line per "
                     "method (the table \"Offline vs online alignment\" has every figure).",
                     to_png(fig))
