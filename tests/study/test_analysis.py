"""The study's answer measures on hand-made runs tables with known answers: the stable lr
window, held-out collapse, seed dispersion, better-than-the-base (with the recall-collapse
flag) and the tuning protocol (chosen on validation, reported on test)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

from dpalign.study.analysis import (
    LrWindow,
    TuneSettings,
    better_than_base,
    collapse_fraction,
    collapsed,
    fixed_choices,
    heldout_drop,
    lr_window,
    recommendations,
    seed_dispersion,
    stable_lr_window,
    tuned_choices,
    versus_base,
)

INF = math.inf


def run(point: str, seed: int = 0, **fields: Any) -> dict[str, Any]:
    """One runs-table row: a stable DP-SGD run at ε=2, K=8 unless ``fields`` say otherwise."""
    row = {"run": f"{point}-s{seed}", "point": point, "mechanism": "dp_sgd",
           "epsilon_target": 2.0, "k": 8, "loss": "dpo", "lr": 1e-3, "seed": seed,
           "status": "ok", "diverged": False, "steps_to_target": 10.0,
           "best_heldout_reward_accuracy": 0.8, "final_heldout_reward_accuracy": 0.8}
    return row | fields


# ---------------------------------------------------------------- lr window


def test_lr_window_is_the_widest_contiguous_run_of_stable_lrs() -> None:
    w = lr_window({1e-4: True, 3e-4: True, 1e-3: False, 3e-3: True})
    assert (w.low, w.high) == (1e-4, 3e-4) and w.width == pytest.approx(math.log10(3))
    assert w.stable == (1e-4, 3e-4, 3e-3) and len(w.swept) == 4
    # widest in log10(lr), not in count: 1e-2..1e-1 (1 decade) beats 1e-5, 2e-5, 3e-5
    w = lr_window({1e-5: True, 2e-5: True, 3e-5: True, 1e-3: False, 1e-2: True, 1e-1: True})
    assert (w.low, w.high) == (1e-2, 1e-1) and w.width == pytest.approx(1.0)


def test_a_single_stable_lr_has_width_zero_and_none_stable_has_none() -> None:
    single = lr_window({1e-4: False, 1e-3: True, 1e-2: False})
    assert single.width == 0.0 and single.low == single.high == 1e-3
    assert lr_window({1e-4: False, 1e-3: False}).width is None
    assert LrWindow().width is None


def test_stable_lr_window_needs_every_seed_stable_and_holds_other_settings() -> None:
    rows = []
    for lr in (1e-4, 1e-3, 3e-3, 1e-2, 1e-1):
        for seed in (0, 1):
            fields: dict[str, Any] = {"lr": lr, "max_grad_norm": 0.1}
            if lr == 1e-3 and seed == 1:
                fields["diverged"] = True            # one seed diverges: 1e-3 unstable
            if lr == 1e-4 and seed == 0:
                fields["steps_to_target"] = math.nan  # never converges: 1e-4 unstable
            if lr == 1e-1 and seed == 0:
                fields["final_heldout_reward_accuracy"] = 0.7  # drop 0.1 > 0.05: collapse
            rows.append(run(f"lr{lr}-C0.1", seed, **fields))
            # another clipping norm, stable at every lr: must not widen the window
            rows.append(run(f"lr{lr}-C1", seed, lr=lr, max_grad_norm=1.0))
    runs = pd.DataFrame(rows)
    w = stable_lr_window(runs, {"lr": 1e-3, "max_grad_norm": 0.1})
    assert w.stable == (3e-3, 1e-2)
    assert (w.low, w.high) == (3e-3, 1e-2) and w.width == pytest.approx(math.log10(10 / 3))
    assert w.seeds == 2
    wide = stable_lr_window(runs, {"max_grad_norm": 1.0})
    assert wide.width == pytest.approx(3.0)


# ---------------------------------------------------------------- collapse, dispersion


def test_collapse_is_a_drop_of_more_than_0_05_from_best_to_final() -> None:
    runs = pd.DataFrame([run("p", s, best_heldout_reward_accuracy=0.8,
                             final_heldout_reward_accuracy=0.8 - d)
                         for s, d in enumerate((0.0, 0.04, 0.06, 0.2))])
    assert heldout_drop(runs).tolist() == pytest.approx([0.0, 0.04, 0.06, 0.2])
    assert collapsed(runs).tolist() == [False, False, True, True]
    assert collapse_fraction(runs) == 0.5
    assert collapse_fraction(runs, threshold=0.1) == 0.25


def test_a_heldout_drop_column_is_used_when_present_and_failed_runs_are_left_out() -> None:
    runs = pd.DataFrame([run("p", 0, heldout_drop=0.3), run("p", 1, heldout_drop=0.0),
                         run("p", 2, heldout_drop=0.3, status="failed")])
    assert collapse_fraction(runs) == 0.5


def test_seed_dispersion_is_the_std_over_seeds_of_each_final_figure() -> None:
    runs = pd.DataFrame([run("a", 0, final_heldout_reward_accuracy=0.6, final_chair_s=0.1),
                         run("a", 1, final_heldout_reward_accuracy=0.8, final_chair_s=0.1),
                         run("b", 0, final_heldout_reward_accuracy=0.5, final_chair_s=0.2)])
    std = seed_dispersion(runs)
    assert std.loc["a", "final_heldout_reward_accuracy"] == pytest.approx(math.sqrt(0.02))
    assert std.loc["a", "final_chair_s"] == 0.0
    assert math.isnan(std.loc["b", "final_heldout_reward_accuracy"])  # one seed


# ---------------------------------------------------------------- better than the base


BASE = {"pope_adversarial_accuracy": 0.6, "chair_s": 0.4, "recall": 0.8}


def test_better_than_base_uses_chance_for_heldout_and_flags_recall_collapse() -> None:
    runs = pd.DataFrame([
        run("p", 0, final_heldout_reward_accuracy=0.7, final_pope_adversarial_accuracy=0.65,
            final_chair_s=0.3, final_recall=0.7),
        # CHAIR falls because the captions stop naming objects: recall 0.3 < 0.5 x 0.8
        run("p", 1, final_heldout_reward_accuracy=0.5, final_pope_adversarial_accuracy=0.55,
            final_chair_s=0.1, final_recall=0.3),
        run("p", 2, final_heldout_reward_accuracy=0.4, final_pope_adversarial_accuracy=0.7,
            final_chair_s=0.5, final_recall=0.8),
    ])
    table = versus_base(runs, BASE)
    assert table["heldout"].tolist() == [1.0, 0.0, 0.0]  # 0.5 is chance, not better
    assert table["pope"].tolist() == [1.0, 0.0, 1.0]
    assert table["chair"].tolist() == [1.0, 0.0, 0.0]    # the silenced run does not count
    assert table["recall_collapsed"].tolist() == [0.0, 1.0, 0.0]
    out = better_than_base(runs, BASE)
    assert out["heldout"] == pytest.approx(1 / 3) and out["pope"] == pytest.approx(2 / 3)
    assert out["chair"] == pytest.approx(1 / 3) and out["n_recall_collapsed"] == 1


def test_without_base_figures_only_the_heldout_comparison_is_made() -> None:
    runs = pd.DataFrame([run("p", 0, final_heldout_reward_accuracy=0.7, final_chair_s=0.1,
                             recall_collapsed=True)])
    out = better_than_base(runs, {})
    assert out["heldout"] == 1.0 and math.isnan(out["pope"]) and math.isnan(out["chair"])
    assert out["n_recall_collapsed"] == 1  # the table's own flag stands in


# ---------------------------------------------------------------- tuning


def _tuning_table() -> pd.DataFrame:
    """Point B comes first (grid order) and is best on TEST; point A is best on VALIDATION."""
    rows = []
    for seed, (val_a, test_a, val_b, test_b) in enumerate(((0.8, 0.60, 0.60, 0.90),
                                                           (0.7, 0.62, 0.65, 0.88))):
        rows.append(run("B", seed, lr=1e-2, final_val_reward_accuracy=val_b,
                        final_heldout_reward_accuracy=test_b,
                        best_heldout_reward_accuracy=test_b, **{"optim.lr": 1e-2}))
        rows.append(run("A", seed, lr=1e-3, final_val_reward_accuracy=val_a,
                        final_heldout_reward_accuracy=test_a,
                        best_heldout_reward_accuracy=test_a, **{"optim.lr": 1e-3}))
    return pd.DataFrame(rows)


def test_the_tuned_choice_is_picked_on_validation_and_reports_its_test_figures() -> None:
    (choice,) = tuned_choices(_tuning_table())
    assert choice.point == "A" and choice.basis == "validation" and choice.n_candidates == 2
    assert choice.score.mean == pytest.approx(0.75)
    test = choice.test["final_heldout_reward_accuracy"]
    assert test.mean == pytest.approx(0.61) and test.n == 2  # not B's 0.89
    assert 0.60 <= test.low <= test.high <= 0.62
    assert choice.settings["lr"] == 1e-3 and choice.group["epsilon_target"] == 2.0


def test_fixed_settings_default_to_the_first_value_of_every_axis() -> None:
    (first,) = fixed_choices(_tuning_table())
    assert first.point == "B" and first.test["final_heldout_reward_accuracy"].mean == 0.89
    (named,) = fixed_choices(_tuning_table(), TuneSettings(fixed={"optim.lr": 1e-3}))
    assert named.point == "A"
    (by_column,) = fixed_choices(_tuning_table(), TuneSettings(fixed={"train.lr": 1e-3}))
    assert by_column.point == "A"  # an unknown dotted key falls back to its last part


def test_without_a_validation_score_the_fixed_settings_stand_in() -> None:
    table = _tuning_table().drop(columns="final_val_reward_accuracy")
    (choice,) = tuned_choices(table)
    assert choice.point == "B" and choice.basis == "fixed settings"


def test_groups_are_ordered_no_dp_first_then_epsilon_down_and_k_up() -> None:
    rows = [run(f"e{e}-k{k}", 0, epsilon_target=e, k=k,
                mechanism="none" if math.isinf(e) else "dp_sgd")
            for k in (16, 4) for e in (1.0, INF, 8.0)]
    order = [(c.group["epsilon_target"], c.group["k"]) for c in tuned_choices(pd.DataFrame(rows))]
    assert order == [(INF, 4), (INF, 16), (8.0, 4), (8.0, 16), (1.0, 4), (1.0, 16)]


def test_tune_settings_default_when_missing() -> None:
    assert TuneSettings.from_config(None) == TuneSettings()
    assert TuneSettings.from_config({"tune": {"split": "public"}}).split == "public"
    assert TuneSettings().metric == "final_val_reward_accuracy"


def test_recommendation_beats_base_when_the_heldout_ci_is_above_chance() -> None:
    (rec,) = recommendations(_tuning_table(), base=BASE)
    assert rec.tuned.point == "A" and rec.fixed is not None and rec.fixed.point == "B"
    assert rec.beats_base is True and rec.collapse == 0.0
    assert rec.dispersion["final_heldout_reward_accuracy"] == pytest.approx(
        math.sqrt(0.0002))
    assert rec.window.swept == (1e-3, 1e-2) and rec.window.width == pytest.approx(1.0)
