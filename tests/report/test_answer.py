"""The opening answer and the recommendation table on a hand-made runs table whose answer is
known, and the study page that opens with them."""

from __future__ import annotations

import json
import math
import re
from html import unescape
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from report_fixtures import Recipe, write_study

from dpalign.report import build_report
from dpalign.report.answer import (
    MAX_SENTENCES,
    answer_rules,
    answer_sentences,
    recommendation_table,
    window_text,
)
from dpalign.study.analysis import LrWindow, TuneSettings, recommendations

INF = math.inf
LRS = (1e-4, 1e-3, 1e-2)
STABLE = {INF: LRS, 8.0: (1e-3, 1e-2), 2.0: (1e-3,), 0.5: ()}
"""The lrs at which every seed is stable: windows of 2, 1 and 0 decades, then none."""
TEST = {INF: 0.80, 8.0: 0.78, 2.0: 0.70, 0.5: 0.45}
"""Test held-out reward accuracy of the tuned (lr 1e-3) configuration."""
BASE = {"pope_adversarial_accuracy": 0.6, "chair_s": 0.4, "recall": 0.8}


def _runs() -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for eps in STABLE:
        mechanism = "none" if math.isinf(eps) else "dp_sgd"
        for lr in LRS:
            point = f"{mechanism}-eps{eps:g}-k8-dpo-lr{lr:g}"
            ok = lr in STABLE[eps]
            for seed in (0, 1, 2):
                test = (TEST[eps] if lr == 1e-3 else TEST[eps] - 0.1) + 0.01 * (seed - 1)
                rows.append({
                    "run": f"{point}-s{seed}", "point": point, "mechanism": mechanism,
                    "epsilon_target": eps, "k": 8, "loss": "dpo", "lr": lr, "seed": seed,
                    "status": "ok", "diverged": not ok,
                    "steps_to_target": 10.0 if ok else math.nan,
                    "clipping": "per_pair" if mechanism == "dp_sgd" else None,
                    "optimizer": "adamw", "max_grad_norm": 0.5 if mechanism == "dp_sgd" else None,
                    "final_val_reward_accuracy": 0.9 if lr == 1e-3 else 0.6,
                    "final_heldout_reward_accuracy": test, "best_heldout_reward_accuracy": test,
                    "final_pope_adversarial_accuracy": 0.62, "final_chair_s": 0.3,
                    "final_recall": 0.7})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def answer() -> list[str]:
    runs = _runs()
    return answer_sentences(recommendations(runs, base=BASE), runs, base=BASE)


def test_the_answer_has_at_most_six_sentences(answer: list[str]) -> None:
    assert 1 <= len(answer) <= MAX_SENTENCES
    for sentence in answer:
        assert sentence.endswith(".") and not re.search(r"\.\s+[A-Z]", sentence[:-1])


def test_the_answer_says_down_to_which_epsilon_dp_is_close_to_no_dp(answer: list[str]) -> None:
    assert answer[0] == ("Tuned DP-SGD comes within 0.05 of the tuned no-DP test held-out "
                         "reward accuracy down to ε=8 at K=8 (0.78 vs 0.8, not at ε=2).")


def test_the_answer_says_below_which_epsilon_the_base_is_no_longer_beaten(
        answer: list[str]) -> None:
    assert answer[1].startswith("It beats the base model (test held-out reward accuracy's 95% "
                                "CI above chance, 0.5) down to ε=2 at K=8 (not below it)")
    assert "100% of its tuned seeds beat the base's POPE-adversarial accuracy (0.6)" in answer[1]


def test_the_window_narrows_only_when_the_trend_rule_says_so(answer: list[str]) -> None:
    window = answer[2]
    assert "spans 2 decades at ∞ (no DP) and no stable lr at ε=0.5 (K=8)" in window
    assert "it narrows as ε falls" in window
    # a zig-zag (2, 0, 2 decades: equal ends) is not called a trend
    runs = _runs()
    zigzag = runs[~((runs["epsilon_target"] == 8.0) & (runs["lr"] == 1e-2))].copy()
    zigzag.loc[(zigzag["epsilon_target"] == 2.0) & (zigzag["lr"] == 1e-2),
               ["diverged", "steps_to_target"]] = [False, 10.0]
    zigzag.loc[(zigzag["epsilon_target"] == 2.0) & (zigzag["lr"] == 1e-4),
               ["diverged", "steps_to_target"]] = [False, 10.0]
    # widths: no DP 2, ε=8 0 (1e-2 not swept there, 1e-4 unstable), ε=2 2, ε=0.5 none
    sentences = answer_sentences(recommendations(zigzag), zigzag)
    assert "no clear trend in its width" in next(s for s in sentences if "lr window" in s)


def test_the_answer_counts_collapses_names_settings_and_the_tuning_release(
        answer: list[str]) -> None:
    assert answer[3].startswith("0 of 36 finished runs (0%) collapse on held-out")
    assert answer[4] == ("The 3 DP configurations (3 chosen among several by validation) use "
                         "clipping per_pair (3 of 3); optimizer adamw (3 of 3); lr 0.001 and "
                         "C 0.5.")
    assert "private validation split" in answer[5] and "Papernot & Steinke 2022" in answer[5]
    public = answer_sentences(recommendations(_runs()), _runs(),
                              tune=TuneSettings(split="public"))
    assert "public validation split, which spends no privacy" in public[-1]


