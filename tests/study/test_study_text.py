"""A text-only study (``text: true``): the world's pairs as text on a causal LM, through the
grid, the runs, the tables and the report, with epsilon from the accountant."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dpalign.data.records import read_preference_jsonl
from dpalign.data.text_pairs import text_pair
from dpalign.privacy.accounting import epsilon
from dpalign.report import write_report
from dpalign.study import StudyConfig, expand, run_study, train_config
from dpalign.world.load import World


def test_text_study_runs_and_reports(small_world: Path, tiny_text_model: Path,
                                     tmp_path: Path) -> None:
    study = StudyConfig.model_validate({
        "name": "text", "model": tiny_text_model, "world": small_world, "workers": 1,
        "text": True,
        "grid": {"mechanism": ["none", "dp_sgd"], "epsilon": [math.inf, 8.0], "k": [16],
                 "seed": [0]},
        "base": {"train": {"steps": 3, "batch_size": 4, "threads": 1},
                 "eval": {"every": 3, "batch_size": 16},
                 "privacy": {"account_every": 1}}})
    cfg = train_config(study, expand(study)[0], tmp_path / "study" / "text")
    assert cfg.world is None  # no POPE/CHAIR on a text model
    world = World.load(small_world)
    assert read_preference_jsonl(cfg.data.train) == [
        text_pair(r) for r in read_preference_jsonl(world.pool_file)]
    assert all(not r.images for r in read_preference_jsonl(cfg.data.heldout))
    assert not (small_world / "prefs-text").exists()  # the world folder is not written
    result = run_study(study, tmp_path / "study")
    runs = result.runs.set_index("run")
    assert set(runs["status"]) == {"ok"}
    dp = runs[runs["mechanism"] == "dp_sgd"].iloc[0]
    plan_eps = epsilon((dp["sigma"], 4 / 16, 3), 1e-5)
    assert dp["epsilon"] == pytest.approx(plan_eps, rel=1e-9) and dp["epsilon"] <= 8.0
    assert "pope_adversarial_accuracy" not in runs.columns or runs[
        "pope_adversarial_accuracy"].isna().all()
    report = write_report(tmp_path / "study")
    assert report.html.is_file() and report.sentences
