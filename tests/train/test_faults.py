"""Training faults and bad input end cleanly: a torn log line is recovered on resume,
corruption is named, OS errors are one ``error:`` line, a failed fresh start leaves the
directory as found, over-long pairs, impossible budgets and batches larger than the data are
refused before training, and a budget-stopped run reports the steps it took."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import CrashError, MakeConfig, assert_same_run, crash_at
from dpalign.cli import app
from dpalign.data.records import read_preference_jsonl, write_preference_jsonl
from dpalign.io import CorruptLogError, TornLineWarning, append_jsonl, read_jsonl, read_log_jsonl
from dpalign.models.load import ModelFolderError
from dpalign.privacy.accounting import epsilon
from dpalign.train import loop
from dpalign.train.checks import PrivacyBudgetError, SequenceLengthError, check_run
from dpalign.train.config import TrainConfig
from dpalign.train.loop import TrainResult, train

runner = CliRunner()
DELTA = 1e-5


@pytest.fixture(scope="module")
def whole(make_config: MakeConfig, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[TrainConfig, TrainResult]:
    """6 uninterrupted steps (the conftest base: eval every 3, checkpoints every 2)."""
    cfg = make_config()
    return cfg, train(cfg, tmp_path_factory.mktemp("faults") / "whole")


def _config_file(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _error_line(result: Any) -> str:
    """The one ``error:`` line of a failed command (exit 1, no traceback); other stderr lines
    are transformers' weight-loading progress."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --- 1. torn log lines -----------------------------------------------------------------------

def test_read_log_drops_only_a_torn_last_line(tmp_path: Path) -> None:
    """A torn last line (with or without its newline, a multi-byte character cut in two) is
    dropped with a warning naming file and line; a bad earlier line is an error naming
    them; blank lines are skipped."""
    path = tmp_path / "log.jsonl"
    rows = [{"step": 1, "x": "é"}, {"step": 2, "x": "ü"}]
    for row in rows:
        append_jsonl(path, row)
    good = path.read_bytes()
    for tail in (b'{"step": 3, "loss": 0.69', b'{"step": 3}x\n', '{"x": "é'.encode()[:-1],
                 b"[1, 2]\n\n"):
        path.write_bytes(good + tail)
        with pytest.warns(TornLineWarning, match=rf"{path}:3: dropped a torn last line"):
            assert read_log_jsonl(path) == rows
    path.write_bytes(good + b"\n\n")
    assert read_log_jsonl(path) == rows
    lines = good.split(b"\n")
    path.write_bytes(lines[0] + b"\n" + lines[1][:10] + b"\n" + lines[1] + b"\n")
    with pytest.raises(CorruptLogError, match=rf"{path}:2: not valid JSON"):
        read_log_jsonl(path)


