"""The alignment method as a study axis: run names (offline unchanged, the others suffixed),
the method in every tuning group and in successive halving (never tuned over), and a small
real study of offline and online DPO whose per-run online figures are recomputed by hand from
each run's step log."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from dpalign.io import read_jsonl
from dpalign.study import StudyConfig, expand, load_study, preset_path, run_study, train_config
from dpalign.study.analysis import TuneSettings, tuned_choices
from dpalign.study.grid import Point
from dpalign.study.halving import promoted


def _study(world: Path, model: Path, **grid: Any) -> StudyConfig:
    """Runs of 2 steps of 4 pairs, held-out at the end, no POPE/CHAIR, RDP accounting;
    online runs sample 2 answers of at most 8 tokens per prompt."""
    return StudyConfig.model_validate({
        "name": "online", "model": model, "world": world, "workers": 1,
        "grid": {"mechanism": ["dp_sgd"], "epsilon": [math.inf, 8.0], "k": [8], "seed": [0],
                 "method": ["offline", "online"], **grid},
        "base": {"train": {"steps": 2, "batch_size": 4, "threads": 1},
                 "optim": {"schedule": "constant"},
                 "eval": {"every": 2, "world": False, "batch_size": 16},
                 "checkpoint": {"every": 2, "keep": 1},
                 "privacy": {"account_every": 2, "accountant": "rdp"},  # calibrates fast
                 "online": {"samples": 2, "sampling": {"max_new_tokens": 8}}}})


# --- grid ------------------------------------------------------------------------------------

def test_method_axis_names_runs_and_sets_the_method(small_world: Path, tiny_model: Path) -> None:
    study = _study(small_world, tiny_model, **{"privacy.max_grad_norm": [0.3]})
    points = expand(study)
    assert [p.name for p in points] == [
        "dp_sgd-eps8-k8-dpo-C0.3-s0", "dp_sgd-eps8-k8-dpo-online-C0.3-s0",
        "none-epsinf-k8-dpo-s0", "none-epsinf-k8-dpo-online-s0"]
    by_name = {p.name: p for p in points}
    online = by_name["dp_sgd-eps8-k8-dpo-online-C0.3-s0"]
    assert online.columns() == {
        "run": online.name, "point": "dp_sgd-eps8-k8-dpo-online-C0.3", "mechanism": "dp_sgd",
        "epsilon_target": 8.0, "k": 8, "loss": "dpo", "method": "online", "seed": 0,
        "privacy.max_grad_norm": 0.3}
    configs = {name: train_config(study, p) for name, p in by_name.items()}
    assert {n: c.method for n, c in configs.items()} == {
        "dp_sgd-eps8-k8-dpo-C0.3-s0": "offline", "dp_sgd-eps8-k8-dpo-online-C0.3-s0": "online",
        "none-epsinf-k8-dpo-s0": "offline", "none-epsinf-k8-dpo-online-s0": "online"}
    assert configs[online.name].online.samples == 2  # the base's online section
    assert configs[online.name].privacy.max_grad_norm == 0.3


def test_method_is_validated_and_only_set_by_the_grid(small_world: Path,
                                                     tiny_model: Path) -> None:
    with pytest.raises(ValidationError, match=r"unknown method.*'offlne'"):
        _study(small_world, tiny_model, method=["offlne"])
    data = _study(small_world, tiny_model).model_dump()
    with pytest.raises(ValidationError, match=r"set by grid\.method"):
        StudyConfig.model_validate({**data, "base": {**data["base"], "method": "online"}})


def test_online_preset_compares_four_methods(small_world: Path, tiny_model: Path) -> None:
    study = load_study(preset_path("online"), [f"model={tiny_model}", f"world={small_world}"])
    points = expand(study)
    assert len(points) == 4 * 2 * 3
    assert {p.point for p in points if p.mechanism == "dp_sgd"} == {
        "dp_sgd-eps8-k64-dpo", "dp_sgd-eps8-k64-dpo-online", "dp_sgd-eps8-k64-dpo-mixed",
        "dp_sgd-eps8-k64-dpo-bdhs"}
    config = train_config(study, next(p for p in points if p.method == "mixed"))
    assert (config.method, config.online.samples, config.online.sampling.max_new_tokens,
            config.train.steps, config.train.batch_size) == ("mixed", 4, 40, 30, 16)


# --- compared, never tuned over ----------------------------------------------------------------

def _point(name: str, method: str, lr: float) -> Point:
    return Point("dp_sgd", 8.0, 8, "dpo", lr, 0, (), method)


def test_method_joins_the_tuning_group() -> None:
    """Online scores higher on validation than both offline lrs: tuned over the method it
    would be the only choice; as a group key each method keeps its own best."""
    runs = pd.DataFrame({
        "point": ["off-a", "off-a", "off-b", "off-b", "on-a", "on-a"],
        "method": ["offline", "offline", "offline", "offline", "online", "online"],
        "mechanism": "dp_sgd", "epsilon_target": 8.0, "k": 8, "loss": "dpo",
        "lr": [1e-3, 1e-3, 3e-3, 3e-3, 1e-3, 1e-3], "status": "ok",
        "final_val_reward_accuracy": [0.6, 0.7, 0.8, 0.7, 0.95, 0.9],
        "final_heldout_reward_accuracy": [0.61, 0.69, 0.79, 0.71, 0.9, 0.92]})
    choices = tuned_choices(runs, TuneSettings())
    assert [(c.group["method"], c.point, c.n_candidates) for c in choices] == [
        ("offline", "off-b", 2), ("online", "on-a", 1)]
    assert choices[0].test["final_heldout_reward_accuracy"].mean == pytest.approx(0.75)
    # a table written before methods existed: every run is offline, one group
    old = tuned_choices(runs[runs["method"] == "offline"].drop(columns="method"))
    assert [(c.group["method"], c.point) for c in old] == [("offline", "off-b")]


def test_halving_never_prunes_one_method_for_another() -> None:
    points = [_point("off-a", "offline", 1e-3), _point("off-b", "offline", 3e-3),
              _point("on-a", "online", 1e-3), _point("on-b", "online", 3e-3)]
    runs = pd.DataFrame({"point": [p.point for p in points], "status": "ok",
                         "m": [0.6, 0.7, 0.9, 0.95]})
    # keep 1/4: over all four only the online lr 3e-3 would go on; per method, one each
    assert promoted(points, runs, "m", 0.25) == {
        "dp_sgd-eps8-k8-dpo-lr0.003", "dp_sgd-eps8-k8-dpo-online-lr0.003"}


# --- a real study ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, small_world: Path,
             tiny_model: Path) -> Path:
    out = tmp_path_factory.mktemp("study") / "online"
    run_study(_study(small_world, tiny_model), out, workers=1)
    return out


def test_runs_table_has_the_method_and_online_figures(finished: Path) -> None:
    runs = pd.read_parquet(finished / "runs.parquet").set_index("run")
    assert (runs["status"] == "ok").all()
    assert runs["method"].to_dict() == {
        "dp_sgd-eps8-k8-dpo-s0": "offline", "dp_sgd-eps8-k8-dpo-online-s0": "online",
        "none-epsinf-k8-dpo-s0": "offline", "none-epsinf-k8-dpo-online-s0": "online"}
    for name, row in runs.iterrows():
        log = read_jsonl(finished / "runs" / str(name) / "metrics.jsonl")
        result = pd.read_json(finished / "runs" / str(name) / "result.json", typ="series")
        assert row["wall_seconds"] == pytest.approx(result["wall_seconds"])
        if row["method"] == "offline":
            assert not any("online_prompts" in r for r in log)
            assert math.isnan(row["online_pair_yield"]) and math.isnan(row["online_seconds"])
            continue
        assert len(log) == 2 and all(r["online_prompts"] >= 1 for r in log)
        pairs, prompts = (sum(r[k] for r in log) for k in ("online_pairs", "online_prompts"))
        assert row["online_pair_yield"] == pytest.approx(pairs / prompts, rel=1e-12)
        assert row["online_seconds"] == pytest.approx(sum(r["online_seconds"] for r in log))
        assert row["online_score_best_final"] == pytest.approx(log[-1]["online_score_best"])
        assert 0 < row["online_seconds"] < row["wall_seconds"]
    points = pd.read_parquet(finished / "points.parquet").set_index("point")
    assert points["method"].to_dict() == {
        "dp_sgd-eps8-k8-dpo": "offline", "dp_sgd-eps8-k8-dpo-online": "online",
        "none-epsinf-k8-dpo": "offline", "none-epsinf-k8-dpo-online": "online"}
    online = runs.loc["dp_sgd-eps8-k8-dpo-online-s0"]
    assert points.loc["dp_sgd-eps8-k8-dpo-online", "online_pair_yield_mean"] == pytest.approx(
        online["online_pair_yield"])
