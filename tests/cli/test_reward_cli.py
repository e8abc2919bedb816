"""``dpalign reward train`` / ``dpalign reward eval``: a short DP reward run from a YAML
file that names no loss, its evaluation (``--json``, ``--out``, ``--limit``) against the
run's own held-out figures, and bad input with exit 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.io import read_jsonl
from dpalign.world.load import World

runner = CliRunner()
# One pair scored in batches of 2 and of 32 differs by float32 rounding only (measured
# <= 2.5e-7 of |r|, rewards here |r| < 10).
LAYOUT_ATOL = 1e-5


def _config(world: Path, model: Path) -> dict[str, Any]:
    """2 DP steps of 4 on 16 pool pairs; held-out evaluation (24 pairs) at 0 and 2; no
    loss named and reward.enabled not set (the command sets both)."""
    w = World.load(world)
    return {"model": str(model),
            "data": {"train": str(w.pool_file), "heldout": str(w.heldout_file), "k": 16},
            "reward": {"facts": "objects"},
            "optim": {"lr": 1e-2},
            "train": {"steps": 6, "batch_size": 4},
            "eval": {"batch_size": 32},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}}


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(small_world: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[Path, dict[str, Any]]:
    """The run directory and the ``--json`` summary of `reward train ... train.steps=2`."""
    folder = tmp_path_factory.mktemp("reward_cli")
    config = _write(folder / "reward.yaml", _config(small_world, tiny_model))
    out = folder / "run"
    result = runner.invoke(app, ["reward", "train", "--config", str(config), "--out", str(out),
                                 "--json", "train.steps=2"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_reward_train_sets_the_reward_task(run: tuple[Path, dict[str, Any]]) -> None:
    """The resolved config has reward.enabled and the Bradley-Terry loss; the override
    applied (2 steps); the saved model is a reward model with its reward.json."""
    out, summary = run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward"] == {"enabled": True, "facts": "objects", "facts_field": "caption"}
    assert saved["loss"]["name"] == "bradley_terry"
    assert summary["steps"] == 2
    assert summary == {"ok": True, **json.loads((out / "result.json").read_text())}
    info = json.loads((out / "final" / "reward.json").read_text())
    assert info["facts"] == "objects" and len(info["train_ids"]) == 16


def test_reward_eval_json_and_scores_file(run: tuple[Path, dict[str, Any]], small_world: Path,
                                          tmp_path: Path) -> None:
    """``reward eval --json`` on the held-out file gives the run's final held-out accuracy
    (24 pairs); --out has one line per pair in file order whose margins, correct flags and
    mean agree with the summary; --limit 5 --batch-size 2 scores the same first 5 pairs
    (within LAYOUT_ATOL)."""
    out, _ = run
    held = World.load(small_world).heldout_file
    scores = tmp_path / "scores.jsonl"
    result = runner.invoke(app, ["reward", "eval", str(out), "--data", str(held), "--json",
                                 "--out", str(scores), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    final = read_jsonl(out / "eval.jsonl")[-1]
    assert final["step"] == 2 and summary["n"] == 24
    assert summary["accuracy"] == pytest.approx(final["heldout_reward_accuracy"], abs=1e-7)
    assert summary["ci_low"] <= summary["accuracy"] <= summary["ci_high"]
    assert summary["out"] == str(scores) and summary["model"] == str(out / "final")

    rows = read_jsonl(scores)
    assert [r["id"] for r in rows] == [r["id"] for r in read_jsonl(held)]
    assert set(rows[0]) == {"id", "reward_chosen", "reward_rejected", "margin", "correct"}
    assert summary["ties"] == 0  # trained: no pair within rounding of a tie
    for r in rows:
        assert r["margin"] == r["reward_chosen"] - r["reward_rejected"]
        assert r["correct"] == (r["margin"] > 0)
    assert sum(r["correct"] for r in rows) / 24 == summary["accuracy"]
    assert sum(r["margin"] for r in rows) / 24 == pytest.approx(summary["mean_margin"],
                                                                abs=1e-9)

    few = tmp_path / "few.jsonl"
    result = runner.invoke(app, ["reward", "eval", str(out / "final"), "--data", str(held),
                                 "--limit", "5", "--batch-size", "2", "--out", str(few)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "Wilson" in result.stdout
    for got, expected in zip(read_jsonl(few), rows[:5], strict=False):
        assert got["id"] == expected["id"]
        assert got["reward_chosen"] == pytest.approx(expected["reward_chosen"], abs=LAYOUT_ATOL)
        assert got["reward_rejected"] == pytest.approx(expected["reward_rejected"],
                                                       abs=LAYOUT_ATOL)
    assert len(read_jsonl(few)) == 5


def test_bad_data_line_names_file_and_line(run: tuple[Path, dict[str, Any]],
                                           small_world: Path, tmp_path: Path) -> None:
    out, _ = run
    lines = World.load(small_world).heldout_file.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], '{"id": "x", "prompt": 3}', lines[2]]) + "\n")
    result = runner.invoke(app, ["reward", "eval", str(out), "--data", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:2" in result.output and "error" in result.output


def test_reward_eval_errors(run: tuple[Path, dict[str, Any]], small_world: Path,
                            tmp_path: Path) -> None:
    """No reward model at MODEL; a file without the facts the model was trained with."""
    out, _ = run
    held = World.load(small_world).heldout_file
    result = runner.invoke(app, ["reward", "eval", str(tmp_path), "--data", str(held)])
    assert result.exit_code == 1 and "no reward model here" in result.output
    row = json.loads(held.read_text().splitlines()[0])
    row["metadata"].pop("objects")
    row["images"] = [str(held.parent / p) for p in row["images"]]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps(row) + "\n")
    result = runner.invoke(app, ["reward", "eval", str(out), "--data", str(bare)])
    assert result.exit_code == 1
    assert f"{bare}: record '{row['id']}'" in result.output


def test_reward_train_refuses_a_policy_loss(small_world: Path, tiny_model: Path,
                                            tmp_path: Path) -> None:
    data = _config(small_world, tiny_model) | {"loss": {"name": "dpo"}}
    config = _write(tmp_path / "dpo.yaml", data)
    result = runner.invoke(app, ["reward", "train", "--config", str(config), "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "bradley_terry" in result.output and "'dpo'" in result.output
    assert not (tmp_path / "run").exists()
