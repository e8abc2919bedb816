"""The public API, used as a user would: only ``import dpalign`` names and a
``datasets.Dataset`` (TRL's standard text layout), a text-only DP-DPO run in a few lines,
its results read back into pandas, epsilon checked against ``dp_accounting`` directly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from datasets import Dataset

import dpalign
from conftest import pld_epsilon
from dpalign.data.records import read_preference_jsonl


def test_every_public_name_resolves_and_is_documented() -> None:
    names = dpalign.api.__all__
    assert {"train", "make_private", "run_study", "load_study", "load_run", "report",
            "TrainConfig", "epsilon", "calibrate_sigma", "load_model"} <= set(names)
    for name in names:
        assert getattr(dpalign, name) is getattr(dpalign.api, name)
        assert getattr(dpalign, name).__doc__, name
    assert set(names) <= set(dir(dpalign))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dpalign.nope  # noqa: B018


def test_text_dp_dpo_from_a_dataset(tiny_text_model: Path, text_pool: Path,
                                    tmp_path: Path) -> None:
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            for r in read_preference_jsonl(text_pool)]
    dataset = Dataset.from_list(rows)  # TRL's standard preference layout
    # --- the user's script: public API only ---
    result = dpalign.train({"model": str(tiny_text_model),
                            "data": {"train": dataset, "k": 16},
                            "train": {"steps": 4, "batch_size": 4},
                            "eval": {"world": False},
                            "privacy": {"enabled": True, "noise_multiplier": 1.0}},
                           out=tmp_path / "run")
    metrics = dpalign.load_run(result.out).metrics
    # ---
    assert list(metrics.index if metrics.index.name == "step" else metrics["step"]) == [1, 2,
                                                                                       3, 4]
    assert metrics["loss"].iloc[0] == pytest.approx(math.log(2), abs=1e-6)
    eps = result.final_metrics["epsilon"]
    assert eps == pytest.approx(pld_epsilon(1.0, 0.25, 4), rel=1e-3)
    assert eps == dpalign.epsilon((1.0, 0.25, 4), 1e-5)
    # the dataset was written into the run, so its resolved config names a file
    written = read_preference_jsonl(tmp_path / "run" / "data" / "train.jsonl")
    assert [(r.prompt, r.chosen, r.rejected) for r in written] == [
        (x["prompt"], x["chosen"], x["rejected"]) for x in rows]
    assert "data/train.jsonl" in (tmp_path / "run" / "config.yaml").read_text()