def test_with_room_left_the_answer_counts_divergent_runs() -> None:
    runs = _runs()
    runs = runs[runs["lr"] == 1e-3]  # one lr per group: no window, nothing tuned
    sentences = answer_sentences(recommendations(runs), runs)
    assert len(sentences) <= MAX_SENTENCES
    assert "3 of 12 finished runs (25%) diverge, all at ε=0.5 or below." in sentences
    assert not any("lr window" in s for s in sentences)
    assert sentences[-1].startswith("No configuration was chosen by tuning")


def test_recommendation_table_has_the_base_row_first_and_the_tuned_settings() -> None:
    table = recommendation_table(recommendations(_runs(), base=BASE), BASE)
    assert table is not None
    assert table.rows[0][0].text == "base model (untrained)"
    headers = list(table.headers)
    for name in ("lr", "C", "clipping", "optimizer", "test held-out reward acc.",
                 "POPE-adv acc.", "CHAIR_s", "stable lr window", "beats base"):
        assert name in headers
    no_dp = table.rows[1]
    assert no_dp[headers.index("tuned point")].text == "none-epsinf-k8-dpo-lr0.001"
    assert no_dp[headers.index("stable lr window")].text == "1e-04 – 1e-02 (2 decades)"
    assert no_dp[headers.index("beats base")].text.startswith("yes (seeds: held-out 100%")
    smallest = table.rows[-1]
    assert smallest[headers.index("stable lr window")].text == "none stable (of 3)"
    assert smallest[headers.index("beats base")].text.startswith("no")
    assert smallest[headers.index("test held-out reward acc.")].text.startswith("0.45 [")


def test_window_text() -> None:
    assert window_text(LrWindow((1e-3,), (1e-3,), 1e-3, 1e-3)) == "one lr swept"
    assert window_text(LrWindow((1e-3, 1e-2), (1e-2,), 1e-2, 1e-2)) == "1e-02 only (0 decades)"


def test_the_rules_state_the_tuning_release_and_the_thresholds() -> None:
    rules = " ".join(answer_rules())
    assert "Papernot & Steinke 2022" in rules and "tune.split = public" in rules
    assert "more than 0.05" in rules and "exceeds chance (0.5)" in rules
    assert "0.5× the base's" in rules


# ---------------------------------------------------------------- the page


def test_the_study_page_opens_with_the_answer_and_the_recommendation_table(
        tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", Recipe(ks=(4,), seeds=(0, 1),
                                                   epsilons=(INF, 2.0)))
    (study / "base.json").write_text(json.dumps({"pope_adversarial_accuracy": 0.6,
                                                 "chair_s": 0.45, "recall": 0.7}))
    html = build_report(study).read_text()
    verdict = html.split('<section id="verdict">')[1].split("</section>")[0]
    answer = verdict.index('<p class="answer" id="answer">')
    table = verdict.index('<table class="sortable" id="recommendation">')
    assert answer < table < verdict.index('<table class="glance">')
    assert table < verdict.index('<details id="per-metric">') < verdict.index("<h3>Divergence")
    assert verdict.index("<h3>") > answer  # nothing titled comes before the answer
    text = unescape(re.sub(r"<[^>]+>", " ", verdict[answer:table]))
    assert 1 <= text.count(". ") + 1 <= MAX_SENTENCES + 2  # the answer paragraph
    assert "base model (untrained)" in verdict and "Papernot &amp; Steinke 2022" in verdict
    assert "|Spearman ρ| ≥ 0.8" in unescape(verdict)
    repro = html.split('<section id="reproducibility">')[1]
    assert "Base model (base.json)" in repro and "final_val_reward_accuracy" in repro


def test_precision_note_gives_counts_and_the_worst_half_width() -> None:
    from dpalign.report.answer import precision_note

    runs = pd.DataFrame({"final_pope_adversarial_n": [1082, 1082, float("nan")]})
    config = {"base": {"eval": {"heldout_pairs": 512, "validation_fraction": 0.5}}}
    note = precision_note(runs, config)
    # 1.96 * sqrt(0.25 / 1082) = 0.02979
    assert note == ("Evaluation sets: POPE-adversarial: 1082 questions per run (95% CI "
                    "half-width at most 0.030 for any accuracy); held-out pairs: 256 "
                    "validation (for tuning) and 256 test (reported).")
    assert precision_note(pd.DataFrame({"x": [1]}), None) is None


def test_tuned_series_are_the_recommendations_test_figures() -> None:
    """The answer's figure plots, per epsilon, the tuned (validation-chosen, lr 1e-3)
    configuration's test held-out reward accuracy: TEST + the seed offsets' mean (0)."""
    from dpalign.report.load import StudyInput
    from dpalign.report.study_figures import tuned_series

    runs = _runs()
    study = StudyInput(path=Path("."), meta={}, runs=runs, points=pd.DataFrame(),
                       logs={}, base=BASE)
    (series,) = tuned_series(study)
    assert series.label == "K=8" and [c.epsilon for c in series.cells] == [INF, 8.0, 2.0, 0.5]
    for cell in series.cells:
        assert cell.point.endswith("lr0.001")
        assert cell.get("final_heldout_reward_accuracy").mean == pytest.approx(TEST[cell.epsilon])
