"""The report's "RL under DP" and "Reward model vs epsilon" sections on synthetic studies whose
run directories are made up by hand and whose tables are written by the study's own store
(``run_row``, ``points_table``): each cell is the runs' mean [95% bootstrap CI] per
(epsilon, method), a few checked against closed forms; ``rl.png`` is written; a study
without RL or reward-model runs renders as before."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from report_fixtures import Recipe, write_study

import dpalign.report.study_figures as figures_module
from dpalign.diagnostics import diagnose_run_dir
from dpalign.report import write_report
from dpalign.report.fmt import format_number
from dpalign.report.html import Page, render_page
from dpalign.report.load import load_input
from dpalign.report.pages import study_page
from dpalign.report.rl import REWARD_COMPARED, RL_COMPARED, rl_figure
from dpalign.report.tables import Table
from dpalign.study.analysis import estimate
from dpalign.study.grid import Point
from dpalign.study.rl import RL_COLUMNS, RL_PRIVACY_COLUMNS
from dpalign.study.store import points_table, run_row, write_parquet
from dpalign.train.config import TrainConfig

INF = math.inf
STEPS = 12
SEEDS = (0, 1, 2)
EPSILONS = (INF, 8.0)
METHODS = ("offline", "rloo", "grpo")
RM_EPSILON = 4.0


# --- the synthetic runs ----------------------------------------------------------------------

def _judge(method: str, epsilon: float, seed: int, step: int) -> float:
    """Falls for rloo at epsilon 8, seed 0 (the hacked run); rises otherwise."""
    if (method, epsilon, seed) == ("rloo", 8.0, 0):
        return 0.8 - 0.02 * step
    return 0.3 + 0.01 * step + 0.01 * seed


def _entropy(method: str, step: int) -> float:
    """grpo's entropy collapses (2.0 -> 0.35), rloo's stays at 1."""
    return 2.15 - 0.15 * step if method == "grpo" else 1.0


def _metrics(method: str, epsilon: float, seed: int) -> list[dict[str, Any]]:
    rows = []
    for step in range(1, STEPS + 1):
        row: dict[str, Any] = {"step": step, "loss": 0.69 - 0.01 * step, "lr": 1e-3,
                               "step_seconds": 0.1}
        if math.isfinite(epsilon):
            row |= {"dp_clip_fraction": 0.3, "dp_noise_to_signal": 0.5,
                    "epsilon": 0.99 * epsilon if step == STEPS else None}
        else:
            row["kl_proxy"] = 0.01 * step
        if method != "offline":
            empty = seed == 1 and step == 5  # Poisson drew no prompt
            row |= {"rl_prompts": 0 if empty else 4, "rl_samples": 0 if empty else 16,
                    "online_seconds": 0.05}
            values = {"rl_reward": 0.1 * step + 0.02 * seed,
                      "rl_judge": _judge(method, epsilon, seed, step),
                      "rl_kl": 0.01 * step, "rl_entropy": _entropy(method, step),
                      "rl_reward_std": 0.1, "rl_length": 12.0, "rl_advantage_std": 1.0}
            row |= {k: None if empty else v for k, v in values.items()}
        rows.append(row)
    return rows


def _pope_f1(method: str, seed: int) -> float:
    return 0.6 + 0.01 * seed + 0.02 * METHODS.index(method)


def _evals(method: str, seed: int) -> list[dict[str, Any]]:
    return [{"step": step, "heldout_reward_accuracy": 0.5 + 0.02 * step,
             "heldout_reward_margin": 0.01 * step,
             "pope_adversarial_accuracy": 0.6, "pope_adversarial_f1": _pope_f1(method, seed),
             "chair_s": 0.4 - 0.01 * seed, "chair_i": 0.1, "recall": 0.5}
            for step in (0, STEPS)]


def _result(method: str, epsilon: float) -> dict[str, Any]:
    privacy: dict[str, Any] = ({"accountant": "pld", "delta": 1e-5, "sigma": 4.0 / epsilon,
                                "epsilon": 0.99 * epsilon, "unit": "example"}
                               if math.isfinite(epsilon) else {})
    if method != "offline":
        privacy |= {"reward_model": {"epsilon": RM_EPSILON, "delta": 1e-5, "path": "rm"},
                    "composition": "sequential",
                    "total_epsilon": 0.99 * epsilon + RM_EPSILON}
    return {"privacy": privacy or None, "wall_seconds": 10.0 + 5 * METHODS.index(method)}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_study(root: Path, runs: list[tuple[Point, TrainConfig, list, list, dict]]) -> Path:
    """Run directories, then runs.parquet / points.parquet as ``dpalign.study`` writes them."""
    rows = []
    for point, config, metrics, evals, result in runs:
        path = root / "runs" / point.name
        path.mkdir(parents=True)
        _write_jsonl(path / "metrics.jsonl", metrics)
        _write_jsonl(path / "eval.jsonl", evals)
        (path / "result.json").write_text(json.dumps(result))
        (path / "diagnostics.json").write_text(json.dumps(diagnose_run_dir(path).as_dict()))
        rows.append(run_row(point, path, config))
    table = pd.DataFrame(rows)
    write_parquet(table, root / "runs.parquet")
    write_parquet(points_table(table), root / "points.parquet")
    (root / "study.json").write_text(json.dumps({"name": root.name, "config": {}}))
    return root


def _config(tmp: Path, **extra: Any) -> TrainConfig:
    return TrainConfig.model_validate({"model": tmp / "m", "data": {"train": tmp / "p.jsonl",
                                                                    "k": 4},
                                       "lora": {"enabled": True}, **extra})


def _mechanism(epsilon: float) -> str:
    return "dp_sgd" if math.isfinite(epsilon) else "none"


@pytest.fixture(scope="module")
def rl_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies") / "rl"
    runs = []
    for method in METHODS:
        extra = {} if method == "offline" else {"method": method,
                                                "rl": {"reward_model": root / "rm"}}
        config = _config(root, **extra)
        for epsilon in EPSILONS:
            for seed in SEEDS:
                point = Point(_mechanism(epsilon), epsilon, 4, "dpo", None, seed, (), method)
                runs.append((point, config, _metrics(method, epsilon, seed),
                             _evals(method, seed), _result(method, epsilon)))
    return _write_study(root, runs)


@contextmanager
def only_rl_figure() -> Iterator[None]:
    """Pages drawn with the RL figure alone (the others take seconds each and are tested
    elsewhere)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures_module, "STUDY_FIGURES", {"rl": rl_figure})
        yield


