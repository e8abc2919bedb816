"""``run_study``: validate a study, run what is not finished, write the result tables.

Study directory layout:

    DIR/study.yaml        the resolved StudyConfig (a rerun must match it)
    DIR/study.json        command, time, git revision, versions, machine (CPU model, flags,
                          torch kernel set), base weights' hash, accountant
    DIR/base.json         the base model's figures, evaluated as every run's end (reference)
    DIR/halving.json      with successive halving: the promoted points and pruned runs
    DIR/runs/<run>/       one training run directory each (dpalign.train.loop), plus
                          diagnostics.json when finished, error.json when it failed; in an
                          audited study (``audit:``) each is an audit (dpalign.audit.run):
                          audit/ and audit.json besides
    DIR/runs.parquet      a row per run        (dpalign.study.store)
    DIR/points.parquet    a row per grid point (dpalign.study.store)
    DIR/mlflow.db         with base.log.to naming mlflow (and no other tracking URI): the
                          study's MLflow store, one experiment, one MLflow run per grid run
                          (dpalign.study.grid.with_tracking)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dpalign.audit.run import audited_config
from dpalign.config import ConfigError
from dpalign.diagnostics import diagnose_run_dir
from dpalign.io import atomic_write_json, atomic_write_text
from dpalign.progress import make_progress
from dpalign.rundir import StudyDir
from dpalign.study.base import evaluate_base, read_base
from dpalign.study.config import StudyConfig
from dpalign.study.grid import TEXT_DIR, Point, expand, train_config, with_tracking
from dpalign.study.halving import promoted, rungs
from dpalign.study.provenance import weights_hash, write_provenance
from dpalign.study.runner import (
    BACKENDS,
    RunTask,
    is_finished,
    record_failure,
    threads_per_run,
)
from dpalign.study.store import points_table, runs_table, write_parquet
from dpalign.track import setup_shared
from dpalign.train.config import TrainConfig


@dataclass(frozen=True)
class StudyResult:
    out: Path
    runs: pd.DataFrame
    points: pd.DataFrame
    ran: int
    skipped: int


def _without_no_audit(data: dict[str, Any]) -> dict[str, Any]:
    """A study's YAML data without ``audit: null`` (studies written before audits lack it)."""
    return {k: v for k, v in data.items() if not (k == "audit" and v is None)}


def _dumped(study: StudyConfig) -> dict[str, Any]:
    """``study`` as the data of ``study.yaml``."""
    return _without_no_audit(study.model_dump(mode="json"))


def _claim(out: Path, study: StudyConfig) -> None:
    """Write ``study.yaml``, or check that a rerun is the same study."""
    saved, wanted = StudyDir(out).config, _dumped(study)
    if saved.is_file():
        if _without_no_audit(yaml.safe_load(saved.read_text())) != wanted:
            raise ConfigError(f"{out}: holds a different study ({saved}); use another --out "
                              "or the same config")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(wanted, sort_keys=False))


def _run(tasks: list[RunTask], backend: str, workers: int, address: str | None,
         study_dir: StudyDir, bar: Any, task_id: Any,
         on_run: Callable[[dict[str, Any]], None] | None) -> None:
    for outcome in (BACKENDS[backend](tasks, workers, address) if tasks else []):
        if outcome["status"] == "failed":  # the backend's word when the worker died
            record_failure(study_dir.run(outcome["run"]).path, outcome["error"])
        bar.update(task_id, advance=1, info=f"{outcome['run']} {outcome['status']}")
        if on_run:
            on_run(outcome)


def _rungs(study: StudyConfig, points: list[Point]) -> tuple[list[Point], list[Point], int]:
    """Successive halving's first rung, the rest, and how many of the rest will run."""
    if study.halving is None:
        return points, [], 0
    return rungs(points, study.grid.seed, study.halving.seeds, study.halving.keep)


