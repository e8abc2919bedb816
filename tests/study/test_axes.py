"""Any setting as a study axis (dotted TrainConfig keys, sample_rate), short run names, the
effective settings in the tables, successive halving, the base model's figures and the
machine in study.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dpalign.config import ConfigError
from dpalign.study import StudyConfig, expand, run_study, train_config
from dpalign.study.halving import kept_count, promoted
from dpalign.study.provenance import cpu_info, weights_hash
from dpalign.study.store import runs_table


def _study(world: Path, model: Path, grid: dict[str, Any], **extra: Any) -> StudyConfig:
    return StudyConfig.model_validate({
        "name": "axes", "model": model, "world": world, "workers": 1,
        "grid": {"mechanism": ["dp_sgd"], "k": [8], "seed": [0], **grid},
        "base": {"train": {"steps": 4, "batch_size": 4, "threads": 1},
                 "optim": {"schedule": "constant"},
                 "eval": {"every": 2, "world": "end", "limit": 4, "batch_size": 16,
                          "validation_fraction": 0.5},
                 "checkpoint": {"every": 4, "keep": 1},
                 "privacy": {"account_every": 2}}, **extra})


def test_setting_axes_name_runs_and_set_their_configs(small_world: Path, tiny_model: Path) -> None:
    study = _study(small_world, tiny_model, {
        "epsilon": [math.inf, 4.0], "privacy.max_grad_norm": [0.3, 1.0],
        "sample_rate": [0.5, 1.0], "optim.name": ["adamw", "sgd"]})
    points = expand(study)
    # privacy.* does nothing without DP: the no-noise runs are not repeated per C
    assert len(points) == 2 * 2 + 2 * 2 * 2
    names = [p.name for p in points]
    assert "dp_sgd-eps4-k8-dpo-C0.3-q0.5-adamw-s0" in names
    assert "none-epsinf-k8-dpo-q1-sgd-s0" in names
    by_name = {p.name: p for p in points}
    cfg = train_config(study, by_name["dp_sgd-eps4-k8-dpo-C0.3-q0.5-sgd-s0"])
    assert (cfg.privacy.max_grad_norm, cfg.train.batch_size, cfg.optim.name) == (0.3, 4, "sgd")
    plain = train_config(study, by_name["none-epsinf-k8-dpo-q1-sgd-s0"])
    assert plain.train.batch_size == 8 and not plain.privacy.enabled


@pytest.mark.parametrize(("grid", "message"), [
    ({"data.k": [4]}, "use grid.k"),
    ({"train.seed": [1]}, "use grid.seed"),
    ({"steps": [3]}, "not an axis"),
    ({"sample_rate": [1.5]}, "fractions of K"),
    ({"optim.lr": []}, "non-empty"),
])
def test_bad_axes_are_refused(small_world: Path, tiny_model: Path, grid: dict[str, Any],
                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _study(small_world, tiny_model, grid)


def test_a_bad_setting_value_fails_before_any_run(small_world: Path, tiny_model: Path,
                                                 tmp_path: Path) -> None:
    study = _study(small_world, tiny_model, {"epsilon": [4.0], "privacy.max_grad_norm": [-1]})
    with pytest.raises(ConfigError, match="run dp_sgd-eps4-k8-dpo-C-1-s0"):
        run_study(study, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_halving_keeps_the_best_of_each_group() -> None:
    assert [kept_count(n, 0.2) for n in (1, 3, 9, 10)] == [1, 1, 2, 2]
    assert kept_count(9, 1 / 3) == 3

    class P:  # the fields promoted() reads of a grid point
        def __init__(self, point: str, epsilon: float) -> None:
            self.point, self.mechanism, self.epsilon, self.k, self.loss = (
                point, "dp_sgd", epsilon, 8, "dpo")

    points = [P("a", 1.0), P("b", 1.0), P("c", 1.0), P("d", 2.0), P("e", 2.0)]
    runs = pd.DataFrame({"point": ["a", "a", "b", "b", "c", "d", "e"],
                         "status": ["ok", "ok", "ok", "ok", "failed", "ok", "ok"],
                         "m": [0.6, 0.8, 0.75, 0.7, math.nan, math.nan, 0.5]})
    # group eps 1: means a 0.70, b 0.725, c none -> b; eps 2: d NaN ranks last -> e
    assert promoted(points, runs, "m", 0.3) == {"b", "e"}  # type: ignore[arg-type]
    assert promoted(points, runs, "m", 0.5) == {"a", "b", "e"}  # type: ignore[arg-type]


def test_cpu_info_reads_model_and_flags() -> None:
    text = ("processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\nflags\t\t: fpu sse4_2 avx avx2 "
            "fma avx512f\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_info(text) == {"model": "Example CPU @ 2.0GHz",
                              "flags": ["sse4_2", "avx", "avx2", "fma", "avx512f"]}


def test_weights_hash_follows_the_bytes(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "config.json").write_text("{}")
    first = weights_hash(tmp_path)
    assert first == weights_hash(tmp_path) and len(first or "") == 64
    (tmp_path / "config.json").write_text('{"x": 1}')  # not weights
    assert weights_hash(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert weights_hash(tmp_path) != first
    assert weights_hash(tmp_path / "nothing") is None


def test_two_by_two_study_over_clip_norm_and_lr_with_halving(small_world: Path,
                                                             tiny_model: Path,
                                                             tmp_path: Path) -> None:
    """privacy.max_grad_norm x optim.lr, seeds {0, 1}; halving: all four configurations run
    seed 0, the best two by validation reward accuracy run seed 1."""
    study = _study(small_world, tiny_model,
                   {"epsilon": [4.0], "seed": [0, 1], "privacy.max_grad_norm": [0.1, 1.0],
                    "optim.lr": [1e-3, 1e-2]},
                   halving={"seeds": 1, "keep": 0.5})
    out = tmp_path / "s"
    result = run_study(study, out, workers=1)
    runs = result.runs.set_index("run")
    assert len(runs) == 8 and (runs["status"] == "ok").sum() == 6
    assert (runs["status"] == "pruned").sum() == 2
    first = runs[runs["seed"] == 0]
    best = first.sort_values("final_val_reward_accuracy", ascending=False, kind="stable")
    halving = json.loads((out / "halving.json").read_text())
    assert len(halving["promoted"]) == 2
    # the promoted points are the two best seed-0 validation scores (ties by name)
    scores = sorted(((-v, p) for p, v in zip(best["point"], best["final_val_reward_accuracy"],
                                             strict=True)))
    assert set(halving["promoted"]) == {p for _, p in scores[:2]}
    for name, row in runs.iterrows():
        assert row["max_grad_norm"] == row["privacy.max_grad_norm"]
        assert row["lr"] == row["optim.lr"]
        assert (row["batch_size"], row["steps"], row["clipping"]) == (4, 4, "fixed")
        assert row["sample_rate"] == pytest.approx(0.5)
        if row["status"] == "ok":
            saved = (out / "runs" / str(name) / "config.yaml").read_text()
            assert f"max_grad_norm: {row['max_grad_norm']}" in saved
    points = result.points.set_index("point")
    assert set(points["lr"]) == {1e-3, 1e-2}
    assert points["n_runs"].sum() == 6
    meta = json.loads((out / "study.json").read_text())
    assert meta["base_model"]["weights_sha256"] == weights_hash(tiny_model)
    assert meta["machine"]["cpu"]["model"] and meta["machine"]["torch_cpu_capability"]
    base = json.loads((out / "base.json").read_text())
    assert 0 <= base["pope_adversarial_accuracy"] <= 1 and base["pope_adversarial_n"] > 0
    # the base's figures equal a run's step... each run ends evaluated with the same settings
    assert set(base) >= {k for k in json.loads(
        (out / "runs" / str(runs.index[0]) / "eval.jsonl").read_text().splitlines()[-1])
        if k.startswith(("pope_", "chair_"))}
    again = runs_table(expand(study), out / "runs",
                       {p.name: train_config(study, p) for p in expand(study)})
    assert (again["status"] == "pending").sum() == 2  # pruning is the study's decision
