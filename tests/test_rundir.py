"""The run- and study-directory names are an output contract: pin them, and the readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpalign.rundir import RunDir, RunDirError, StudyDir, checkpoint_name, read_log


def test_run_dir_names_every_file(tmp_path: Path):
    run = RunDir(tmp_path)
    names = {"config": "config.yaml", "env": "env.json", "metrics": "metrics.jsonl",
             "evals": "eval.jsonl", "privacy": "privacy.json", "result": "result.json",
             "error": "error.json", "diagnostics": "diagnostics.json",
             "reference_dir": "reference", "checkpoints": "checkpoints", "final": "final"}
    for attr, name in names.items():
        assert getattr(run, attr) == tmp_path / name
    assert run.reference("heldout") == tmp_path / "reference" / "heldout.safetensors"
    assert checkpoint_name(42) == "step_000042"
    assert RunDir(str(tmp_path)) == run  # a str path is made a Path


def test_study_dir_names_every_file(tmp_path: Path):
    study = StudyDir(tmp_path)
    assert (study.config, study.meta, study.runs_table, study.points_table) == (
        tmp_path / "study.yaml", tmp_path / "study.json", tmp_path / "runs.parquet",
        tmp_path / "points.parquet")
    assert (study.base, study.halving) == (tmp_path / "base.json", tmp_path / "halving.json")
    assert study.run("a_s0") == RunDir(tmp_path / "runs" / "a_s0")


def test_readers_of_a_run(tmp_path: Path):
    run = RunDir(tmp_path)
    assert run.read_evals() == [] and run.read_result() is None and not run.is_finished()
    run.metrics.write_text('{"step": 1, "loss": NaN}\n\n{"step": 2, "loss": 0.5}\n')
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 0.5
    run.result.write_text(json.dumps({"steps": 2}))
    assert run.read_result() == {"steps": 2} and run.is_finished()
    run.result.write_text("[1]")
    with pytest.raises(RunDirError, match=r"result\.json: expected a JSON object"):
        run.read_result()


def test_read_log_is_strict_even_on_the_last_line(tmp_path: Path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"step": 1}\n{"step": 2')  # a torn last line is an error for readers
    with pytest.raises(RunDirError, match=r"eval\.jsonl:2: not valid JSON"):
        read_log(path)
    path.write_text('{"step": true}\n')
    with pytest.raises(RunDirError, match=r"eval\.jsonl:1: .*integer 'step'"):
        read_log(path)
    with pytest.raises(RunDirError, match=r"absent\.jsonl: file not found"):
        read_log(tmp_path / "absent.jsonl")
