"""``dpalign train``: a full run from a YAML file, and config/run-dir errors with exit 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.data.records import read_preference_jsonl
from dpalign.eval.preference import preference_metrics
from dpalign.io import read_jsonl
from dpalign.losses.base import PairLogps
from dpalign.models.load import load_model
from dpalign.models.pairs import encode_pairs
from dpalign.train.reference import compute_reference
from dpalign.world.load import World

runner = CliRunner()


def _config(world: Path, model: Path) -> dict[str, Any]:
    """4 steps of 4 on 8 pool pairs; held-out + POPE/CHAIR (2 images per part) at 0 and 4."""
    w = World.load(world)
    return {"model": str(model), "world": str(world),
            "data": {"train": str(w.pool_file), "heldout": str(w.heldout_file), "k": 8},
            "loss": {"name": "dpo", "beta": 0.1},
            "optim": {"lr": 1e-3},
            "train": {"steps": 10, "batch_size": 4},
            "eval": {"world": True, "limit": 2, "batch_size": 8},
            "checkpoint": {"every": 2, "keep": 1}}


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_train_help() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--resume" in result.output


def test_train_end_to_end(small_world: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Exit 0; the last stdout line is result.json with "ok": true (the override
    train.steps=4 applied); the run dir holds the resolved config, 4 metrics lines,
    evaluations at 0 and 4 with POPE and CHAIR, the reference cache, the last checkpoint,
    and a final model whose held-out rewards (recomputed here from the saved weights) equal
    the logged final evaluation."""
    config = _write(tmp_path / "run.yaml", _config(small_world, tiny_model))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--json",
                                 "train.steps=4"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"ok": True, **json.loads((out / "result.json").read_text())}
    assert summary["steps"] == 4 and summary["n_pairs"] == 8

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 4 and saved["data"]["k"] == 8
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert summary["final_step"] == metrics[-1]
    evaluations = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evaluations] == [0, 4]
    for e in evaluations:
        assert {"heldout_pref_accuracy", "pope_random_accuracy", "chair_s", "chair_i"} <= set(e)
        assert 0.0 <= e["pope_adversarial_f1"] <= 1.0
    assert {p.name for p in (out / "reference").glob("*.safetensors")} == {
        "train.safetensors", "heldout.safetensors"}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000004"]

    final = load_model(out / "final")
    held = encode_pairs(read_preference_jsonl(World.load(small_world).heldout_file),
                        final.processor)
    policy = compute_reference(final.model, held, final.processor.tokenizer.pad_token_id,  # type: ignore[attr-defined]
                               with_corrupt=False)
    cached = load_file(str(out / "reference" / "heldout.safetensors"))
    ref = PairLogps(cached["chosen"], cached["rejected"], cached["chosen_tokens"],
                    cached["rejected_tokens"])
    again = preference_metrics(policy, ref, beta=0.1)
    assert again["reward_margin"] == pytest.approx(evaluations[-1]["heldout_reward_margin"],
                                                   abs=1e-3)
    assert abs(again["reward_margin"]) > 1e-3  # the saved model is the trained one
    base = load_model(tiny_model).model.state_dict()
    changed = [n for n, t in final.model.state_dict().items() if not torch.equal(t, base[n])]
    assert changed and all("language_model" in n for n in changed)


def test_unknown_key_exits_1_and_writes_nothing(small_world: Path, tiny_model: Path,
                                                tmp_path: Path) -> None:
    """An unknown key fails validation naming the file and the dotted key; no run dir."""
    data = _config(small_world, tiny_model)
    data["optim"]["betas"] = [0.9, 0.99]
    config = _write(tmp_path / "bad.yaml", data)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 1
    assert str(config) in result.output and "optim.betas" in result.output
    assert not out.exists()


def test_bad_override_exits_1(small_world: Path, tiny_model: Path, tmp_path: Path) -> None:
    config = _write(tmp_path / "ok.yaml", _config(small_world, tiny_model))
    result = runner.invoke(app, ["train", "--config", str(config), "--out",
                                 str(tmp_path / "run"), "loss.name=dpoo"])
    assert result.exit_code == 1
    assert "unknown loss 'dpoo'" in result.output
    assert not (tmp_path / "run").exists()


def test_non_empty_out_without_resume_exits_1(small_world: Path, tiny_model: Path,
                                              tmp_path: Path) -> None:
    config = _write(tmp_path / "ok.yaml", _config(small_world, tiny_model))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's files")
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 1
    assert "not empty" in result.output and "--resume" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
