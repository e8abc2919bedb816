"""Read a run's trackers back with the packages' own readers, and the logs they mirror, as
``{tag: [(step, value)]}`` series to compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dpalign.io import read_jsonl

Series = dict[str, list[tuple[int, float]]]


def log_series(run: Path) -> Series:
    """Every numeric field of ``metrics.jsonl`` (own name) and ``eval.jsonl`` (``eval/``
    before it) as a series in step order; ``step``, text, booleans and None are none."""
    series: Series = {}
    for name, prefix in (("metrics.jsonl", ""), ("eval.jsonl", "eval/")):
        for row in read_jsonl(run / name):
            for key, value in row.items():
                if key != "step" and type(value) in (int, float):
                    series.setdefault(prefix + key, []).append((row["step"], float(value)))
    return series


def as_float32(series: Series) -> Series:
    """TensorBoard keeps a scalar as a float32 (``simple_value``): the values it can show."""
    return {k: [(s, float(np.float32(v))) for s, v in points] for k, points in series.items()}


def tensorboard_series(folder: Path) -> Series:
    """Every scalar of the event files in ``folder`` as TensorBoard loads them (all points,
    restart purges applied), each tag's points in file order."""
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}


def raw_steps(folder: Path, tag: str) -> list[list[int]]:
    """The steps of ``tag`` in each event file of ``folder`` as written (no purge applied),
    and the restart (purge) steps as negative numbers ``-(step + 1)``."""
    files = []
    for path in sorted(folder.glob("*tfevents*")):
        steps = []
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                steps.append(-(event.step + 1))
            steps += [event.step for v in event.summary.value if v.tag == tag]
        files.append(steps)
    return files


def mlflow_record(run: Path) -> dict[str, Any]:
    return json.loads((run / "mlflow_run.json").read_text())


def mlflow_series(client: MlflowClient, run_id: str) -> Series:
    """Every metric history of the MLflow run, points in step order."""
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in keys}


def flat_config(run: Path) -> dict[str, str]:
    """``config.yaml`` flattened to dotted keys, the documented way: strings as they are,
    other leaves (numbers, booleans, null, lists, empty mappings) as JSON."""
    def walk(node: dict[str, Any], prefix: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in node.items():
            if isinstance(value, dict) and value:
                out |= walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
        return out

    return walk(yaml.safe_load((run / "config.yaml").read_text()), "")