@pytest.mark.parametrize("log", ["metrics.jsonl", "eval.jsonl"])
def test_resume_recovers_a_torn_last_line(whole: tuple[TrainConfig, TrainResult],
                                          tmp_path: Path, log: str) -> None:
    """Crash after step 5 (checkpoint at 4), then a kill cuts the next append short: resume
    drops the torn line with a warning and ends equal to the uninterrupted run."""
    cfg, done = whole
    out = tmp_path / "run"
    with pytest.raises(CrashError):
        train(cfg, out, on_step=crash_at(5))
    next_row = json.dumps(read_jsonl(done.out / log)[-1])
    with open(out / log, "a", encoding="utf-8") as handle:
        handle.write(next_row[:len(next_row) // 2])
    with pytest.warns(TornLineWarning, match=rf"{out / log}:\d+: dropped a torn last line"):
        resumed = train(cfg, out, resume=True)
    assert resumed.steps == 6
    assert_same_run(out, done.out)


def test_resume_refuses_a_corrupt_line_that_is_not_the_last(
        whole: tuple[TrainConfig, TrainResult], tmp_path: Path) -> None:
    cfg, _ = whole
    out = tmp_path / "run"
    with pytest.raises(CrashError):
        train(cfg, out, on_step=crash_at(5))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptLogError, match=rf"{out / 'metrics.jsonl'}:2: not valid JSON"):
        train(cfg, out, resume=True)


def test_disk_full_mid_append_is_one_error_line_and_resume_recovers(
        whole: tuple[TrainConfig, TrainResult], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while step 5's metrics line is written (half of it reaches the file):
    ``dpalign train`` exits 1 with one ``error:`` line naming the run directory and the cause,
    no traceback; ``--resume`` warns about the torn line and ends equal to the uninterrupted
    run."""
    cfg, done = whole
    config, out = _config_file(cfg, tmp_path / "run.yaml"), tmp_path / "run"

    def full_disk(path: str | Path, row: dict[str, Any]) -> None:
        if Path(path).name == "metrics.jsonl" and row["step"] == 5:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row)[:50])
            raise OSError(errno.ENOSPC, "No space left on device")
        append_jsonl(path, row)

    monkeypatch.setattr(loop, "append_jsonl", full_disk)
    failed = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert _error_line(failed) == f"error: {out} (run directory): No space left on device"
    monkeypatch.undo()
    resumed = runner.invoke(app, ["train", "--config", str(config), "--out", str(out),
                                  "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "warning:" in resumed.stderr and "dropped a torn last line" in resumed.stderr
    assert_same_run(out, done.out)


# --- 2. OS errors ----------------------------------------------------------------------------

def test_out_under_a_regular_file_is_one_error_line(make_config: MakeConfig,
                                                    tmp_path: Path) -> None:
    """``--out some_file/run`` (fails as NotADirectoryError, for root too): exit 1, one
    ``error:`` line naming the path and the cause."""
    config = _config_file(make_config(), tmp_path / "run.yaml")
    blocker = tmp_path / "some_file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["train", "--config", str(config), "--out",
                                 str(blocker / "run")])
    assert _error_line(result) == f"error: {blocker / 'run'}: Not a directory"
    assert blocker.read_text() == "not a folder"


def test_read_only_out_is_one_error_line(make_config: MakeConfig, tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        (out / "probe").touch()
    except PermissionError:
        pass
    else:  # root ignores permissions
        out.chmod(0o700)
        pytest.skip("permissions are not enforced for this user (root)")
    config = _config_file(make_config(), tmp_path / "run.yaml")
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    out.chmod(0o700)
    line = _error_line(result)
    assert line.startswith(f"error: {out}/") and line.endswith("Permission denied")
    assert list(out.iterdir()) == []


def test_model_folder_without_weights_is_one_error_line(make_config: MakeConfig,
                                                        tiny_model: Path,
                                                        tmp_path: Path) -> None:
    """A model folder without model.safetensors (or without config.json): exit 1, one
    ``error:`` line naming the folder; the new run directory is removed again."""
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_model, no_config)
    (no_config / "config.json").unlink()
    for folder, cause in ((no_weights, "no file named model.safetensors"),
                          (no_config, "no config.json")):
        cfg = make_config(model=str(folder))
        config, out = _config_file(cfg, tmp_path / "run.yaml"), tmp_path / "run"
        result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
        line = _error_line(result)
        assert str(folder) in line and cause in line
        assert not out.exists()
    # the folder is checked before the privacy plan: with a budget that allows no step as
    # well, the error is still the folder's (calibrating sigma first once cost ~30 s)
    broke = make_config(model=str(no_config), privacy={
        "enabled": True, "noise_multiplier": 0.3, "target_epsilon": 0.5})
    with pytest.raises(ModelFolderError, match=r"no config\.json"):
        check_run(broke)


# --- 3. a failed fresh start leaves the directory as found ------------------------------------

def test_bad_k_fails_before_anything_is_written(make_config: MakeConfig,
                                                tmp_path: Path) -> None:
    """data.k above the pool fails naming both; an existing empty --out stays empty, a new
    one is not created, and the corrected command then runs in the same directory."""
    empty, new = tmp_path / "empty", tmp_path / "new" / "run"
    empty.mkdir()
    pool = len(read_preference_jsonl(make_config().data.train))
    bad = make_config(data={"k": 100000})
    for out in (empty, new):
        with pytest.raises(ValueError, match=rf"data.k=100000 but .* holds {pool} pairs"):
            train(bad, out)
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert not (tmp_path / "new").exists()
    fixed = make_config(train={"steps": 1}, eval={"every": None}, data={"heldout": None},
                        checkpoint={"every": None})
    assert train(fixed, empty).steps == 1


def test_failure_after_writing_is_undone(make_config: MakeConfig, tmp_path: Path) -> None:
    """A failure found once the model is loaded (here: pairs too long for data.max_length),
    after config.yaml and env.json were written: an existing empty --out is emptied again,
    a new one (with the parents made for it) removed."""
    cfg = make_config(data={"max_length": 8})
    empty, new = tmp_path / "empty", tmp_path / "a" / "b" / "run"
    empty.mkdir()
    for out in (empty, new):
        with pytest.raises(SequenceLengthError):
            train(cfg, out)
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert not (tmp_path / "a").exists()


# --- 4. sequence length ----------------------------------------------------------------------

def _long_prompt_file(make_config: MakeConfig, tmp_path: Path) -> tuple[Path, str]:
    records = read_preference_jsonl(make_config().data.train)[:8]
    long = records[3].model_copy(update={"prompt": "what is in the image " * 2000})
    records[3] = long
    return write_preference_jsonl(tmp_path / "long.jsonl", records), long.id


def test_pair_longer_than_the_model_positions_is_refused(make_config: MakeConfig,
                                                         tmp_path: Path) -> None:
    """A prompt of ~40,000 characters for a model with 256 positions is refused before the
    model runs, naming the file, the record, its lengths and the limit's source."""
    path, long_id = _long_prompt_file(make_config, tmp_path)
    cfg = make_config(data={"train": str(path), "k": None, "heldout": None},
                      eval={"every": None})
    with pytest.raises(SequenceLengthError) as info:
        train(cfg, tmp_path / "run")
    message = str(info.value)
    assert message.startswith(f"{path}: record {long_id!r} is ")
    assert "above the limit of 256 (the model's maximum positions" in message
    assert "1 of 8 pairs are too long" in message and "refused, not cut" in message
    assert not (tmp_path / "run").exists()


def test_data_max_length_is_a_lower_limit(make_config: MakeConfig, tmp_path: Path) -> None:
    cfg = make_config(data={"max_length": 20})
    with pytest.raises(SequenceLengthError,
                       match=r"tokens long \(prompt \d+ with its image tokens \+ longer "
                             r"response \d+\), above the limit of 20 \(data.max_length\)"):
        train(cfg, tmp_path / "run")


# --- 5. privacy budget -----------------------------------------------------------------------

def test_budget_that_allows_no_step_fails_before_training(make_config: MakeConfig,
                                                          tmp_path: Path) -> None:
    """sigma 0.3 with target epsilon 0.5: the first step alone exceeds it. The run fails
    before training, naming both epsilons; exit 1, no run directory (no final/)."""
    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 0.3,
                               "target_epsilon": 0.5})
    first = epsilon((0.3, 0.25, 1), DELTA, "pld")
    with pytest.raises(PrivacyBudgetError) as info:
        check_run(cfg)
    assert str(info.value) == (
        "privacy.target_epsilon=0.5 allows no step: the first step alone (sigma 0.3, sample "
        f"rate 0.25) costs epsilon {first:.4g} at delta 1e-05; raise privacy.target_epsilon "
        "or privacy.noise_multiplier")
    config, out = _config_file(cfg, tmp_path / "run.yaml"), tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out)])
    assert _error_line(result) == f"error: {info.value}"
    assert not out.exists()


