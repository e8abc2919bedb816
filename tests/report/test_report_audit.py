"""Audits in reports: the study page's claimed-vs-audited table and figure (values equal the
runs' audit.json), and the run page's audit table and scores image only when audited."""

from __future__ import annotations

import json
import math
from pathlib import Path

from report_fixtures import INF, Recipe, add_audits, audit_record, write_run, write_study

from dpalign.report import write_report
from dpalign.report.audit import audit_points
from dpalign.report.load import load_input
from dpalign.report.pages import build_page

EPS2 = "dpo-dp_sgd-eps2-k4"
NO_DP = "dpo-none-epsinf-k4"
PNG = b"\x89PNG\r\n\x1a\nnot-really-a-png"


def _audited_study(root: Path) -> Path:
    write_study(root, Recipe(epsilons=(INF, 2.0), ks=(4,), seeds=(0, 1), steps=10))
    add_audits(root, {f"{EPS2}-s0": audit_record(1.98, 0.5, auc=0.6),
                      f"{EPS2}-s1": audit_record(1.98, 0.9, auc=0.7),
                      f"{NO_DP}-s0": audit_record(None, 3.0, auc=0.9)})  # s1: not audited
    return root


def test_claimed_vs_audited_rows_equal_the_audits(tmp_path: Path) -> None:
    study = load_input(_audited_study(tmp_path / "study"))
    records = {r["point"]: r for r in audit_points(study.runs)}
    assert set(records) == {EPS2, NO_DP}
    eps2 = records[EPS2]
    assert eps2["claimed"] == 1.98 and eps2["epsilon_target"] == 2.0
    assert math.isclose(eps2["bound_mean"], 0.7) and eps2["bound_max"] == 0.9
    assert math.isclose(eps2["auc_mean"], 0.65)
    assert (eps2["consistent"], eps2["runs"]) == (2, 2)
    no_dp = records[NO_DP]
    assert math.isinf(no_dp["claimed"]) and no_dp["bound_mean"] == no_dp["bound_max"] == 3.0
    assert (no_dp["consistent"], no_dp["runs"], no_dp["auc_mean"]) == (1, 1, 0.9)


def test_study_page_shows_the_audit_table_and_figure(tmp_path: Path) -> None:
    page = build_page(load_input(_audited_study(tmp_path / "study")))
    table = next(t for t in page.tables if t.id == "audit")
    assert table.title == "Claimed vs audited epsilon"
    rows = {r[0].text: [c.text for c in r] for r in table.rows}
    assert rows[EPS2] == [EPS2, "DP-SGD", "2", "1.98", "0.7", "0.9", "0.65", "2/2"]
    assert rows[NO_DP][1:] == ["no DP", "∞ (no DP)", "∞ (no DP)", "3", "3", "0.9", "1/1"]
    assert "audit" in [f.name for f in page.figures]


def test_study_without_audits_has_no_audit_section(tmp_path: Path) -> None:
    page = build_page(load_input(write_study(tmp_path / "study", Recipe(
        epsilons=(INF, 2.0), ks=(4,), seeds=(0,), steps=10))))
    assert "audit" not in [t.id for t in page.tables]
    assert "audit" not in [f.name for f in page.figures]


def _run(path: Path, audited: bool) -> Path:
    write_run(path, Recipe(steps=10), epsilon=2.0, k=4, seed=0, mechanism="dp_sgd", loss="dpo")
    if audited:
        (path / "audit").mkdir()
        (path / "audit" / "scores.png").write_bytes(PNG)
        (path / "audit.json").write_text(json.dumps(audit_record(1.98, 0.42, auc=0.61)))
    return path


def test_run_page_shows_the_audit_when_audited(tmp_path: Path) -> None:
    page = build_page(load_input(_run(tmp_path / "run", audited=True)))
    table = next(t for t in page.tables if t.id == "audit")
    values = {r[0].text: r[1].text for r in table.rows}
    assert values["claimed_epsilon"] == "1.98"
    assert values["epsilon_lower_bound"] == "0.42"
    assert values["auc"] == "0.61" and values["consistent"] == "yes"
    figure = next(f for f in page.figures if f.name == "audit_scores")
    assert figure.png == PNG
    written = write_report(tmp_path / "run")
    assert (tmp_path / "run" / "figures" / "audit_scores.png").read_bytes() == PNG
    assert "Audit (audit.json)" in written.html.read_text()


def test_run_page_without_audit_has_none(tmp_path: Path) -> None:
    page = build_page(load_input(_run(tmp_path / "run", audited=False)))
    assert "audit" not in [t.id for t in page.tables]
    assert "audit_scores" not in [f.name for f in page.figures]
