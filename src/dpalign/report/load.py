"""Read what a report needs from a study directory or a single run directory.

A study directory holds ``study.json``, ``runs.parquet``, ``points.parquet`` (recomputed
from ``runs.parquet`` with :func:`dpalign.study.store.points_table` when absent),
``runs/<run>/`` and optionally ``base.json`` (the untrained base model's figures under the
final-eval keys without ``final_``, e.g. ``pope_adversarial_accuracy``, ``chair_s``,
``recall``); a run directory holds ``metrics.jsonl`` (plus ``config.yaml``,
``env.json``, ``eval.jsonl``, ``privacy.json``, ``result.json`` when written, and
``audit.json`` with ``audit/scores.png`` when the run was audited).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpalign.rundir import RunDir, RunDirError, StudyDir, read_log
from dpalign.study.analysis import TuneSettings
from dpalign.study.store import points_table

__all__ = [
    "ReportInputError",
    "RunInput",
    "StudyInput",
    "load_input",
    "metrics_frame",
]


class ReportInputError(ValueError):
    """The directory is not something a report can be built from; the message names it."""


@dataclass(frozen=True)
class StudyInput:
    """A study: its metadata (``study.json``), run and point tables, per-run step logs
    (``logs[run]``: a frame indexed by step; runs without ``metrics.jsonl`` are absent) and
    the base model's figures (``base.json``; empty when absent)."""

    path: Path
    meta: Mapping[str, Any]
    runs: pd.DataFrame
    points: pd.DataFrame
    logs: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    base: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tune(self) -> TuneSettings:
        """``config.tune`` of ``study.json`` (its defaults when missing)."""
        config = self.meta.get("config")
        return TuneSettings.from_config(config if isinstance(config, Mapping) else None)


@dataclass(frozen=True)
class RunInput:
    """One run directory's files (absent optional files are empty / ``None``); ``audit``:
    ``audit.json``, ``audit_scores``: the PNG bytes of ``audit/scores.png``."""

    path: Path
    metrics: pd.DataFrame
    evals: list[dict[str, Any]]
    config_text: str
    env: Mapping[str, Any]
    privacy: Mapping[str, Any] | None
    result: Mapping[str, Any] | None
    audit: Mapping[str, Any] | None = None
    audit_scores: bytes | None = None


def _read_json(path: Path) -> Any:
    """A JSON file's content, ``None`` when absent; :class:`ReportInputError` if malformed."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def metrics_frame(path: Path) -> pd.DataFrame:
    """``metrics.jsonl`` as a frame indexed by step (later rows win for a repeated step);
    null and non-finite values become NaN in numeric columns."""
    rows = read_log(path)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(index=pd.Index([], name="step"))
    frame = frame.drop_duplicates("step", keep="last").set_index("step").sort_index()
    return frame.apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)


def _load_logs(path: Path, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``metrics.jsonl`` of every run that has one, by run name."""
    logs = {}
    for run in runs["run"]:
        file = StudyDir(path).run(str(run)).metrics
        if file.exists():
            logs[str(run)] = metrics_frame(file)
    return logs


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ReportInputError(f"{path}: cannot read ({exc})") from exc



def _base_figures(data: Any) -> dict[str, Any]:
    """``base.json``'s figures: its top-level entries that are not objects (the cache
    ``key`` and other nested records are left out)."""
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if not isinstance(v, dict | list)}


def load_study(path: Path) -> StudyInput:
    """A study directory (see the module docstring)."""
    study = StudyDir(path)
    runs_file = study.runs_table
    if not runs_file.exists():
        raise ReportInputError(f"{path}: a study directory needs {runs_file.name} "
                               f"(the study has not finished its first run?)")
    runs = _read_parquet(runs_file)
    points_file = study.points_table
    points = _read_parquet(points_file) if points_file.exists() else points_table(runs)
    meta = _read_json(study.meta) or {}
    return StudyInput(path, meta, runs, points, _load_logs(path, runs),
                      _base_figures(_read_json(study.base)))


def load_run(path: Path) -> RunInput:
    """A run directory (see the module docstring)."""
    run = RunDir(path)
    try:
        metrics = metrics_frame(run.metrics)
        evals = run.read_evals()
    except RunDirError as exc:
        raise ReportInputError(str(exc)) from exc
    scores = run.audit_dir / "scores.png"
    return RunInput(path, metrics, evals,
                    run.config.read_text(encoding="utf-8") if run.config.exists() else "",
                    _read_json(run.env) or {}, _read_json(run.privacy), _read_json(run.result),
                    _read_json(run.audit), scores.read_bytes() if scores.is_file() else None)


_KINDS: tuple[tuple[Callable[[Path], bool], Callable[[Path], StudyInput | RunInput]], ...] = (
    (lambda p: StudyDir(p).meta.exists() or StudyDir(p).runs_table.exists(), load_study),
    (lambda p: RunDir(p).metrics.exists(), load_run),
)


def load_input(path: str | Path) -> StudyInput | RunInput:
    """The study or run at ``path``; :class:`ReportInputError` naming ``path`` when it is
    neither."""
    path = Path(path)
    if not path.is_dir():
        raise ReportInputError(f"{path}: no such directory")
    for matches, load in _KINDS:
        if matches(path):
            return load(path)
    raise ReportInputError(
        f"{path}: neither a study directory (no study.json or runs.parquet) nor a run "
        f"directory (no metrics.jsonl)")
