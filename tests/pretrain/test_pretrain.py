"""Pretraining the tiny VLM: the loss falls, the folder loads, a rerun is cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_PRETRAIN_KW
from dpalign.models.load import load_model
from dpalign.pretrain import PretrainConfig, pretrain


def test_a_few_pretrain_steps_lower_the_loss(tiny_model: Path) -> None:
    rows = [json.loads(line) for line in (tiny_model / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    # Cross-entropy starts near log(vocab) and must fall by a clear margin in 40 steps.
    assert first > 5.0
    assert last < 0.7 * first


def test_pretrained_folder_loads_with_auto_classes(tiny_model: Path) -> None:
    vlm = load_model(tiny_model)
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    assert not vlm.model.training
    meta = json.loads((tiny_model / "pretrain.json").read_text())
    assert meta["steps"] == 40 and meta["n_parameters"] == sum(
        p.numel() for p in vlm.model.parameters())


def test_rerun_with_same_config_is_cached_and_other_config_refused(
        tiny_model: Path, small_world: Path) -> None:
    cfg = PretrainConfig(**TINY_PRETRAIN_KW)
    before = (tiny_model / "model.safetensors").stat().st_mtime_ns
    result = pretrain(small_world, tiny_model, cfg)
    assert not result.built
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--force"):
        pretrain(small_world, tiny_model, cfg.model_copy(update={"steps": 41}))
