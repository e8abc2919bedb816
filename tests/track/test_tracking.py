"""A tiny DP run mirrored to TensorBoard and MLflow (the real packages), read back with their
own readers and compared with ``metrics.jsonl`` / ``eval.jsonl`` field by field: MLflow
exactly (it stores float64), TensorBoard to float32 rounding (it stores a scalar as a
float32 ``simple_value``). Params are the flattened ``config.yaml``; epsilon is a series at
the accounted steps. A crash after the checkpoint at step 4 and a resume end with one point
per step, equal to the final logs; resuming a finished run changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from readback import (
    as_float32,
    flat_config,
    log_series,
    mlflow_record,
    mlflow_series,
    raw_steps,
    tensorboard_series,
)

from conftest import CrashError, crash_at
from dpalign.io import read_jsonl
from dpalign.train.config import TrainConfig
from dpalign.train.loop import train


def tracked_config(model: Path, pool: Path) -> TrainConfig:
    """16 text pairs, 6 DP steps of 4, epsilon every 2 steps, held-out every 3, checkpoints
    every 2, both trackers on with their defaults (files in the run directory)."""
    return TrainConfig.model_validate({
        "model": str(model),
        "data": {"train": str(pool), "heldout": str(pool.with_name("heldout.jsonl")), "k": 16},
        "train": {"steps": 6, "batch_size": 4, "seed": 0},
        "eval": {"every": 3, "world": False},
        "checkpoint": {"every": 2, "keep": 2},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "account_every": 2},
        "log": {"to": ["tensorboard", "mlflow"], "mlflow": {"experiment": "tiny"}}})


@pytest.fixture(scope="module")
def runs(tiny_text_model: Path, text_pool: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run, and one crashed at step 5 (newest checkpoint: step 4) then
    resumed; both log to stores in their own directories."""
    cfg = tracked_config(tiny_text_model, text_pool)
    root = tmp_path_factory.mktemp("track")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        whole = train(cfg, root / "whole").out
        crashed = root / "crashed"
        with pytest.raises(CrashError):
            train(cfg, crashed, on_step=crash_at(5))
        first_id = mlflow_record(crashed)["run_id"]
        train(cfg, crashed, resume=True)
    return {"cfg": cfg, "whole": whole, "crashed": crashed, "first_id": first_id}


def _client(run: Path) -> MlflowClient:
    uri = mlflow_record(run)["tracking_uri"]
    assert uri == f"sqlite:///{(run / 'mlflow.db').resolve()}"  # the default local store
    return MlflowClient(uri)


@pytest.mark.parametrize("name", ["whole", "crashed"])
def test_tensorboard_holds_the_logs_in_float32(runs: dict[str, Any], name: str) -> None:
    """Every numeric field of every row, at its step, once, as float32; nothing else."""
    run = runs[name]
    expected = as_float32(log_series(run))
    assert tensorboard_series(run / "tensorboard") == expected
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in expected["eval/heldout_reward_accuracy"]] == [0, 3, 6]


@pytest.mark.parametrize("name", ["whole", "crashed"])
def test_mlflow_holds_the_logs_exactly(runs: dict[str, Any], name: str) -> None:
    """One MLflow run whose metric histories are the logs' series in float64, params the
    flattened resolved config, tags naming the run."""
    run = runs[name]
    client = _client(run)
    run_id = mlflow_record(run)["run_id"]
    assert mlflow_series(client, run_id) == log_series(run)
    mlrun = client.get_run(run_id)
    assert mlrun.data.params == flat_config(run)
    assert mlrun.data.params["privacy.noise_multiplier"] == "1.0"
    assert mlrun.data.params["log.to"] == '["tensorboard", "mlflow"]'
    tags = mlrun.data.tags
    assert tags["dpalign.run_dir"] == str(run.resolve())
    assert (tags["dpalign.method"], tags["dpalign.loss"], tags["dpalign.dp"]) == (
        "offline", "dpo", "true")
    assert tags["mlflow.runName"] == name
    assert mlrun.info.status == "FINISHED"
    experiment = client.get_experiment_by_name("tiny")
    active = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in active] == [run_id]


def test_epsilon_is_a_series_at_the_accounted_steps(runs: dict[str, Any]) -> None:
    """epsilon (account_every 2) is logged at steps 2, 4, 6 with the rows' values; the last
    is privacy.json's spent epsilon."""
    run = runs["whole"]
    rows = read_jsonl(run / "metrics.jsonl")
    wanted = [(r["step"], r["epsilon"]) for r in rows if r["epsilon"] is not None]
    assert [s for s, _ in wanted] == [2, 4, 6]
    held = mlflow_series(_client(run), mlflow_record(run)["run_id"])
    assert held["epsilon"] == wanted
    assert tensorboard_series(run / "tensorboard")["epsilon"] == as_float32(
        {"e": wanted})["e"]
    privacy = json.loads((run / "result.json").read_text())["privacy"]
    assert privacy["epsilon"] == wanted[-1][1]


def test_resume_replaces_the_mlflow_run_that_holds_recomputed_steps(
        runs: dict[str, Any]) -> None:
    """The crashed attempt logged step 5 after the checkpoint at 4; MLflow cannot delete
    points, so the resumed run continues in a replacement run (the old one deleted, tagged
    with its successor) and the record names it."""
    run = runs["crashed"]
    client = _client(run)
    new_id, old_id = mlflow_record(run)["run_id"], runs["first_id"]
    assert new_id != old_id
    old = client.get_run(old_id)
    assert old.info.lifecycle_stage == "deleted"
    assert old.data.tags["dpalign.replaced_by"] == new_id
    assert client.get_run(new_id).data.tags["dpalign.replaces"] == old_id
    assert [s for s, _ in mlflow_series(client, old_id)["loss"]] == [1, 2, 3, 4, 5]


def test_resume_purges_the_recomputed_tensorboard_steps(runs: dict[str, Any]) -> None:
    """The first event file holds the crashed attempt's steps 1-5; the resumed writer
    restarts at step 5 (purging the old 5) and writes 5 and 6: TensorBoard shows each
    once (the test above), with the resumed values."""
    assert raw_steps(runs["crashed"] / "tensorboard", "loss") == [
        [1, 2, 3, 4, 5], [-(5 + 1), 5, 6]]


def test_resuming_a_finished_run_changes_no_tracker(runs: dict[str, Any]) -> None:
    """The stores already hold every point: the same MLflow run is reused and nothing is
    logged twice, TensorBoard shows the same points."""
    run = runs["whole"]
    before = mlflow_record(run)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        train(runs["cfg"], run, resume=True)
    assert mlflow_record(run) == before
    client = _client(run)
    assert mlflow_series(client, before["run_id"]) == log_series(run)
    assert client.get_run(before["run_id"]).info.status == "FINISHED"
    assert tensorboard_series(run / "tensorboard") == as_float32(log_series(run))
