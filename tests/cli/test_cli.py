"""The command line: help everywhere, clear errors with exit status 1, JSON last lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpalign.cli import app

runner = CliRunner()
COMMANDS = [[], ["world"], ["world", "build"], ["data"], ["data", "validate"], ["data", "bdhs"],
            ["pretrain"],
            ["eval"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_data_validate_ok_and_bad_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"id": "1", "image": "a.png", "prompt": "p", "chosen": "c", "rejected": "r",
            "metadata": {"user_id": "u1", "error_kind": "object"}}
    ok = _write(tmp_path / "ok.jsonl", [json.dumps(good)])
    result = runner.invoke(app, ["data", "validate", str(ok), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["records"] == 1 and summary["users"] == 1 and summary["images"] == 1

    bad = _write(tmp_path / "bad.jsonl", [json.dumps(good), "{not json",
                                          json.dumps({**good, "id": "2", "image": "gone.png"})])
    result = runner.invoke(app, ["data", "validate", str(bad)])
    assert result.exit_code == 1
    assert "bad.jsonl:2:" in result.output and "bad.jsonl:3:" in result.output
    assert "gone.png" in result.output


def test_world_build_refuses_bad_override(tmp_path: Path) -> None:
    result = runner.invoke(app, ["world", "build", "--out", str(tmp_path / "w"),
                                 "hallucination_rate=2"])
    assert result.exit_code == 1
    assert "hallucination_rate" in result.output
    assert not (tmp_path / "w").exists()


def test_pretrain_names_a_missing_world(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain", "--world", str(tmp_path / "nope"),
                                 "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "not a dpalign world" in result.output
    assert not (tmp_path / "m").exists()


def test_eval_json_last_line(tiny_model: Path, small_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model), "--world", str(small_world),
                                 "--limit", "4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert set(last["pope"]) == {"random", "popular", "adversarial"}
    for split in last["pope"].values():
        assert set(split) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert {"chair_s", "chair_i", "recall"} <= set(last["chair"])
    assert json.loads(out.read_text())["pope"] == last["pope"]
