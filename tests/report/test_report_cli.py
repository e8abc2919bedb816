"""`dpalign report DIR [--out FILE] [--json]`: the page is written, the JSON last line
carries its path and the verdict sentences, bad directories exit 1 with the path named."""

from __future__ import annotations

import json
from pathlib import Path

from report_fixtures import Recipe, write_run, write_study
from typer.testing import CliRunner

from dpalign.cli import app

runner = CliRunner()


def test_report_command_on_a_study_with_json(tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", Recipe(ks=(4,), seeds=(0, 1),
                                                   epsilons=(float("inf"), 1.0),
                                                   diverge_below=2.0))
    out = tmp_path / "site" / "index.html"
    result = runner.invoke(app, ["report", str(study), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["report"] == str(out) and out.exists()
    assert all(Path(p).exists() for p in info["figures"])
    assert info["verdict"][0].startswith("K=4: divergence rate rises as ε decreases")
    assert "- K=4: divergence rate rises" in result.output


def test_report_command_on_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, Recipe(), epsilon=8.0, k=4, seed=0, mechanism="dp_sgd", loss="dpo")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").exists() and "Did not diverge in 40 steps." in result.output


def test_report_command_names_a_bad_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert str(tmp_path) in result.output and "neither a study directory" in result.output
