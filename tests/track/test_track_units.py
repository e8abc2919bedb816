"""The ``log:`` section: tracker names checked at validation against the registry, the
section left out of saved configs while it is the default, the flattening of a config into
params and the points of log rows worked by hand, a failing sink dropped while the others
go on, and no tracking package imported until a sink opens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from readback import tensorboard_series

from dpalign.config import ConfigError, apply_overrides, load_yaml_config
from dpalign.track import (
    SINKS,
    LogConfig,
    Sink,
    Tracker,
    TrackerNotInstalledError,
    TrackingWarning,
    flatten,
    open_tracker,
    points,
    run_info,
)
from dpalign.track.base import RunInfo, Scalars, require
from dpalign.track.mlflow_sink import MAX_PARAM_VALUE, params
from dpalign.train.config import TrainConfig

BASE = {"model": "m", "data": {"train": "pool.jsonl"}}


def test_unknown_tracker_fails_at_validation_naming_the_known_ones(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "log": {"to": ["tensorboard", "wandb"]}}))
    with pytest.raises(ConfigError, match=r"unknown tracker 'wandb'; known: tensorboard, "
                                          r"mlflow"):
        load_yaml_config(TrainConfig, config)
    cfg = TrainConfig.model_validate(BASE)
    with pytest.raises(ConfigError, match=r"unknown tracker 'neptune'; known: tensorboard, "
                                          r"mlflow"):
        apply_overrides(cfg, ["log.to=[mlflow,neptune]"])
    with pytest.raises(ConfigError, match="each tracker once"):
        apply_overrides(cfg, ["log.to=[mlflow,mlflow]"])
    assert list(SINKS) == ["tensorboard", "mlflow"]
    on = apply_overrides(cfg, ["log.to=[tensorboard,mlflow]", "log.mlflow.experiment=e"])
    assert on.log.to == ["tensorboard", "mlflow"] and on.log.mlflow.experiment == "e"


def test_default_log_section_is_left_out_of_saved_configs() -> None:
    """A run without tracking saves the config it saved before the section existed; with
    tracking the section is saved and reads back the same."""
    assert "log" not in TrainConfig.model_validate(BASE).model_dump(mode="json")
    tracked = TrainConfig.model_validate({**BASE, "log": {"to": ["mlflow"]}})
    saved = yaml.safe_load(yaml.safe_dump(tracked.model_dump(mode="json")))
    assert saved["log"] == {"to": ["mlflow"], "tensorboard": {"dir": None},
                            "mlflow": {"tracking_uri": None, "experiment": None,
                                       "run_name": None, "tags": {}}}
    assert TrainConfig.model_validate(saved) == tracked


def test_flatten_and_params_by_hand() -> None:
    config = {"a": {"b": 1, "c": [1, 2], "d": {}, "e": None, "f": "x", "g": True, "h": 0.001},
              "i": "y"}
    assert flatten(config) == {"a.b": "1", "a.c": "[1, 2]", "a.d": "{}", "a.e": "null",
                               "a.f": "x", "a.g": "true", "a.h": "0.001", "i": "y"}
    long = params({"k": "z" * 7000, "short": "s"})
    assert long["short"] == "s"
    assert long["k"] == "z" * (MAX_PARAM_VALUE - 3) + "..." and len(long["k"]) == 6000


def test_points_of_log_rows_by_hand() -> None:
    """Numeric fields only (not step, text, booleans or None), evaluations under eval/ after
    the step they follow, rows in step order."""
    metrics = [{"step": 1, "loss": 0.5, "epsilon": None, "pairs": 4, "note": "x"},
               {"step": 2, "loss": 0.25, "epsilon": 1.5, "clipped": True}]
    evals = [{"step": 0, "heldout_reward_accuracy": 0.0}, {"step": 2, "chair_s": 0.1}]
    assert points(metrics, evals) == [
        (0, {"eval/heldout_reward_accuracy": 0.0}),
        (1, {"loss": 0.5, "pairs": 4.0}),
        (2, {"loss": 0.25, "epsilon": 1.5}),
        (2, {"eval/chair_s": 0.1})]


def test_a_missing_package_names_the_extra() -> None:
    with pytest.raises(TrackerNotInstalledError,
                       match=r"log.to names 'mlflow', which needs the mlflow-skinny package; "
                             r"install it with: pip install 'dpalign\[track\]'"):
        require("mlflow", "dpalign_no_such_module", "mlflow-skinny")


def test_no_tracking_package_is_imported_until_a_sink_opens() -> None:
    code = ("import sys, dpalign, dpalign.cli, dpalign.track, dpalign.track.tracker; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


class BrokenSink(Sink):
    """A backend that goes away after its first row (a tracking server that stops)."""

    extra_module, extra_package = "json", "json"

    def __init__(self) -> None:
        self.rows = 0

    @classmethod
    def open(cls, settings: object, run: RunInfo) -> BrokenSink:
        return cls()

    def log(self, step: int, values: Scalars) -> None:
        self.rows += 1
        if self.rows > 1:
            raise ConnectionError("server gone")

    def close(self, ok: bool) -> None:
        raise ConnectionError("server gone")


def test_a_failing_sink_is_dropped_and_the_others_go_on(tmp_path: Path) -> None:
    """TensorBoard still gets every row after the other sink fails at step 2."""
    board = open_tracker(LogConfig(to=["tensorboard"]), run_info(tmp_path, {}, {}))
    tracker = Tracker({"broken": BrokenSink(), **board.sinks})
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    with pytest.warns(TrackingWarning, match="log.to broken: stopped logging at step 2"):
        for row in rows:
            tracker.metrics(row)
    assert list(tracker.sinks) == ["tensorboard"]
    tracker.close()
    assert tensorboard_series(tmp_path / "tensorboard") == {
        "loss": [(1, 1.0), (2, 0.5), (3, float(np.float32(1 / 3)))]}
