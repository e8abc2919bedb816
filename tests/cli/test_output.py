"""What the command line prints: ``dpalign --version``, and the world's evaluation laid out
by section (POPE as metric x split; CHAIR, recall and partner rate as metric, value)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from rich.table import Table
from typer.testing import CliRunner

from dpalign.cli import _eval_tables, app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"dpalign {version('dpalign')}\n"


def test_version_from_the_installed_entry_point() -> None:
    script = f"{sys.prefix}/bin/dpalign"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout == f"dpalign {version('dpalign')}\n" and done.stderr == ""


POPE = {split: {"accuracy": 0.101 + i / 100, "precision": 0.111 + i / 100,
                "recall": 0.121 + i / 100, "f1": 0.131 + i / 100, "yes_ratio": 0.141 + i / 100,
                "n": 10}
        for i, split in enumerate(("random", "popular", "adversarial"))}
CHAIR = {"rules": "dpalign", "chair_s": 0.901, "chair_i": 0.902, "recall": 0.903,
         "partner_hallucination_rate": 0.904, "captions": []}
REPORT = {"world": "/w", "pope": POPE, "chair": CHAIR, "model": "/m"}


def _cells(table: Table) -> dict[str, list[str]]:
    return {str(column.header): [str(c) for c in column.cells] for column in table.columns}


def test_eval_tables_by_section() -> None:
    pope, chair = _eval_tables(REPORT)
    assert _cells(pope) == {
        "metric": ["accuracy", "precision", "recall", "f1", "yes_ratio"],
        **{split: [f"{POPE[split][k]:.3f}" for k in ("accuracy", "precision", "recall", "f1",
                                                      "yes_ratio")] for split in POPE}}
    assert _cells(chair) == {
        "metric": ["CHAIR chair_s", "CHAIR chair_i", "recall", "partner_hallucination_rate"],
        "value": ["0.901", "0.902", "0.903", "0.904"]}
    assert chair.title == "Captions on the world (CHAIR rules: dpalign)"


def test_eval_tables_follow_the_splits_evaluated() -> None:
    """A run that answered one split (eval.pope_splits) gets one split column."""
    pope, _ = _eval_tables({**REPORT, "pope": {"adversarial": POPE["adversarial"]}})
    assert list(_cells(pope)) == ["metric", "adversarial"]


def test_no_world_no_world_tables() -> None:
    assert _eval_tables({"model": "/m"}) == []
