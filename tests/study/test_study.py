"""Studies: grid expansion and naming, a tiny study end to end (tables checked against the
diagnostics computed directly), a failing run that does not stop the others, resume after
an interrupted study, and the Ray backend on a local Ray."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import CrashError, crash_at, without_time
from dpalign.cli import app
from dpalign.config import ConfigError
from dpalign.diagnostics import aggregate, diagnose_run_dir
from dpalign.io import read_jsonl
from dpalign.study import (
    StudyConfig,
    expand,
    load_study,
    preset_path,
    run_study,
    train_config,
)
from dpalign.study.runner import RunTask, run_one
from dpalign.train.loop import train


def _study(world: Path, model: Path, **grid: Any) -> StudyConfig:
    """Runs of 4 steps of 4 pairs; held-out every 2 steps; POPE/CHAIR at the end on 4
    images per part."""
    return StudyConfig.model_validate({
        "name": "tiny", "model": model, "world": world, "workers": 1,
        "grid": {"mechanism": ["dp_sgd"], "epsilon": [math.inf, 4.0], "k": [8, 16],
                 "seed": [0], **grid},
        "overrides": {"dp_sgd": {"optim.lr": 2e-3}},
        "base": {"train": {"steps": 4, "batch_size": 4, "threads": 1},
                 "optim": {"schedule": "constant"},
                 "eval": {"every": 2, "world": "end", "limit": 4, "batch_size": 16},
                 "checkpoint": {"every": 2, "keep": 1},
                 "privacy": {"account_every": 2}}})


# --- grid ------------------------------------------------------------------------------------

def test_quickstart_preset_expands_to_24_named_runs(small_world: Path, tiny_model: Path) -> None:
    study = load_study(preset_path("quickstart"), [f"model={tiny_model}", f"world={small_world}"])
    points = expand(study)
    assert len(points) == 4 * 2 * 3
    assert {p.point for p in points if p.mechanism == "none"} == {"none-epsinf-k32-dpo",
                                                                   "none-epsinf-k128-dpo"}
    assert "dp_sgd-eps0.5-k128-dpo-s2" in {p.name for p in points}
    assert len({p.name for p in points}) == len(points)


def test_grid_normalises_no_noise_and_label_dp(small_world: Path, tiny_model: Path) -> None:
    study = _study(small_world, tiny_model, mechanism=["none", "dp_sgd", "label_dp"],
                   epsilon=[math.inf, 2.0], k=[8], seed=[0, 1], lr=[None, 1e-3])
    points = expand(study)
    # none x {inf, 2} collapse, dp_sgd/label_dp at inf collapse into none: 1 + 2 = 3 x 2 x 2
    assert len(points) == 3 * 2 * 2
    by_name = {p.name: p for p in points}
    label = train_config(study, by_name["label_dp-eps2-k8-dpo-lr0.001-s1"])
    assert (label.loss.name, label.privacy.label_epsilon, label.privacy.enabled) == (
        "robust", 2.0, False)
    assert label.loss.params["flip_rate"] == pytest.approx(1 / (1 + math.exp(2.0)))
    assert label.optim.lr == 1e-3 and label.train.seed == 1 and label.data.k == 8
    dp = train_config(study, by_name["dp_sgd-eps2-k8-dpo-s1"])
    assert (dp.privacy.enabled, dp.privacy.target_epsilon, dp.privacy.noise_seed) == (True, 2.0, 1)
    assert dp.optim.lr == 2e-3  # the mechanism's override
    plain = train_config(study, by_name["none-epsinf-k8-dpo-s0"])
    assert not plain.privacy.enabled and plain.optim.lr == 5e-4


def test_bad_study_fails_before_any_run(small_world: Path, tiny_model: Path,
                                        tmp_path: Path) -> None:
    study = _study(small_world, tiny_model, loss=["dpo", "no-such-loss"])
    with pytest.raises(ConfigError, match="no-such-loss"):
        run_study(study, tmp_path / "s")
    assert not (tmp_path / "s").exists()


# --- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, small_world: Path,
             tiny_model: Path) -> tuple[StudyConfig, Path, Any]:
    """A 2 x 2 study (epsilon {inf, 4} x K {8, 16}, one seed) run by the CLI, two workers."""
    out = tmp_path_factory.mktemp("study") / "s"
    config = out.parent / "study.yaml"
    study = _study(small_world, tiny_model)
    config.write_text(json.dumps(study.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["study", "--config", str(config), "--out", str(out),
                                      "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    return study, out, json.loads(result.output.strip().splitlines()[-1])


def test_tiny_study_tables_follow_the_run_directories(finished: tuple) -> None:
    study, out, printed = finished
    runs, points = pd.read_parquet(out / "runs.parquet"), pd.read_parquet(out / "points.parquet")
    assert sorted(runs["run"]) == sorted(p.name for p in expand(study))
    assert (runs["status"] == "ok").all() and printed["failed"] == 0 and printed["runs"] == 4
    for _, row in runs.iterrows():
        direct = diagnose_run_dir(out / "runs" / row["run"]).as_dict()
        for key in ("loss_volatility", "final_heldout_reward_accuracy",
                    "final_pope_adversarial_accuracy", "final_chair_s", "n_steps"):
            assert row[key] == pytest.approx(direct[key], nan_ok=True), key
        result = json.loads((out / "runs" / row["run"] / "result.json").read_text())
        if row["mechanism"] == "dp_sgd":
            assert row["epsilon"] == result["privacy"]["epsilon"] <= 4.0 + 1e-6
            assert row["sigma"] == result["privacy"]["sigma"] > 0
        else:
            assert math.isinf(row["epsilon"]) and row["epsilon_kind"] == "none"
    # one row per grid point, aggregating its runs exactly as dpalign.diagnostics does
    assert len(points) == 4 and (points["n_runs"] == 1).all()
    point = points.set_index("point").loc["dp_sgd-eps4-k16-dpo"]
    one = runs[runs["point"] == "dp_sgd-eps4-k16-dpo"]
    expected = aggregate(one[["loss_volatility", "diverged"]].to_dict("records"))
    assert point["loss_volatility_mean"] == pytest.approx(expected["loss_volatility_mean"])
    assert point["divergence_rate"] == expected["divergence_rate"] == 0.0
    assert {"study.yaml", "study.json"} <= {p.name for p in out.iterdir()}
    provenance = json.loads((out / "study.json").read_text())
    assert provenance["accountant"] == "pld" and provenance["versions"]["torch"]


def test_rerunning_a_finished_study_redoes_nothing(finished: tuple) -> None:
    study, out, _ = finished
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    result = run_study(study, out)
    assert result.ran == 0 and result.skipped == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}


def test_a_different_study_in_the_same_directory_is_refused(finished: tuple) -> None:
    study, out, _ = finished
    other = study.model_copy(update={"name": "other"})
    with pytest.raises(ConfigError, match="different study"):
        run_study(other, out)


def test_failing_run_is_recorded_and_the_others_finish(small_world: Path, tiny_model: Path,
                                                       tmp_path: Path) -> None:
    """The DP runs ask for batches of 16 from K=8 pairs: refused before the model loads
    (as without DP); the failure is recorded with its traceback and the other run ends."""
    study = _study(small_world, tiny_model, epsilon=[math.inf, 4.0], k=[8])
    study = study.model_copy(update={"overrides": {
        "dp_sgd": {"optim.lr": 2e-3, "train.batch_size": 16}}})
    result = run_study(study, tmp_path / "s")
    runs = result.runs.set_index("run")
    assert runs.loc["none-epsinf-k8-dpo-s0", "status"] == "ok"
    assert runs.loc["dp_sgd-eps4-k8-dpo-s0", "status"] == "failed"
    assert "train.batch_size=16 exceeds the 8 training pairs" in runs.loc[
        "dp_sgd-eps4-k8-dpo-s0", "error"]
    error = json.loads((tmp_path / "s/runs/dp_sgd-eps4-k8-dpo-s0/error.json").read_text())
    assert "Traceback" in error["traceback"]
    assert result.points.set_index("point").loc["dp_sgd-eps4-k8-dpo", "n_failed"] == 1


def test_killed_worker_is_recorded_as_failed_and_retried(small_world: Path, tiny_model: Path,
                                                          tmp_path: Path) -> None:
    """A worker process SIGKILLed mid-run (what the out-of-memory killer does) leaves no
    result and no traceback: the study must say the run failed, and why, not "pending";
    the next invocation runs it to the end."""
    study = _study(small_world, tiny_model, epsilon=[4.0], k=[8])
    out = tmp_path / "s"
    started = out / "runs" / expand(study)[0].name / "config.yaml"

    def kill_the_worker() -> None:
        deadline = time.monotonic() + 120
        while not started.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    result = run_study(study, out)
    killer.join()
    row = result.runs.iloc[0]
    assert row["status"] == "failed"
    assert row["error"].startswith("worker died: BrokenProcessPool")
    assert "out of memory" in row["error"]
    assert pd.read_parquet(out / "runs.parquet")["status"].tolist() == ["failed"]

    again = run_study(study, out)
    assert again.ran == 1 and again.runs["status"].tolist() == ["ok"]
    assert not (started.parent / "error.json").exists()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie awaiting its reaper does not)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_study(small_world: Path, tiny_model: Path,
                                        tmp_path: Path) -> None:
    """``dpalign study`` SIGKILLed (as a scheduler's preemption ends it) takes its worker
    processes with it: none is left training into the run directories."""
    study = _study(small_world, tiny_model, epsilon=[4.0], k=[8])
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study.model_dump(mode="json")))
    out = tmp_path / "s"
    started = out / "runs" / expand(study)[0].name / "config.yaml"
    cli = [str(Path(sys.executable).parent / "dpalign"), "study", "--config", str(config),
           "--out", str(out)]
    parent = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not started.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        children = [int(pid) for task in Path(f"/proc/{parent.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
    finally:
        parent.kill()
        parent.wait()
    assert children, "the study had no worker process"
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in children if _alive(pid)]
    assert not (started.parent / "result.json").exists()


def test_interrupted_study_resumes_to_the_uninterrupted_result(
        small_world: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A study killed with one run finished and one half-way: the rerun leaves the first
    alone and continues the second from its checkpoint; both equal uninterrupted runs."""
    study = _study(small_world, tiny_model, epsilon=[4.0], k=[8, 16])
    points = expand(study)
    out = tmp_path / "s"
    first, second = (out / "runs" / p.name for p in points)
    run_one(RunTask(points[0].name, train_config(study, points[0]).model_dump(mode="json"),
                    str(first), 1))
    stamp = (first / "result.json").stat().st_mtime_ns
    with pytest.raises(CrashError):
        train(train_config(study, points[1]), second, on_step=crash_at(3))
    assert not (second / "result.json").exists()

    result = run_study(study, out)
    assert result.ran == 1 and (first / "result.json").stat().st_mtime_ns == stamp
    reference = tmp_path / "reference"
    run_one(RunTask(points[1].name, train_config(study, points[1]).model_dump(mode="json"),
                    str(reference), 1))
    assert without_time(read_jsonl(second / "metrics.jsonl")) == without_time(
        read_jsonl(reference / "metrics.jsonl"))
    assert (read_jsonl(second / "eval.jsonl") == read_jsonl(reference / "eval.jsonl"))
    assert (result.runs["status"] == "ok").all()


def test_ray_backend_on_a_local_ray(small_world: Path, tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    study = _study(small_world, tiny_model, epsilon=[4.0], k=[8])
    result = run_study(study, tmp_path / "s", backend="ray", workers=1)
    assert list(result.runs["status"]) == ["ok"]
    local = tmp_path / "local"
    run_one(RunTask(result.runs["run"][0], train_config(study, expand(study)[0]).model_dump(
        mode="json"), str(local), 1))
    assert without_time(read_jsonl(tmp_path / "s/runs" / result.runs["run"][0] / "metrics.jsonl")
                        ) == without_time(read_jsonl(local / "metrics.jsonl"))
