"""The run's tracker: opens the sinks ``log.to`` names and hands each log row to them."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from dpalign.track.base import EVAL_PREFIX, RunInfo, Sink, points, scalars
from dpalign.track.config import LogConfig
from dpalign.track.sinks import SINKS


class TrackingWarning(UserWarning):
    """A sink failed mid-run and was dropped; the JSONL logs go on (``--resume`` of the run,
    even a finished one, brings the tracker up to date)."""


class Tracker:
    """Mirrors a run's ``metrics.jsonl`` and ``eval.jsonl`` rows to its sinks; with none (no
    ``log.to``) it does nothing. A sink that fails while logging is dropped with a
    :class:`TrackingWarning`: the JSONL logs are the record, trackers are mirrors."""

    def __init__(self, sinks: Mapping[str, Sink] | None = None) -> None:
        self.sinks = dict(sinks or {})

    def metrics(self, row: Mapping[str, Any]) -> None:
        """Log a ``metrics.jsonl`` row."""
        self._log(row["step"], scalars(row))

    def evaluation(self, row: Mapping[str, Any]) -> None:
        """Log an ``eval.jsonl`` row (``eval/`` before each key)."""
        self._log(row["step"], scalars(row, EVAL_PREFIX))

    def _log(self, step: int, values: dict[str, float]) -> None:
        if not values:
            return
        for name, sink in list(self.sinks.items()):
            try:
                sink.log(step, values)
            except Exception as exc:  # a mirror must not stop training
                del self.sinks[name]
                warnings.warn(f"log.to {name}: stopped logging at step {step} ({exc}); the "
                              "JSONL logs go on, --resume brings the tracker up to date",
                              TrackingWarning, stacklevel=3)

    def close(self, ok: bool = True) -> None:
        """End every sink (``ok`` False: the run failed)."""
        for name, sink in self.sinks.items():
            try:
                sink.close(ok)
            except Exception as exc:  # the run itself is done (or already failing)
                warnings.warn(f"log.to {name}: could not close ({exc})", TrackingWarning,
                              stacklevel=2)
        self.sinks = {}

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close(ok=kind is None)


def check_installed(log: LogConfig) -> None:
    """Raise ``TrackerNotInstalledError`` (naming the extra) when a sink's package is missing."""
    for name in log.to:
        SINKS[name].check(name, getattr(log, name))


def setup_shared(log: LogConfig) -> None:
    """Prepare the stores that several runs share (a study's MLflow experiment) before the
    runs start in parallel."""
    check_installed(log)
    for name in log.to:
        SINKS[name].setup(getattr(log, name))


def run_info(out: Path, config: Mapping[str, Any], tags: Mapping[str, str],
             metrics: Iterable[Mapping[str, Any]] = (),
             evals: Iterable[Mapping[str, Any]] = ()) -> RunInfo:
    """The :class:`RunInfo` of the run in ``out`` whose logs hold ``metrics`` and ``evals``."""
    return RunInfo(Path(out), Path(out).name, config, dict(tags), points(metrics, evals))


def open_tracker(log: LogConfig, run: RunInfo) -> Tracker:
    """Open the sinks of ``log.to`` on ``run``, each brought to hold ``run.logged``; no
    sinks: a tracker that does nothing."""
    check_installed(log)
    opened: dict[str, Sink] = {}
    try:
        for name in log.to:
            opened[name] = SINKS[name].open(getattr(log, name), run)
    except BaseException:
        Tracker(opened).close(ok=False)
        raise
    return Tracker(opened)