def run_study(study: StudyConfig, out: str | Path, *, backend: str = "local",
              workers: int | None = None, address: str | None = None,
              command: list[str] | None = None,
              on_run: Callable[[dict[str, Any]], None] | None = None) -> StudyResult:
    """Run every unfinished run of ``study`` under ``out`` and write the tables (with
    ``study.halving``: the first rung, then the promoted configurations' other seeds)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    out = Path(out)
    points = expand(study)
    configs = {p.name: with_tracking(train_config(study, p, out / TEXT_DIR), study, p, out)
               for p in points}  # every error before any run
    _check_tuning(study, configs)
    _check_audit(study, configs)
    _claim(out, study)
    study_dir = StudyDir(out)
    first_config = next(iter(configs.values()))
    setup_shared(first_config.log)  # the study's MLflow experiment, before runs in parallel
    digest = weights_hash(first_config.model)
    write_provenance(study_dir.meta, study, command if command is not None else sys.argv,
                     first_config, digest)
    evaluate_base(first_config, study_dir.base, digest)
    workers = workers or study.workers

    audit = study.audit.model_dump(mode="json") if study.audit is not None else None

    def tasks(todo: list[Point]) -> list[RunTask]:
        return [RunTask(p.name, configs[p.name].model_dump(mode="json"),
                        str(study_dir.run(p.name).path), threads_per_run(workers), audit)
                for p in todo if not is_finished(study_dir.run(p.name).path, audit is not None)]

    rung1, rest, later = _rungs(study, points)
    first_tasks = tasks(rung1)
    ran = len(first_tasks)
    with make_progress() as bar:
        total = len(rung1) + later
        task_id = bar.add_task(f"study {study.name}", total=total,
                               completed=len(rung1) - len(first_tasks), info="")
        _run(first_tasks, backend, workers, address, study_dir, bar, task_id, on_run)
        pruned: set[str] = set()
        if study.halving is not None:
            table = runs_table(rung1, study_dir.runs, configs)
            kept = promoted(rung1, table, study.tune.metric, study.halving.keep)
            pruned = {p.name for p in rest if p.point not in kept}
            atomic_write_json(study_dir.halving, {
                "metric": study.tune.metric, "first_rung_seeds": sorted({p.seed for p in rung1}),
                "keep": study.halving.keep, "promoted": sorted(kept),
                "pruned_runs": sorted(pruned)})
            second = tasks([p for p in rest if p.name not in pruned])
            bar.update(task_id, completed=total - len(second))
            ran += len(second)
            _run(second, backend, workers, address, study_dir, bar, task_id, on_run)
    return collect(out, points, configs, ran=ran, pruned=pruned)


def _check_tuning(study: StudyConfig, configs: Mapping[str, TrainConfig]) -> None:
    """Tuning on a public split needs every run to name its validation file."""
    if study.tune.split == "public" and any(c.eval.validation is None
                                            for c in configs.values()):
        raise ConfigError(f"study {study.name!r}: tune.split=public needs base.eval.validation "
                          "(a public file of validation pairs)")


def _check_audit(study: StudyConfig, configs: Mapping[str, TrainConfig]) -> None:
    """An audited study's runs must be auditable (a DP run samples Poisson), checked before
    any run starts."""
    if study.audit is None:
        return
    for name, config in configs.items():
        try:
            audited_config(config)
        except ValueError as exc:
            raise ConfigError(f"study {study.name!r}, run {name}: {exc}") from exc


def collect(out: Path, points: list[Point], configs: Mapping[str, TrainConfig],
            ran: int = 0, pruned: set[str] | None = None) -> StudyResult:
    """Rebuild ``runs.parquet`` and ``points.parquet`` from the run directories (finished
    runs' diagnostics recomputed from their logs, so the tables follow today's rules)."""
    study_dir = StudyDir(out)
    base = read_base(study_dir.base)
    for p in points:
        run = study_dir.run(p.name)
        if run.is_finished():
            atomic_write_json(run.diagnostics,
                              diagnose_run_dir(run.path, base=base).as_dict())
    runs = runs_table(points, study_dir.runs, configs, pruned or set())
    summary = points_table(runs)
    write_parquet(runs, study_dir.runs_table)
    write_parquet(summary, study_dir.points_table)
    return StudyResult(out, runs, summary, ran, len(points) - ran)
