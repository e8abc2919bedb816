"""MLflow: one MLflow run per training run (``MlflowClient``, no server needed), with the
flattened resolved config as params, tags (run directory, method, loss, model, and
``log.mlflow.tags``: a study's grid values), and a metric history per numeric field, one
point per step.

Store: ``log.mlflow.tracking_uri``; unset, ``$MLFLOW_TRACKING_URI`` when set, else
``sqlite:///OUT/mlflow.db``, a local SQLite store in the run directory (MLflow's
recommended local backend; its file store ``./mlruns`` refuses new writes unless
``MLFLOW_ALLOW_FILE_STORE`` is set). ``OUT/mlflow_run.json`` records the store, experiment
and run id (written atomically), so a resumed run finds its MLflow run again.

Resume: the store is the ledger. ``open`` asks it for every metric history of the recorded
run and compares them with the points the JSONL logs kept:
- the store holds a part of them and nothing else (a crash right at a checkpoint): the run
  is reused (status RUNNING again) and the missing points are logged;
- it holds points the resumed run recomputes (logged after the checkpoint, before the crash)
  or any other difference: MLflow cannot delete metric points, so a replacement run (same
  name, params and tags, tag ``dpalign.replaces``) gets every kept point and becomes the
  recorded run; the old one is deleted (MLflow's soft delete: hidden, ``mlflow gc`` purges).
Either way the recorded run's histories end equal to the final ``metrics.jsonl`` and
``eval.jsonl``, one point per step. The store's SQL column cannot hold an infinity: MLflow
keeps +-inf as +-1.8e308 (NaN is kept as NaN).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from dpalign.config import Section
from dpalign.io import atomic_write_json
from dpalign.track.base import (
    Points,
    RunInfo,
    Scalars,
    Sink,
    first_difference,
    flatten,
    require,
)

STORE = "mlflow.db"
"""The local SQLite store's file in the run directory (no tracking URI given)."""
RECORD = "mlflow_run.json"
"""The run directory's record of its MLflow run: tracking URI, experiment id, run id."""
DEFAULT_EXPERIMENT = "dpalign"
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_TAG_VALUE = 8000
BATCH_METRICS, BATCH_PARAMS = 1000, 100  # MLflow's log_batch limits


class MLflowConfig(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:///path/mlflow.db, "
                          "databricks, ...); None = $MLFLOW_TRACKING_URI when set, else "
                          "sqlite:///OUT/mlflow.db (a study: STUDY/mlflow.db)")
    experiment: str | None = Field(
        None, description="MLflow experiment (created when missing); None = 'dpalign' (a "
                          "study: the study's name)")
    run_name: str | None = Field(
        None, description="MLflow run name; None = the run directory's name (a study: the "
                          "grid run's name)")
    tags: dict[str, str] = Field(
        default_factory=dict, description="extra tags of the MLflow run (a study adds its "
                                          "grid values as grid.<axis>)")


def tracking_uri(settings: MLflowConfig, out: Path) -> str:
    """The store a run logs to when it starts (see the module docstring)."""
    if settings.tracking_uri:
        return settings.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(out / STORE)


def sqlite_uri(path: Path) -> str:
    """``sqlite:///`` + the absolute path of ``path``."""
    return f"sqlite:///{Path(path).resolve()}"


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing (another process creating it at
    the same moment is fine)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def stored(value: float) -> float:
    """``value`` as an MLflow SQL store returns it (+-inf become +-max float)."""
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def params(config: Mapping[str, Any]) -> dict[str, str]:
    """The flattened config as MLflow params: values longer than MLflow's limit are cut
    (ending in ``...``), keys longer than its limit are left out with a warning."""
    flat = flatten(config)
    long = [k for k in flat if len(k) > MAX_KEY]
    if long:
        warnings.warn(f"MLflow params: left out keys over {MAX_KEY} characters: {long}",
                      stacklevel=2)
    return {k: v if len(v) <= MAX_PARAM_VALUE else v[:MAX_PARAM_VALUE - 3] + "..."
            for k, v in flat.items() if len(k) <= MAX_KEY}


class MLflowSink(Sink):
    extra_module = "mlflow"
    extra_package = "mlflow-skinny"

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def check(cls, name: str, settings: MLflowConfig) -> None:
        """mlflow, and for a SQLite store (the default) sqlalchemy and alembic."""
        super().check(name, settings)
        if tracking_uri(settings, Path(".")).startswith("sqlite:"):
            require(name, "sqlalchemy", "sqlalchemy")
            require(name, "alembic", "alembic")

    @classmethod
    def setup(cls, settings: MLflowConfig) -> None:
        """Create the experiment (and a new SQLite store's tables) once, before a study's
        runs open the store in parallel; nothing when each run has its own store (no
        tracking URI)."""
        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            from mlflow.tracking import MlflowClient

            experiment_id(MlflowClient(uri), settings.experiment or DEFAULT_EXPERIMENT)

    @classmethod
    def open(cls, settings: MLflowConfig, run: RunInfo) -> MLflowSink:
        from mlflow.tracking import MlflowClient

        record_path = run.out / RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        uri = record.get("tracking_uri") or tracking_uri(settings, run.out)
        client = MlflowClient(uri)
        old = record.get("run_id")
        held = _histories(client, old) if old else None
        if held is not None and first_difference(held, _held_part(held, run.logged),
                                                 stored) is None:
            sink = cls(client, old)  # the store holds only kept points: go on with them
            client.update_run(old, status="RUNNING")
            sink._log_params(params(run.config))  # the same values again: a no-op
            sink._log_points([(step, {k: v for k, v in values.items()
                                      if step not in held.get(k, {})})
                              for step, values in run.logged])
            return sink
        tags = {k: v[:MAX_TAG_VALUE] for k, v in run.tags.items()}
        if held is not None:
            tags["dpalign.replaces"] = old
        created = client.create_run(
            experiment_id(client, settings.experiment or DEFAULT_EXPERIMENT),
            run_name=settings.run_name or run.name, tags=tags)
        sink = cls(client, created.info.run_id)
        sink._log_params(params(run.config))
        atomic_write_json(record_path, {"tracking_uri": uri,
                                        "experiment_id": created.info.experiment_id,
                                        "run_id": sink.run_id})
        if held is not None:  # the old run holds points the JSONL logs no longer have
            client.set_tag(old, "dpalign.replaced_by", sink.run_id)
            client.delete_run(old)
        sink._log_points(run.logged)
        return sink

    def _log_params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH_PARAMS])

    def _log_points(self, points: Points) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for step, values in points for k, v in values.items()]
        for i in range(0, len(items), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + BATCH_METRICS])

    def log(self, step: int, values: Scalars) -> None:
        self._log_points([(step, values)])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _histories(client: Any, run_id: str) -> dict[str, dict[int, list[float]]] | None:
    """``{key: {step: [values]}}`` of every metric of ``run_id``; None when the store has no
    such live run."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_run(run_id)
    except MlflowException:
        return None
    if found.info.lifecycle_stage != "active":
        return None
    held: dict[str, dict[int, list[float]]] = {}
    for key in found.data.metrics:
        steps: dict[int, list[float]] = defaultdict(list)
        for metric in client.get_metric_history(run_id, key):
            steps[metric.step].append(metric.value)
        held[key] = dict(steps)
    return held


def _held_part(held: Mapping[str, Mapping[int, Any]], logged: Points) -> Points:
    """The points of ``logged`` the store should hold if it holds only kept points: those
    whose (key, step) it holds."""
    return [(step, {k: v for k, v in values.items() if step in held.get(k, {})})
            for step, values in logged]
