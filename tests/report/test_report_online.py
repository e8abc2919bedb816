"""The report's "Offline vs online alignment" section on synthetic studies: its numbers are
the runs table's means (and bootstrap CIs) per (epsilon, method), the pair yield follows the
logged online fields, and a study with one method renders as it did before methods."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from report_fixtures import Recipe, write_study

from dpalign.report import write_report
from dpalign.report.fmt import format_number
from dpalign.report.html import Page, render_page
from dpalign.report.load import load_input
from dpalign.report.pages import study_page
from dpalign.report.tables import Table
from dpalign.study.analysis import estimate

INF = float("inf")
STEPS = 20
RECIPE = Recipe(epsilons=(INF, 8.0, 2.0), ks=(4,), seeds=(0, 1, 2), steps=STEPS,
                methods=("offline", "online"))
COLUMNS = {  # table header -> how a run's value is read from runs.parquet
    "held-out reward acc.": lambda r: r["final_heldout_reward_accuracy"],
    "POPE-adv acc.": lambda r: r["final_pope_adversarial_accuracy"],
    "CHAIR_s": lambda r: r["final_chair_s"],
    "CHAIR_i": lambda r: r["final_chair_i"],
    "divergence rate": lambda r: r["diverged"].astype(float),
    "loss volatility": lambda r: r["loss_volatility"],
    "wall s per run": lambda r: r["wall_seconds"],
    "generation share of wall": lambda r: r["online_seconds"] / r["wall_seconds"],
    "online pair yield": lambda r: r["online_pair_yield"],
}


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_study(tmp_path_factory.mktemp("studies") / "methods", RECIPE)


@pytest.fixture(scope="module")
def two_page(two_methods: Path) -> Page:
    return study_page(load_input(two_methods))  # type: ignore[arg-type]


def _table(page: Page | Path, table_id: str) -> Table | None:
    if isinstance(page, Path):
        page = study_page(load_input(page))  # type: ignore[arg-type]
    return next((t for t in page.tables if t.id == table_id), None)


def _estimate_text(values: pd.Series) -> str:
    est = estimate(values)
    return (f"{format_number(est.mean)} [{format_number(est.low)}, "
            f"{format_number(est.high)}]")


def test_comparison_rows_are_the_runs_means_per_epsilon_and_method(two_methods: Path,
                                                                   two_page: Page) -> None:
    table = _table(two_page, "methods")
    assert table is not None and table.title == "Offline vs online alignment"
    assert table.headers[:5] == ("ε", "K", "method", "tuned point", "runs")
    runs = pd.read_parquet(two_methods / "runs.parquet")
    rows = [dict(zip(table.headers, row, strict=True)) for row in table.rows]
    # no DP first, then epsilon from large to small; offline before online at each
    assert [(r["ε"].text, r["method"].text) for r in rows] == [
        ("∞ (no DP)", "offline"), ("∞ (no DP)", "online"), ("8", "offline"), ("8", "online"),
        ("2", "offline"), ("2", "online")]
    for row in rows:
        epsilon = float(row["ε"].sort.replace("Infinity", "inf"))
        mine = runs[(runs["epsilon_target"] == epsilon) & (runs["method"] == row["method"].text)]
        assert len(mine) == 3 and row["runs"].text == "3"
        for header, read in COLUMNS.items():
            values = read(mine).astype(float)
            if values.isna().all():  # offline runs sampled nothing online
                assert row[header].text == "—", header
                continue
            assert float(row[header].sort) == pytest.approx(values.mean(), rel=1e-12), header
            assert row[header].text == _estimate_text(values), header


def test_online_figures_follow_the_logged_fields(two_methods: Path, two_page: Page) -> None:
    """Pair yield = sum online_pairs / sum online_prompts; the fixture logs 8 prompts and
    4 + (step + seed) mod 5 pairs per step, 0.02 + 0.001 (step mod 3) seconds."""
    runs = pd.read_parquet(two_methods / "runs.parquet")
    online = runs[runs["method"] == "online"]
    for _, run in online.iterrows():
        seed = int(run["seed"])
        pairs = sum(4 + (step + seed) % 5 for step in range(1, STEPS + 1))
        assert run["online_pair_yield"] == pytest.approx(pairs / (8 * STEPS), rel=1e-12)
        assert run["online_seconds"] == pytest.approx(
            sum(0.02 + 0.001 * (step % 3) for step in range(1, STEPS + 1)), rel=1e-12)
    assert runs[runs["method"] == "offline"][["online_pair_yield", "online_seconds",
                                              "online_score_best_final"]].isna().all().all()
    # online yields in this fixture: seeds 0, 1, 2 -> (20 * 4 + 40) / 160 = 0.75 each
    table = _table(two_page, "methods")
    assert table is not None
    column = table.headers.index("online pair yield")
    yields = [r[column].text for r in table.rows if r[2].text == "online"]
    assert yields == ["0.75 [0.75, 0.75]"] * 3


def test_two_method_report_has_the_figure_and_method_columns(two_page: Page) -> None:
    assert "methods" in {f.name for f in two_page.figures}
    html = render_page(two_page)
    assert 'id="figure-methods"' in html and 'id="methods"' in html
    assert two_page.recommendation is not None and "method" in two_page.recommendation.headers
    points = _table(two_page, "points")
    assert points is not None and "method" in points.headers
    # the answer speaks about the offline method, naming it; the others are in the table
    answer = two_page.answer
    assert any(s.startswith("Offline alignment: Tuned DP-SGD comes within") for s in answer)


def _without_paths_and_images(html: str, root: Path) -> str:
    html = html.replace(str(root), "ROOT").replace(root.name, "NAME")
    return re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', html)


def test_one_method_study_renders_as_before(tmp_path: Path) -> None:
    recipe = Recipe(epsilons=(INF, 2.0), ks=(4,), seeds=(0, 1))
    before = write_study(tmp_path / "a" / "study", recipe)
    after = write_study(tmp_path / "b" / "study", recipe)
    runs = pd.read_parquet(after / "runs.parquet")  # as a study writes it now
    runs.assign(method="offline", online_pair_yield=float("nan"),
                online_seconds=float("nan")).to_parquet(after / "runs.parquet")
    assert _table(after, "methods") is None and _table(before, "methods") is None
    old, new = write_report(before), write_report(after)
    assert "methods" not in {p.stem for p in new.figures}
    assert new.sentences == old.sentences
    assert (_without_paths_and_images(new.html.read_text(), after)
            == _without_paths_and_images(old.html.read_text(), before))
