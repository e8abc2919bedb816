"""A text-only DP-DPO run end to end: a causal LM folder (``LlamaForCausalLM`` and its
tokenizer) and image-less records through the trainer and the CLI, as a VLM run goes:
step 1 at policy == reference, epsilon against ``dp_accounting`` run directly, an exact
resume, held-out evaluation, and the saved model loading back as a causal LM."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from conftest import CrashError, assert_same_run, crash_at, pld_epsilon, without_time
from dpalign.cli import app
from dpalign.io import read_jsonl
from dpalign.models.families import TextProcessor
from dpalign.models.load import load_model
from dpalign.train.config import TrainConfig
from dpalign.train.loop import TrainResult, train

DELTA = 1e-5


def text_config(model: Path, pool: Path, **overrides: Any) -> dict[str, Any]:
    """16 text pairs, 6 DP steps of 4 (sigma 1, q = 4/16), held-out every 3 steps."""
    return {"model": str(model),
            "data": {"train": str(pool), "heldout": str(pool.with_name("heldout.jsonl")),
                     "k": 16},
            "train": {"steps": 6, "batch_size": 4, "seed": 0},
            "eval": {"every": 3, "world": False},
            "checkpoint": {"every": 2, "keep": 2},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "account_every": 1},
            **overrides}


@pytest.fixture(scope="module")
def finished(tiny_text_model: Path, text_pool: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, TrainResult]:
    cfg = TrainConfig.model_validate(text_config(tiny_text_model, text_pool))
    return cfg, train(cfg, tmp_path_factory.mktemp("text") / "whole")


def test_first_step_is_dpo_at_policy_equal_reference(
        finished: tuple[TrainConfig, TrainResult]) -> None:
    """LoRA starts at B = 0: the policy is its reference, so every pair's DPO loss is
    log 2 and no pair's implicit reward wins."""
    _, result = finished
    first = read_jsonl(result.out / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["reward_accuracy"] == 0.0
    assert first["dp_units"] == first["pairs"] > 0


def test_epsilon_is_dp_accountings_and_resume_is_exact(
        finished: tuple[TrainConfig, TrainResult], tmp_path: Path) -> None:
    cfg, whole = finished
    out = tmp_path / "crashed"
    with pytest.raises(CrashError):
        train(cfg, out, on_step=crash_at(5))
    train(cfg, out, resume=True)
    assert_same_run(out, whole.out)
    rows = read_jsonl(out / "metrics.jsonl")
    final = load_file(str(out / "final" / "model.safetensors"))
    for name, tensor in load_file(str(whole.out / "final" / "model.safetensors")).items():
        assert torch.equal(final[name], tensor), name
    for r in rows:
        assert r["epsilon"] == pytest.approx(pld_epsilon(1.0, 0.25, r["step"], DELTA), rel=1e-9)


def test_heldout_evaluation_and_saved_model(finished: tuple[TrainConfig, TrainResult]) -> None:
    """Held-out preference accuracy is logged before training (0: at policy == reference
    every pair ties) and at steps 3 and 6; the final folder is a merged causal LM with its
    tokenizer that loads back through the Auto classes."""
    _, result = finished
    evals = read_jsonl(result.out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[0]["heldout_reward_accuracy"] == 0.0
    assert evals[0]["heldout_reward_margin"] == 0.0
    assert all(0.0 <= e["heldout_reward_accuracy"] <= 1.0 for e in evals)
    loaded = load_model(result.out / "final")
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert isinstance(loaded.processor, TextProcessor)


def test_cli_trains_a_text_model(tiny_text_model: Path, text_pool: Path, tmp_path: Path,
                                 finished: tuple[TrainConfig, TrainResult]) -> None:
    """``dpalign train --config`` on the same settings gives the Python run's metrics."""
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump(text_config(tiny_text_model, text_pool)))
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    _, python = finished
    assert without_time(read_jsonl(out / "metrics.jsonl")) == without_time(
        read_jsonl(python.out / "metrics.jsonl"))