@pytest.fixture(scope="module")
def rl_page(rl_study: Path) -> Page:
    with only_rl_figure():
        return study_page(load_input(rl_study))  # type: ignore[arg-type]


def _table(page: Page, table_id: str) -> Table | None:
    return next((t for t in page.tables if t.id == table_id), None)


def _estimate_text(values: pd.Series) -> str:
    est = estimate(values)
    return f"{format_number(est.mean)} [{format_number(est.low)}, {format_number(est.high)}]"


def _rows(table: Table) -> list[dict[str, Any]]:
    return [dict(zip(table.headers, row, strict=True)) for row in table.rows]


def _epsilon(row: dict[str, Any]) -> float:
    return float(row["ε"].sort.replace("Infinity", "inf"))


# --- RL under DP -----------------------------------------------------------------------------

def test_rl_rows_are_the_runs_means_per_epsilon_and_method(rl_study: Path,
                                                          rl_page: Page) -> None:
    table = _table(rl_page, "rl")
    assert table is not None and table.title == "RL under DP"
    assert table.headers[:5] == ("ε", "K", "method", "tuned point", "runs")
    assert table.headers[5:] == tuple(h for h, _ in RL_COMPARED.values())
    rows = _rows(table)
    assert [(r["ε"].text, r["method"].text) for r in rows] == [
        ("∞ (no DP)", "offline"), ("∞ (no DP)", "rloo"), ("∞ (no DP)", "grpo"),
        ("8", "offline"), ("8", "rloo"), ("8", "grpo")]
    runs = pd.read_parquet(rl_study / "runs.parquet")
    for row in rows:
        mine = runs[(runs["epsilon_target"] == _epsilon(row))
                    & (runs["method"] == row["method"].text)]
        assert len(mine) == 3 and row["runs"].text == "3"
        for header, read in RL_COMPARED.values():
            values = read(mine).astype(float)
            if values.isna().all():
                assert row[header].text == "—", header
                continue
            assert float(row[header].sort) == pytest.approx(values.mean(), rel=1e-12), header
            assert row[header].text == _estimate_text(values), header


