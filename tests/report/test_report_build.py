"""Whole reports from synthetic study and run directories: every section present, figures
written as PNGs and embedded, verdict sentences that follow the fixture's numbers, a single
run's report, and clear errors for directories that are neither."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from report_fixtures import Recipe, write_run, write_study

from dpalign.report import ReportInputError, build_report, write_report
from dpalign.report.plot import epsilon_scale

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("verdict", "figures", "tables", "reproducibility")


INF = float("inf")
MakeStudy = Callable[..., Path]


@pytest.fixture
def make_study(tmp_path: Path) -> MakeStudy:
    """``make_study("name", diverge_below=1.0, ...)``: a study from a :class:`Recipe`."""

    def make(name: str = "study", points_file: bool = True, **fields: Any) -> Path:
        return write_study(tmp_path / name, Recipe(**fields), points_file=points_file)

    return make


@pytest.fixture(scope="module")
def unstable_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every seed diverges below epsilon 1 and the loss noise grows as epsilon shrinks."""
    root = tmp_path_factory.mktemp("studies") / "unstable"
    return build_report(write_study(root, Recipe(diverge_below=1.0, noisy=True)))


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                     html)]


def _verdict_text(html: str) -> str:
    """The text of the verdict section, tags removed, entities unescaped."""
    section = html.split('<section id="verdict">')[1].split("</section>")[0]
    return unescape(re.sub(r"<[^>]+>", " ", section))


def test_study_report_has_every_section_and_embedded_figures(unstable_report: Path) -> None:
    html = unstable_report.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    figures = sorted((unstable_report.parent / "figures").glob("*.png"))
    names = {f.stem for f in figures}
    assert {"curves", "stability", "frontier", "dp_signals"} <= names
    assert not names & {"mechanisms", "losses"}  # one mechanism, one loss: no comparison
    embedded = _embedded_pngs(html)
    assert len(embedded) == len(figures)
    for figure in figures:
        data = figure.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert data in embedded


def test_study_report_is_self_contained(unstable_report: Path) -> None:
    html = unstable_report.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html and "<script src" not in html


def test_tables_and_reproducibility_come_from_the_study(unstable_report: Path) -> None:
    html = unstable_report.read_text()
    assert '<table class="sortable" id="runs">' in html and "data-sort=" in html
    assert html.count("<tr>") > 24 + 8  # a row per run and per grid point
    repro = html.split('<section id="reproducibility">')[1]
    for expected in ("dpalign study run configs/study.yaml --out", "abc1234", "pld",
                     "0, 1, 2", "2.13.0+cpu", "torch_threads", "grid:"):
        assert expected in repro


def test_a_single_step_in_divergence_is_no_clear_trend_under_the_rho_rule(
        unstable_report: Path) -> None:
    # divergence 0, 0, 0, 1 over ε = ∞, 8, 2, 0.5: the end CIs separate but Spearman
    # rho = 3 / sqrt(15) = 0.77 < 0.8, so the trend rule does not call it (it used to "rise")
    text = _verdict_text(unstable_report.read_text())
    assert ("K=4: divergence rate shows no clear trend as ε decreases (more noise): the end "
            "points' 95% CIs separate (0 [0, 0] (n=3) at ∞ (no DP) vs 1 [1, 1] (n=3) at "
            "ε=0.5) but |ρ| < 0.8 (Spearman ρ=+0.77 over 4 ε values)") in text
    assert "K=4: stability breaks at ε=2" in text  # volatility crosses 2x before divergence
    assert re.search(r"Divergence rate 1 \[1, 1\] \(n=3\) ≥ 0.5 from ε=0.5 \(σ 8; mean "
                     r"noise-to-signal 4\.\d+", text)


