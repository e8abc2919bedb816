"""A single run's report says plainly what the stability numbers hide (a run that did not
move, an over-optimised one, a model that answers POPE one way or stops naming objects),
first; and the study tables show each run's effective settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from conftest import STUCK_EVALS, STUCK_METRICS, loss_rows
from dpalign.diagnostics import diagnose_run
from dpalign.report.load import load_run
from dpalign.report.pages import run_page
from dpalign.report.series import Cell
from dpalign.report.tables import points_table, runs_table
from dpalign.report.verdict import run_findings, run_summary

HEALTHY_METRICS = loss_rows([0.6931 - 0.006 * i for i in range(50)])
HEALTHY_EVALS = [
    {"step": 0, "heldout_reward_accuracy": 0.5, "heldout_reward_margin": 0.0},
    {"step": 25, "heldout_reward_accuracy": 0.8, "heldout_reward_margin": 0.2},
    {"step": 50, "heldout_reward_accuracy": 0.9, "heldout_reward_margin": 0.5,
     "pope_adversarial_f1": 0.75, "pope_adversarial_yes_ratio": 0.45, "recall": 0.58},
]
COLLAPSE_EVALS = [
    {"step": 0, "heldout_reward_accuracy": 0.5, "val_reward_accuracy": 0.5},
    {"step": 10, "heldout_reward_accuracy": 0.91, "val_reward_accuracy": 0.88},
    {"step": 20, "heldout_reward_accuracy": 0.85, "val_reward_accuracy": 0.8},
    {"step": 30, "heldout_reward_accuracy": 0.73, "val_reward_accuracy": 0.7},
]
SILENT_END = {"step": 50, "heldout_reward_accuracy": 0.95, "heldout_reward_margin": 2.0,
              "pope_adversarial_f1": 0.25, "pope_adversarial_yes_ratio": 0.135}
SILENT_START = {"step": 0, "heldout_reward_accuracy": 0.5, "heldout_reward_margin": 0.0,
                "pope_adversarial_f1": 0.72, "pope_adversarial_yes_ratio": 0.48}


def test_a_run_that_did_not_move_says_so_first_and_never_reached_the_target():
    lines = run_summary(diagnose_run(STUCK_METRICS, STUCK_EVALS).as_dict())
    assert lines[0] == ("The run did not move: final held-out reward margin 0.001, training "
                        "loss 0.693 → 0.692.")
    assert not any(line.startswith(("Reached", "Never reached")) for line in lines)
    assert lines[1] == "Did not diverge in 50 steps."
    assert lines[-1] == ("Final held-out reward accuracy 0.7 (0.5 at step 0), held-out reward "
                         "margin 0.001 (0 at step 0), POPE-adversarial F1 0.72 (0.72 at step "
                         "0), POPE-adversarial yes-ratio 0.48 (0.48 at step 0).")


def test_an_over_optimised_run_names_its_peak_and_its_end():
    row = diagnose_run(HEALTHY_METRICS, COLLAPSE_EVALS).as_dict()
    assert run_findings(row) == [
        "Held-out reward accuracy peaked at 0.91 (step 10) and ended at 0.73: over-optimised."
        " On the validation part it fell 0.18 from its peak to 0.7."]
    assert run_summary(row)[0] == run_findings(row)[0]


def test_a_model_answering_no_is_named_with_its_f1_against_step_0():
    row = diagnose_run(HEALTHY_METRICS, [SILENT_START, SILENT_END]).as_dict()
    lines = run_summary(row)
    assert lines[0] == ("POPE-adversarial yes-ratio 0.135 (0.48 at step 0): the model mostly "
                        "answers 'no'; F1 fell from 0.72 at step 0 to 0.25.")
    assert lines[1] == "Did not diverge in 50 steps."
    # without a step-0 evaluation of POPE there is nothing to compare with
    alone = run_findings(diagnose_run(HEALTHY_METRICS, [SILENT_END]).as_dict())
    assert alone == ["POPE-adversarial yes-ratio 0.135: the model mostly answers 'no'; "
                     "F1 0.25."]
    yes = run_findings(diagnose_run(HEALTHY_METRICS, [
        SILENT_END | {"pope_adversarial_yes_ratio": 0.9}]).as_dict())
    assert yes[0].startswith("POPE-adversarial yes-ratio 0.9: the model mostly answers 'yes'")


def test_caption_recall_collapse_against_the_base_model():
    evals = [*HEALTHY_EVALS[:2], HEALTHY_EVALS[2] | {"recall": 0.2}]
    row = diagnose_run(HEALTHY_METRICS, evals, base={"recall": 0.6}).as_dict()
    assert run_findings(row) == [
        "Caption object recall fell to 0.2, 0.333× the base model's 0.6: the captions stop "
        "naming the objects in the image."]
    assert "caption object recall 0.2 (0.6 for the base model)" in run_summary(row)[-1]
    assert run_findings(diagnose_run(HEALTHY_METRICS, evals).as_dict()) == []


def test_a_healthy_run_has_no_finding_and_reaches_the_target():
    row = diagnose_run(HEALTHY_METRICS, HEALTHY_EVALS, base={"recall": 0.62}).as_dict()
    assert run_findings(row) == []
    lines = run_summary(row)
    assert lines[0] == "Did not diverge in 50 steps."
    assert "Reached the target held-out reward accuracy at step 25." in lines


def test_rows_without_finding_columns_read_as_before():
    row = {"n_steps": 10, "diverged": False, "loss_volatility": 0.01,
           "steps_to_target": 5, "epsilon": math.inf, "moved": math.nan,
           "collapsed": None}
    assert run_summary(row) == [
        "Did not diverge in 10 steps.",
        "Loss volatility 0.01 (std of the EMA-smoothed loss's per-step change, nats).",
        "Reached the target held-out reward accuracy at step 5."]


def _write_run(path: Path, metrics: list[dict], evals: list[dict]) -> Path:
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (path / "config.yaml").write_text("loss:\n  name: dpo\n")
    return path


def test_run_page_puts_the_findings_first(tmp_path: Path):
    page = run_page(load_run(_write_run(tmp_path / "run", STUCK_METRICS, STUCK_EVALS)))
    assert page.verdicts[0].sentences[0].startswith("The run did not move:")
    assert not any(s.startswith("Reached") for s in page.verdicts[0].sentences)
    assert page.rules[0].startswith("A run did not move when its final heldout_reward_margin")
    diagnostics = page.tables[0]
    assert [r[0].text for r in diagnostics.rows[:3]] == ["moved", "loss_start", "loss_end"]
    assert diagnostics.rows[0][1].text == "no"


# ---------------------------------------------------------------- effective settings


def _cell(point: str, lr: float | None) -> Cell:
    return Cell(point=point, mechanism="dp_sgd", epsilon=1.0, k=8, lr=lr)


def test_points_table_shows_the_lr_never_a_made_up_base():
    table = points_table([_cell("a", 3e-4), _cell("b", None)])
    column = table.headers.index("lr")
    assert [row[column].text for row in table.rows] == ["0.0003", "—"]
    assert "base" not in {cell.text for row in table.rows for cell in row}


def test_points_table_shows_the_effective_settings_that_points_parquet_has():
    points = pd.DataFrame([
        {"point": "a", "lr": 5e-4, "optimizer": "adamw", "batch_size": 4, "sample_rate": 0.5,
         "steps": 60, "max_grad_norm": 1.0, "clipping": "fixed"},
        {"point": "b", "lr": 1e-3, "optimizer": "sgd", "batch_size": 8, "sample_rate": 1.0,
         "steps": 30, "max_grad_norm": math.nan, "clipping": "none"}])
    # the cells' lr is the grid's (None): the effective one comes from points.parquet
    table = points_table([_cell("a", None), _cell("b", None)], points)
    assert table.headers[5:13] == ("lr", "optimizer", "batch", "sample rate", "steps planned",
                                   "max grad norm", "clipping", "runs")
    assert "LoRA r" not in table.headers  # absent column: skipped
    assert [c.text for c in table.rows[0][5:12]] == ["0.0005", "adamw", "4", "0.5", "60", "1",
                                                     "fixed"]
    assert [c.text for c in table.rows[1][5:12]] == ["0.001", "sgd", "8", "1", "30", "—",
                                                     "none"]


def test_runs_table_shows_each_runs_effective_settings_and_findings():
    runs = pd.DataFrame([
        {"run": "r0", "status": "ok", "loss": "dpo", "lr": 2e-4, "batch_size": 4,
         "lora_r": 8, "n_steps": 50, "moved": False, "collapsed": False, "silenced": True},
        {"run": "r1", "status": "ok", "loss": "dpo", "lr": 1e-3, "batch_size": 4,
         "lora_r": 8, "n_steps": 50, "moved": True, "collapsed": True, "silenced": False}])
    table = runs_table(runs)
    assert table.headers == ("run", "status", "loss", "lr", "batch", "LoRA r", "steps run",
                             "moved", "over-optimised", "silenced")
    assert [c.text for c in table.rows[0]] == ["r0", "ok", "dpo", "0.0002", "4", "8", "50",
                                               "no", "no", "yes"]
    assert table.rows[1][3].sort == repr(1e-3)


def test_runs_table_of_an_older_study_skips_absent_settings():
    runs = pd.DataFrame([{"run": "r0", "loss": "dpo", "lr": None, "n_steps": 5}])
    table = runs_table(runs)
    assert table.headers == ("run", "loss", "lr", "steps run")
    assert table.rows[0][2].text == "—"