def _cell(table: Table, epsilon: float, method: str, header: str) -> float:
    row = next(r for r in _rows(table) if _epsilon(r) == epsilon and r["method"].text == method)
    return float(row[header].sort.replace("Infinity", "inf")) if row[header].sort else math.nan


def test_rl_cells_follow_the_made_up_logs(rl_page: Page) -> None:
    """Closed forms: finals over the last ceil(0.1 x 12) = 2 steps (11, 12)."""
    table = _table(rl_page, "rl")
    assert table is not None
    # judge (end), rloo at no DP: mean over seeds of 0.3 + 0.115 + 0.01 s = 0.425
    assert _cell(table, INF, "rloo", "judge score (end)") == pytest.approx(0.425)
    # rloo at eps 8: seed 0 falls to 0.8 - 0.23 = 0.57, seeds 1, 2 at 0.425, 0.435
    assert _cell(table, 8.0, "rloo", "judge score (end)") == pytest.approx(
        (0.57 + 0.425 + 0.435) / 3)
    # reward model (end): 1.15 + 0.02 s -> 1.17
    assert _cell(table, 8.0, "grpo", "reward-model score (end)") == pytest.approx(1.17)
    assert _cell(table, 8.0, "rloo", "KL to ref. (end, nats)") == pytest.approx(0.115)
    # hacking: only rloo, eps 8, seed 0 (reward up, judge down)
    assert _cell(table, 8.0, "rloo", "hacking rate") == pytest.approx(1 / 3)
    assert _cell(table, INF, "rloo", "hacking rate") == 0.0
    assert _cell(table, 8.0, "grpo", "hacking rate") == 0.0
    # grpo's entropy: start (2.0 + 1.85) / 2 = 1.925 (seed 1: its steps 1, 2 as well),
    # end (0.5 + 0.35) / 2 = 0.425: ratio 0.221 < 0.5, collapsed; rloo's ratio 1
    assert _cell(table, 8.0, "grpo", "entropy ratio (end / start)") == pytest.approx(
        0.425 / 1.925)
    assert _cell(table, 8.0, "grpo", "entropy-collapse rate") == 1.0
    assert _cell(table, INF, "rloo", "entropy-collapse rate") == 0.0
    # total epsilon: offline = its own 7.92; RL = 7.92 + 4; without DP the policy is inf
    assert _cell(table, 8.0, "offline", "total ε") == pytest.approx(7.92)
    assert _cell(table, 8.0, "rloo", "total ε") == pytest.approx(11.92)
    assert _cell(table, INF, "grpo", "total ε") == INF
    assert _cell(table, 8.0, "grpo", "POPE-adv F1") == pytest.approx(0.65)
    assert _cell(table, 8.0, "offline", "CHAIR_s") == pytest.approx(0.39)
    assert _cell(table, 8.0, "offline", "divergence rate") == 0.0
    assert _cell(table, 8.0, "grpo", "wall s per run") == 20.0
    assert math.isnan(_cell(table, 8.0, "offline", "judge score (end)"))


def test_rl_study_has_the_figure_rules_and_run_columns(rl_study: Path, rl_page: Page) -> None:
    assert "rl" in {f.name for f in rl_page.figures}
    assert any(r.startswith("RL runs: a run hacks its reward model") for r in rl_page.rules)
    runs_table = _table(rl_page, "runs")
    assert runs_table is not None
    assert {"reward-model score (end)", "judge score (end)", "total ε"} <= set(
        runs_table.headers)
    assert _table(rl_page, "reward") is None
    assert _table(rl_page, "methods") is not None  # three methods: the comparison too
    html = render_page(rl_page)
    assert 'id="figure-rl"' in html and 'id="rl"' in html
    with only_rl_figure():
        report = write_report(rl_study)
    png = rl_study / "figures" / "rl.png"
    assert png in report.figures and png.read_bytes().startswith(b"\x89PNG")