def test_budget_stop_reports_the_steps_taken(make_config: MakeConfig, tmp_path: Path) -> None:
    """A budget for 4 of the 6 planned steps: result.json, TrainResult and the CLI line all
    say 4 steps (of 6 planned), the final evaluation is at step 4, and a checkpoint is
    written at step 4 (checkpoint.every unset: only where training ends), so the stopped
    run's state, ledger included, is on disk."""
    target = epsilon((1.0, 0.25, 4), DELTA, "pld") * 1.0001
    cfg = make_config(checkpoint={"every": None},
                      privacy={"enabled": True, "noise_multiplier": 1.0,
                               "target_epsilon": target})
    config, out = _config_file(cfg, tmp_path / "run.yaml"), tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["planned_steps"] == 6
    assert summary["privacy"]["steps_taken"] == 4
    assert summary["stopped"].startswith("stopped before step 5")
    assert f"{out}  4 of 6 steps (stopped before step 5" in result.stdout
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 3, 4]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000004"]

    again = train(cfg, tmp_path / "lib")
    assert (again.steps, again.planned_steps) == (4, 6) and again.stopped is not None


# --- 6. batch size against the training pairs ------------------------------------------------

@pytest.mark.parametrize("privacy", [{}, {"enabled": True, "noise_multiplier": 1.0}],
                         ids=["plain", "dp"])
def test_batch_larger_than_the_pairs_is_refused_before_the_model_loads(
        make_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        privacy: dict[str, Any]) -> None:
    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr(loop, "load_model", no_model)
    cfg = make_config(data={"k": 4}, train={"batch_size": 8}, privacy=privacy)
    with pytest.raises(ValueError) as info:
        train(cfg, tmp_path / "run")
    assert str(info.value) == (
        "train.batch_size=8 exceeds the 4 training pairs (data.k=4); a step cannot take more "
        "pairs than there are: set train.batch_size <= 4 or data.k >= 8")
    assert not (tmp_path / "run").exists()
