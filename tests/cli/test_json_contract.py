"""``--json`` is one option with one help text everywhere, and behaves the same everywhere:
on success the last stdout line is the command's JSON object with ``"ok": true``; on failure
(exit status 1) it is ``{"ok": false, "error": MESSAGE}``, MESSAGE being the text of the
``error:`` line (``data validate`` adds its problem list)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner, Result

from conftest import leaf_commands
from dpalign.cli import JsonLine, JsonOnCrash, app
from dpalign.privacy.accounting import account, calibrate_sigma

runner = CliRunner()


def _json_options() -> dict[tuple[str, ...], Any]:
    """The --json option of each command that has one."""
    options = {}
    for words, command in leaf_commands(typer.main.get_command(app)).items():
        for param in command.params:
            if "--json" in getattr(param, "opts", []):
                options[words] = param
    return options


OPTIONS = _json_options()
NO = "/nonexistent/dpalign"
FAILURES = {  # one failing invocation per command with --json, and its error message
    ("data", "validate"): ([f"{NO}/a.jsonl"], f"1 problem in {NO}/a.jsonl"),
    ("data", "convert"): ([f"{NO}/a.jsonl", "--format", "trl", "--out", f"{NO}/o.jsonl"],
                          f"{NO}/a.jsonl: file not found"),
    ("train",): (["--config", f"{NO}/c.yaml", "--out", f"{NO}/r"],
                 f"{NO}/c.yaml: cannot read YAML: [Errno 2] No such file or directory: "
                 f"'{NO}/c.yaml'"),
    ("reward", "train"): (["--config", f"{NO}/c.yaml", "--out", f"{NO}/r"],
                          f"{NO}/c.yaml: cannot read YAML: [Errno 2] No such file or "
                          f"directory: '{NO}/c.yaml'"),
    ("audit",): (["--config", f"{NO}/c.yaml", "--out", f"{NO}/r"],
                 f"{NO}/c.yaml: cannot read YAML: [Errno 2] No such file or directory: "
                 f"'{NO}/c.yaml'"),
    ("eval",): (["--model", f"{NO}/m", "--world", f"{NO}/w"],
                f"{NO}/w: not a dpalign world (no world.json); build one with `dpalign world "
                "build --out DIR`"),
    ("epsilon",): (["--sigma", "1", "--sample-rate", "2", "--steps", "10"],
                   "sample rate must lie in (0, 1], got 2.0"),
    ("calibrate",): (["--target-epsilon", "-1", "--sample-rate", "0.1", "--steps", "10"],
                     "target epsilon must be finite and > 0, got -1.0"),
    ("reward", "eval"): ([f"{NO}/m", "--data", f"{NO}/d.jsonl"], f"{NO}/d.jsonl: file not found"),
    ("study",): (["--preset", "nope", "--out", f"{NO}/s"],
                 "unknown study preset 'nope'; known: quickstart, full, answer, online, rl, "
                 "reward"),
    ("report",): ([f"{NO}/s"], f"{NO}/s: no such directory"),
    ("settings",): (["nope"], "no settings for 'nope'; choose one of train, reward, audit, "
                              "world, study, pretrain"),
}


def _last_json(result: Result) -> dict[str, Any]:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_option_one_help() -> None:
    assert set(OPTIONS) == set(FAILURES)
    helps = {param.help for param in OPTIONS.values()}
    assert helps == {'End stdout with one line holding a JSON object: the result, with "ok": '
                     'true; on failure (exit status 1) {"ok": false, "error": MESSAGE}.'}
    assert all(param.is_flag and param.default is False for param in OPTIONS.values())


@pytest.mark.parametrize("words", sorted(FAILURES), ids=" ".join)
def test_failure_ends_with_the_error_object(words: tuple[str, ...]) -> None:
    args, message = FAILURES[words]
    result = runner.invoke(app, [*words, *args, "--json"])
    assert result.exit_code == 1, result.output
    last = _last_json(result)
    assert last["ok"] is False and last["error"] == message
    assert f"error: {message}" in result.stderr.splitlines()
    if words != ("data", "validate"):
        assert last == {"ok": False, "error": message}
    quiet = runner.invoke(app, [*words, *args])  # without --json: no JSON line
    assert quiet.exit_code == 1 and "{" not in quiet.stdout


def test_data_validate_failure_keeps_its_problem_list(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    result = runner.invoke(app, ["data", "validate", str(bad), "--json"])
    assert result.exit_code == 1
    last = _last_json(result)
    assert last["ok"] is False and last["error"] == f"1 problem in {bad}"
    assert last["path"] == str(bad) and last["count"] == 1
    assert [(e["file"], e["line"]) for e in last["errors"]] == [(str(bad), 1)]


def test_epsilon_success() -> None:
    result = runner.invoke(app, ["epsilon", "--sigma", "1.5", "--sample-rate", "0.04",
                                 "--steps", "2250", "--accountant", "rdp", "--json"])
    assert result.exit_code == 0, result.output
    assert _last_json(result) == {
        "ok": True, "epsilon": account((1.5, 0.04, 2250), 1e-5, "rdp").epsilon, "delta": 1e-5,
        "sigma": 1.5, "sample_rate": 0.04, "steps": 2250, "accountant": "rdp"}


def test_calibrate_success() -> None:
    result = runner.invoke(app, ["calibrate", "--target-epsilon", "8", "--sample-rate", "0.04",
                                 "--steps", "100", "--accountant", "rdp", "--json"])
    assert result.exit_code == 0, result.output
    sigma = calibrate_sigma(8.0, 1e-5, 0.04, 100, "rdp")
    assert _last_json(result) == {
        "ok": True, "sigma": sigma, "epsilon": account((sigma, 0.04, 100), 1e-5, "rdp").epsilon,
        "target_epsilon": 8.0, "delta": 1e-5, "sample_rate": 0.04, "steps": 100,
        "accountant": "rdp"}


def test_data_validate_success(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = {"id": "1", "image": "a.png", "prompt": "p", "chosen": "c", "rejected": "r",
           "metadata": {"user_id": "u1", "error_kind": "object"}}
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(row) + "\n")
    result = runner.invoke(app, ["data", "validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert _last_json(result) == {"ok": True, "path": str(path), "records": 1, "images": 1,
                                  "users": 1, "error_kinds": {"object": 1}}


def test_json_flag_does_not_leak_into_the_next_command(tmp_path: Path) -> None:
    """A command without --json run after one with it prints no JSON line on failure."""
    runner.invoke(app, ["settings", "world", "--json"])
    result = runner.invoke(app, ["world", "build", "--out", str(tmp_path / "w"), "seed=x"])
    assert result.exit_code == 1 and result.stdout == ""


def test_an_unexpected_exception_still_ends_with_the_error_object() -> None:
    """The app's group class: a command that crashes (traceback, exit status 1) under
    --json still ends stdout with the failure object; usage errors (exit 2) print none."""
    assert isinstance(typer.main.get_command(app), JsonOnCrash)
    crashing = typer.Typer(cls=JsonOnCrash)

    @crashing.callback()
    def root() -> None:
        pass

    @crashing.command()
    def boom(as_json: JsonLine = False, times: int = typer.Option(...)) -> None:
        raise RuntimeError(f"boom x{times}")

    result = runner.invoke(crashing, ["boom", "--times", "2", "--json"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
    assert _last_json(result) == {"ok": False, "error": "RuntimeError: boom x2"}
    usage = runner.invoke(crashing, ["boom", "--json"])
    assert usage.exit_code == 2 and usage.stdout == ""
