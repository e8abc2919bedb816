"""Audited studies: the ``audit:`` section validates, audited runs count as finished only
with ``audit.json``, runs.parquet carries each run's audit figures (NaN without one) and
points.parquet their mean and max lower bound; a tiny audited study end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from dpalign.rundir import RunDir
from dpalign.study import StudyConfig, expand, run_study, train_config
from dpalign.study.runner import is_finished
from dpalign.study.store import AUDIT_COLUMNS, points_table, runs_table


def _study(world: Path, model: Path, audit: Any = None, **grid: Any) -> StudyConfig:
    return StudyConfig.model_validate({
        "name": "audited", "model": model, "world": world, "workers": 1,
        "grid": {"mechanism": ["dp_sgd"], "epsilon": [math.inf, 4.0], "k": [8],
                 "seed": [0, 1], **grid},
        "audit": audit,
        "base": {"train": {"steps": 2, "batch_size": 4, "threads": 1},
                 "optim": {"schedule": "constant"},
                 "eval": {"every": 2, "world": "end", "limit": 4, "batch_size": 16},
                 "checkpoint": {"every": 2, "keep": 1},
                 "privacy": {"account_every": 2, "sampling": "poisson"}}})


def _audit(claimed: float | None, bound: float, auc: float) -> dict[str, Any]:
    return {"kind": "gradient", "canaries": 300, "included": 151, "claimed_epsilon": claimed,
            "delta": 1e-5, "epsilon_lower_bound": bound,
            "consistent": claimed is None or bound <= claimed, "auc": auc,
            "tpr_at_1pct_fpr": auc / 10, "tpr_at_01pct_fpr": 0.0, "level": 0.05}


def test_study_audit_section_validates(small_world: Path, tiny_model: Path) -> None:
    study = _study(small_world, tiny_model, {"kind": "gradient", "canaries": 200})
    assert study.audit is not None and study.audit.m == 200 and study.audit.kind == "gradient"
    assert _study(small_world, tiny_model).audit is None
    assert _study(small_world, tiny_model, {"kind": "input"}).audit.m == 256
    with pytest.raises(ValidationError, match="no_such_key"):
        _study(small_world, tiny_model, {"kind": "gradient", "no_such_key": 1})
    with pytest.raises(ValidationError):
        _study(small_world, tiny_model, {"kind": "membership"})


def test_an_audited_run_is_finished_only_with_audit_json(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.result.write_text("{}")
    assert is_finished(run.path) and not is_finished(run.path, audited=True)
    run.audit.write_text("{}")
    assert is_finished(run.path, audited=True)


def test_runs_table_carries_each_audit(small_world: Path, tiny_model: Path,
                                       tmp_path: Path) -> None:
    study = _study(small_world, tiny_model, {"canaries": 300})
    points = expand(study)
    configs = {p.name: train_config(study, p) for p in points}
    audits = {points[0].name: _audit(None, 2.5, 0.9), points[1].name: _audit(None, 3.5, 0.8),
              points[2].name: _audit(3.9, 0.25, 0.55)}  # points[3]: finished, not audited
    for p in points:
        run = RunDir(tmp_path / p.name)
        run.path.mkdir()
        run.result.write_text(json.dumps({"privacy": None, "wall_seconds": 1.0}))
        if p.name in audits:
            run.audit.write_text(json.dumps(audits[p.name]))
    runs = runs_table(points, tmp_path, configs).set_index("run")
    assert set(AUDIT_COLUMNS) <= set(runs.columns)
    for name, audit in audits.items():
        row = runs.loc[name]
        claimed = math.inf if audit["claimed_epsilon"] is None else audit["claimed_epsilon"]
        assert row["audit_claimed_epsilon"] == claimed
        assert row["audit_epsilon_lower_bound"] == audit["epsilon_lower_bound"]
        assert row["audit_auc"] == audit["auc"]
        assert row["audit_tpr_at_1pct_fpr"] == audit["tpr_at_1pct_fpr"]
        assert row["audit_consistent"] == audit["consistent"]
        assert (row["audit_kind"], row["audit_canaries"]) == ("gradient", 300)
    plain = runs.loc[points[3].name]
    assert all(pd.isna(plain[c]) for c in AUDIT_COLUMNS)
    by_point = points_table(runs.reset_index()).set_index("point")
    no_dp = by_point.loc[points[0].point]
    assert no_dp["audit_epsilon_lower_bound_mean"] == pytest.approx(3.0)
    assert no_dp["audit_epsilon_lower_bound_max"] == 3.5
    assert by_point.loc[points[2].point, "audit_epsilon_lower_bound_max"] == 0.25


def test_runs_table_without_audits_has_no_audit_columns(small_world: Path, tiny_model: Path,
                                                        tmp_path: Path) -> None:
    study = _study(small_world, tiny_model)
    points = expand(study)
    configs = {p.name: train_config(study, p) for p in points}
    for p in points:
        (tmp_path / p.name).mkdir()
        RunDir(tmp_path / p.name).result.write_text(json.dumps({"privacy": None}))
    runs = runs_table(points, tmp_path, configs)
    assert not set(AUDIT_COLUMNS) & set(runs.columns)
    assert "audit_epsilon_lower_bound_max" not in points_table(runs)


def test_tiny_audited_study_end_to_end(small_world: Path, tiny_model: Path,
                                       tmp_path: Path) -> None:
    study = _study(small_world, tiny_model, {"kind": "gradient", "canaries": 200},
                   epsilon=[4.0], seed=[0])
    study = study.model_copy(update={"base": {**study.base, "eval": {
        "every": 2, "world": False, "limit": 4, "batch_size": 16}}})
    result = run_study(study, tmp_path / "study", workers=1)
    row = result.runs.iloc[0]
    audit = json.loads(RunDir(tmp_path / "study" / "runs" / row["run"]).audit.read_text())
    assert row["status"] == "ok" and audit["canaries"] == 200
    assert row["audit_epsilon_lower_bound"] == audit["epsilon_lower_bound"]
    assert row["audit_claimed_epsilon"] == pytest.approx(audit["claimed_epsilon"])
    assert result.points.iloc[0]["audit_epsilon_lower_bound_max"] == pytest.approx(
        audit["epsilon_lower_bound"])
    again = run_study(study, tmp_path / "study", workers=1)
    assert again.ran == 0