def test_verdict_does_not_claim_a_rise_when_divergence_is_flat(
        make_study: MakeStudy) -> None:
    study = make_study("flat", ks=(8,), epsilons=(INF, 8.0, 1.0))
    sentences = write_report(study).sentences
    divergence = [s for s in sentences if "divergence rate" in s and "ε decreases" in s]
    assert divergence == [
        "K=8: divergence rate shows no clear trend as ε decreases (more noise): the 95% CIs "
        "0 [0, 0] (n=3) at ∞ (no DP) and 0 [0, 0] (n=3) at ε=1 overlap (Spearman "
        "ρ=undefined over 3 ε values)."]
    assert any(s.startswith("K=8: stable down to ε=1") for s in sentences)


def test_one_diverging_seed_of_three_is_no_clear_change(make_study: MakeStudy) -> None:
    study = make_study("one-seed", ks=(8,), epsilons=(INF, 1.0), diverge_below=2.0,
                       diverging_seeds=1)
    sentences = write_report(study).sentences
    divergence = next(s for s in sentences if s.startswith("K=8: divergence rate"))
    assert "shows no clear trend" in divergence and "0.333 [0, 1] (n=3) at ε=1" in divergence


def test_comparison_figures_appear_only_when_the_study_varies_them(
        make_study: MakeStudy) -> None:
    study = make_study("both", ks=(4,), seeds=(0, 1), epsilons=(INF, 2.0),
                       mechanisms=("dp_sgd", "label_dp"), losses=("dpo", "mdpo"))
    report = write_report(study)
    assert {p.stem for p in report.figures} >= {"mechanisms", "losses"}
    assert any(s.startswith("DP-SGD, DPO, K=4:") for s in report.sentences)
    assert any(s.startswith("label-DP, MDPO, K=4:") for s in report.sentences)


def test_missing_points_table_is_rebuilt_from_the_runs(make_study: MakeStudy) -> None:
    study = make_study("no-points", points_file=False, ks=(4,), epsilons=(INF, 1.0),
                       diverge_below=2.0)
    sentences = write_report(study).sentences
    assert sentences[0].startswith("K=4: divergence rate rises as ε decreases")


def test_out_option_puts_figures_beside_the_page(make_study: MakeStudy,
                                                 tmp_path: Path) -> None:
    study = make_study("elsewhere", ks=(4,), seeds=(0, 1), epsilons=(INF, 1.0))
    out = tmp_path / "pages" / "study.html"
    assert build_report(study, out=out) == out
    assert (tmp_path / "pages" / "figures" / "stability.png").exists()
    assert not (study / "report.html").exists()


def test_single_run_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, Recipe(diverge_below=2.0), epsilon=1.0, k=8, seed=0,
              mechanism="dp_sgd", loss="dpo")
    report = write_report(run)
    html = report.html.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    assert {p.stem for p in report.figures} == {"curves", "dp_signals", "evals"}
    assert len(_embedded_pngs(html)) == 3
    assert report.sentences[0] == "Diverged at step 21 (loss_above_limit) of 40 steps."
    assert "Run diagnostics" in html and "Evaluations" in html
    assert "dpalign train --config" in html and "pld" in html


def test_single_non_private_run_has_no_dp_figure(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, Recipe(), epsilon=INF, k=8, seed=0, mechanism="none", loss="dpo")
    report = write_report(run)
    assert {p.stem for p in report.figures} == {"curves", "evals"}
    assert "none (non-private run)" in report.html.read_text()


def test_a_directory_that_is_neither_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReportInputError, match=re.escape(str(tmp_path)) + ".*neither a study"):
        build_report(tmp_path)
    with pytest.raises(ReportInputError, match="no such directory"):
        build_report(tmp_path / "missing")


def test_a_study_without_its_runs_table_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text("{}")
    with pytest.raises(ReportInputError, match=r"runs\.parquet"):
        build_report(tmp_path)


def test_epsilon_scale_puts_no_dp_right_of_a_break() -> None:
    scale = epsilon_scale([INF, 8.0, 0.5, 2.0])
    assert scale.finite == (0.5, 2.0, 8.0) and scale.has_inf
    assert scale.x(INF) == 32.0 and scale.x(2.0) == 2.0
