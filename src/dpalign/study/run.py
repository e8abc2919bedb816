"""``run_study``: validate a study, run what is not finished, write the result tables.

Study directory layout:

    DIR/study.yaml        the resolved StudyConfig (a rerun must match it)
    DIR/study.json        command, time, git revision, versions, machine, accountant
    DIR/runs/<run>/       one training run directory each (dpalign.train.loop), plus
                          diagnostics.json when finished, error.json when it failed
    DIR/runs.parquet      a row per run        (dpalign.study.store)
    DIR/points.parquet    a row per grid point (dpalign.study.store)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dpalign.config import ConfigError
from dpalign.io import atomic_write_json, atomic_write_text
from dpalign.progress import make_progress
from dpalign.rundir import StudyDir
from dpalign.study.config import StudyConfig
from dpalign.study.grid import Point, expand, train_config
from dpalign.study.runner import (
    BACKENDS,
    RunTask,
    is_finished,
    record_failure,
    threads_per_run,
)
from dpalign.study.store import points_table, runs_table, write_parquet

PACKAGES = ("dpalign", "torch", "transformers", "peft", "dp-accounting", "pandas", "ray")


@dataclass(frozen=True)
class StudyResult:
    out: Path
    runs: pd.DataFrame
    points: pd.DataFrame
    ran: int
    skipped: int


def _versions() -> dict[str, str | None]:
    def one(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {name: one(name) for name in PACKAGES}


def _git_revision() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).parent, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def _claim(out: Path, study: StudyConfig) -> None:
    """Write ``study.yaml``, or check that a rerun is the same study."""
    saved, wanted = StudyDir(out).config, study.model_dump(mode="json")
    if saved.is_file():
        if yaml.safe_load(saved.read_text()) != wanted:
            raise ConfigError(f"{out}: holds a different study ({saved}); use another --out "
                              "or the same config")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(wanted, sort_keys=False))


def _provenance(out: Path, study: StudyConfig, command: list[str], accountant: str) -> None:
    atomic_write_json(StudyDir(out).meta, {
        "name": study.name, "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_revision": _git_revision(), "versions": _versions(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "accountant": accountant, "config": study.model_dump(mode="json")})


def run_study(study: StudyConfig, out: str | Path, *, backend: str = "local",
              workers: int | None = None, address: str | None = None,
              command: list[str] | None = None,
              on_run: Callable[[dict[str, Any]], None] | None = None) -> StudyResult:
    """Run every unfinished run of ``study`` under ``out`` and write the tables."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    out = Path(out)
    points = expand(study)
    configs = {p.name: train_config(study, p) for p in points}  # every error before any run
    _claim(out, study)
    accountant = next(iter(configs.values())).privacy.accountant
    _provenance(out, study, command if command is not None else sys.argv, accountant)
    workers = workers or study.workers
    study_dir = StudyDir(out)
    todo = [p for p in points if not is_finished(study_dir.run(p.name).path)]
    tasks = [RunTask(p.name, configs[p.name].model_dump(mode="json"),
                     str(study_dir.run(p.name).path), threads_per_run(workers)) for p in todo]
    with make_progress() as bar:
        task_id = bar.add_task(f"study {study.name}", total=len(points),
                               completed=len(points) - len(todo), info="")
        for outcome in (BACKENDS[backend](tasks, workers, address) if tasks else []):
            if outcome["status"] == "failed":  # the backend's word when the worker died
                record_failure(study_dir.run(outcome["run"]).path, outcome["error"])
            bar.update(task_id, advance=1, info=f"{outcome['run']} {outcome['status']}")
            if on_run:
                on_run(outcome)
    return collect(out, points, ran=len(todo))


def collect(out: Path, points: list[Point], ran: int = 0) -> StudyResult:
    """Rebuild ``runs.parquet`` and ``points.parquet`` from the run directories."""
    study_dir = StudyDir(out)
    runs = runs_table(points, study_dir.runs)
    summary = points_table(runs)
    write_parquet(runs, study_dir.runs_table)
    write_parquet(summary, study_dir.points_table)
    return StudyResult(out, runs, summary, ran, len(points) - ran)