def test_runs_parquet_has_the_rl_columns(rl_study: Path) -> None:
    runs = pd.read_parquet(rl_study / "runs.parquet")
    assert set(RL_COLUMNS) | set(RL_PRIVACY_COLUMNS) <= set(runs.columns)
    offline = runs[runs["method"] == "offline"]
    assert offline[[*RL_COLUMNS, *RL_PRIVACY_COLUMNS]].isna().all().all()
    assert (runs.loc[runs["method"] != "offline", "reward_model_epsilon"] == RM_EPSILON).all()
    assert not runs["reward_model_run"].any()


# --- reward models ---------------------------------------------------------------------------

def _accuracy(epsilon: float, seed: int) -> float:
    return (0.7 if math.isinf(epsilon) else 0.6) + 0.01 * seed


@pytest.fixture(scope="module")
def reward_page(tmp_path_factory: pytest.TempPathFactory) -> Page:
    root = tmp_path_factory.mktemp("studies") / "reward"
    config = _config(root, reward={"enabled": True, "facts": "objects"},
                     loss={"name": "bradley_terry"})
    runs = []
    for epsilon in EPSILONS:
        for seed in SEEDS:
            point = Point(_mechanism(epsilon), epsilon, 4, "bradley_terry", None, seed)
            metrics = [{"step": s, "loss": 0.69 - 0.02 * s,
                        **({"dp_clip_fraction": 0.2, "dp_noise_to_signal": 0.5}
                           if math.isfinite(epsilon) else {})}
                       for s in range(1, STEPS + 1)]
            evals = [{"step": s, "heldout_reward_accuracy": _accuracy(epsilon, seed) * s / STEPS,
                      "heldout_loss": 0.69 - 0.01 * s} for s in (0, STEPS)]
            runs.append((point, config, metrics, evals, _result("offline", epsilon)))
    with only_rl_figure():
        return study_page(load_input(_write_study(root, runs)))  # type: ignore[arg-type]


def test_reward_table_is_the_held_out_accuracy_per_epsilon(reward_page: Page) -> None:
    table = _table(reward_page, "reward")
    assert table is not None and table.title == "Reward model vs epsilon"
    assert table.headers == ("ε", "K", "tuned point", "runs",
                             *(h for h, _ in REWARD_COMPARED.values()))
    rows = _rows(table)
    assert [r["ε"].text for r in rows] == ["∞ (no DP)", "8"]
    for row, epsilon in zip(rows, EPSILONS, strict=True):
        accuracies = pd.Series([_accuracy(epsilon, s) for s in SEEDS])
        cell = row["held-out reward acc."]
        assert float(cell.sort) == pytest.approx(accuracies.mean())  # 0.71, 0.61
        assert cell.text == _estimate_text(accuracies)
        assert float(row["held-out loss"].sort) == pytest.approx(0.57)
    assert float(rows[1]["ε spent"].sort) == pytest.approx(7.92)
    assert _table(reward_page, "rl") is None
    assert "rl" not in {f.name for f in reward_page.figures}


# --- studies without RL --------------------------------------------------------------------

def _without_paths_and_images(html: str, root: Path) -> str:
    html = html.replace(str(root), "ROOT").replace(root.name, "NAME")
    return re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', html)


def test_a_study_without_rl_renders_as_before(tmp_path: Path) -> None:
    recipe = Recipe(epsilons=(INF, 2.0), ks=(4,), seeds=(0, 1), steps=10)
    before = write_study(tmp_path / "a" / "study", recipe)
    after = write_study(tmp_path / "b" / "study", recipe)
    nan = dict.fromkeys((*RL_COLUMNS, *RL_PRIVACY_COLUMNS), math.nan)
    runs = pd.read_parquet(after / "runs.parquet")  # as a study writes it now
    runs.assign(method="offline", reward_model_run=False, **nan).to_parquet(
        after / "runs.parquet")
    points = pd.read_parquet(after / "points.parquet")
    points.assign(reward_model_run=False, rl_hacking_mean=math.nan).to_parquet(
        after / "points.parquet")
    assert "rl" in figures_module.STUDY_FIGURES  # every figure drawn here
    old, new = write_report(before), write_report(after)
    assert "rl" not in {p.stem for p in new.figures}
    html = new.html.read_text()
    assert 'id="rl"' not in html and 'id="reward"' not in html
    assert new.sentences == old.sentences
    assert (_without_paths_and_images(new.html.read_text(), after)
            == _without_paths_and_images(old.html.read_text(), before))
