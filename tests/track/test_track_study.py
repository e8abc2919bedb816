"""A tracked study: ``base.log.to: [tensorboard, mlflow]`` gives one MLflow experiment named
after the study in one store (``STUDY/mlflow.db``), one MLflow run per grid run tagged with
its grid values, and each run's TensorBoard files in its own run folder; the study process
creates the experiment, the worker process logs into it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from readback import as_float32, flat_config, log_series, mlflow_record, mlflow_series
from readback import tensorboard_series as board

from dpalign.study import StudyConfig, run_study


def test_study_logs_one_mlflow_run_per_grid_run(small_world: Path, tiny_text_model: Path,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = StudyConfig.model_validate({
        "name": "trk", "model": tiny_text_model, "world": small_world, "workers": 1,
        "text": True,
        "grid": {"mechanism": ["none"], "k": [16], "seed": [0, 1], "lr": [0.002]},
        "base": {"train": {"steps": 3, "batch_size": 4, "threads": 1},
                 "eval": {"every": 3, "batch_size": 16},
                 "log": {"to": ["tensorboard", "mlflow"]}}})
    out = tmp_path / "study"
    result = run_study(study, out)  # the local backend: runs in a spawned worker
    assert set(result.runs["status"]) == {"ok"}

    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("trk")
    mlruns = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # the grid's values by hand (columns of the runs table; mechanism none has epsilon inf)
    grid = {f"none-epsinf-k16-dpo-lr0.002-s{seed}": {
        "mechanism": "none", "epsilon_target": "inf", "k": "16", "loss": "dpo",
        "method": "offline", "seed": str(seed), "optim.lr": "0.002"} for seed in (0, 1)}
    assert set(mlruns) == set(grid)
    for name, values in grid.items():
        run = out / "runs" / name
        mlrun = mlruns[name]
        tags = {k: v for k, v in mlrun.data.tags.items() if k.startswith("grid.")}
        assert tags == {f"grid.{k}": v for k, v in values.items()}
        assert mlrun.data.tags["dpalign.study"] == "trk"
        assert mlrun.data.tags["dpalign.point"] == "none-epsinf-k16-dpo-lr0.002"
        assert mlrun.data.params == flat_config(run)
        assert mlrun.data.params["log.mlflow.tags.grid.mechanism"] == values["mechanism"]
        assert mlflow_record(run) == {"tracking_uri": uri, "run_id": mlrun.info.run_id,
                                      "experiment_id": experiment.experiment_id}
        assert mlflow_series(client, mlrun.info.run_id) == log_series(run)
        assert board(run / "tensorboard") == as_float32(log_series(run))
        assert not (run / "mlflow.db").exists()  # the study's store, not one per run
