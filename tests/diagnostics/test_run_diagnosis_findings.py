"""The per-run findings (did not move, held-out collapse, silenced) on hand-made rows whose
answers are worked out by hand: the cases of the issue (a DP run that learned nothing, a
non-DP run whose model answers POPE "no") and a healthy run where nothing fires."""

from __future__ import annotations

import math

import pytest

from conftest import STUCK_EVALS, STUCK_METRICS, loss_rows
from dpalign.diagnostics import Thresholds, diagnose_run, ema
from dpalign.diagnostics.run import (
    eval_peak,
    heldout_drop,
    initial_eval,
    movement,
    silenced,
    steps_to_target,
)

# A healthy run: loss falls 0.693 -> ~0.4, margin grows, accuracy peaks at the end.
HEALTHY_METRICS = loss_rows([0.6931 - 0.006 * i for i in range(50)])
HEALTHY_EVALS = [
    {"step": 0, "heldout_reward_accuracy": 0.5, "heldout_reward_margin": 0.0,
     "pope_adversarial_f1": 0.72, "pope_adversarial_yes_ratio": 0.48, "recall": 0.6},
    {"step": 25, "heldout_reward_accuracy": 0.8, "heldout_reward_margin": 0.2},
    {"step": 50, "heldout_reward_accuracy": 0.9, "heldout_reward_margin": 0.5,
     "pope_adversarial_f1": 0.75, "pope_adversarial_yes_ratio": 0.45, "recall": 0.58},
]

# Over-optimised: held-out (and validation) accuracy peak at step 10, then fall.
COLLAPSE_EVALS = [
    {"step": 0, "heldout_reward_accuracy": 0.5, "heldout_reward_margin": 0.0,
     "val_reward_accuracy": 0.5},
    {"step": 10, "heldout_reward_accuracy": 0.91, "heldout_reward_margin": 0.3,
     "val_reward_accuracy": 0.88},
    {"step": 20, "heldout_reward_accuracy": 0.85, "heldout_reward_margin": 0.6,
     "val_reward_accuracy": 0.8},
    {"step": 30, "heldout_reward_accuracy": 0.73, "heldout_reward_margin": 0.9,
     "val_reward_accuracy": 0.7},
]

# world_dpo: the model learns to answer "no": yes-ratio 0.135, F1 0.72 -> 0.25.
SILENT_EVALS = [
    {"step": 0, "heldout_reward_accuracy": 0.5, "heldout_reward_margin": 0.0,
     "pope_adversarial_f1": 0.72, "pope_adversarial_yes_ratio": 0.48, "recall": 0.6},
    {"step": 50, "heldout_reward_accuracy": 0.95, "heldout_reward_margin": 2.0,
     "pope_adversarial_f1": 0.25, "pope_adversarial_yes_ratio": 0.135, "recall": 0.55},
]


# ---------------------------------------------------------------- did not move


def test_world_dp_numbers_did_not_move():
    m = movement(STUCK_METRICS, STUCK_EVALS)
    assert m.moved is False
    assert m.loss_start == pytest.approx(0.6931)
    # a linear trace's trend-started EMA lags by 9 slopes: 0.6921 + 9 * 0.00002
    assert m.loss_end == pytest.approx(0.6931 - 0.00002 * 49 + 9 * 0.00002)
    assert m.loss_end == pytest.approx(float(ema([r["loss"] for r in STUCK_METRICS])[-1]))
    assert m.final_margin == 0.001


def test_a_noise_margin_at_the_target_accuracy_is_not_reaching_the_target():
    assert steps_to_target(STUCK_EVALS) == 50  # the accuracy alone reaches 0.7
    assert steps_to_target(STUCK_EVALS, min_margin=0.01) is None
    d = diagnose_run(STUCK_METRICS, STUCK_EVALS)
    assert d.steps_to_target is None and d.moved is False
    row = d.as_dict()
    assert row["moved"] is False and math.isnan(row["steps_to_target"])
    assert row["loss_start"] == pytest.approx(0.6931)
    assert row["final_heldout_reward_margin"] == 0.001


def test_a_run_moves_when_either_sign_moves_and_only_measured_signs_count():
    # margin is noise but the loss fell 0.3: the run moved (on its training data).
    assert movement(HEALTHY_METRICS, STUCK_EVALS).moved is True
    # loss stuck but the held-out margin is real: moved.
    assert movement(STUCK_METRICS, HEALTHY_EVALS).moved is True
    # no margin logged: the flat loss alone decides.
    assert movement(STUCK_METRICS, []).moved is False
    assert movement(HEALTHY_METRICS, []).moved is True
    # nothing measured (one loss, no evals): nothing says it did not move.
    assert movement(loss_rows([0.69]), []).moved is True
    # a loss that rose far did not stay put.
    assert movement(loss_rows([0.69] * 5 + [5.0] * 5), STUCK_EVALS).moved is True


def test_movement_floors_are_thresholds():
    loose = Thresholds(margin_floor=0.0005, loss_change_floor=0.01)
    assert movement(STUCK_METRICS, STUCK_EVALS, loose).moved is True


# ---------------------------------------------------------------- collapse


def test_collapse_is_the_drop_from_the_peak_to_the_end():
    assert eval_peak(COLLAPSE_EVALS, "heldout_reward_accuracy") == (0.91, 10)
    assert heldout_drop(COLLAPSE_EVALS) == pytest.approx(0.18)
    assert heldout_drop(COLLAPSE_EVALS, "val_reward_accuracy") == pytest.approx(0.18)
    row = diagnose_run(HEALTHY_METRICS, COLLAPSE_EVALS).as_dict()
    assert row["collapsed"] is True
    assert row["heldout_drop"] == pytest.approx(0.18) and row["heldout_best_step"] == 10
    assert row["val_drop"] == pytest.approx(0.18)
    assert row["best_val_reward_accuracy"] == 0.88  # val_ metrics have a best too
    assert row["moved"] is True


def test_a_drop_at_the_threshold_is_not_a_collapse():
    evals = [{"step": 0, "heldout_reward_accuracy": 0.75},
             {"step": 10, "heldout_reward_accuracy": 0.6875}]  # exact in binary: 0.0625
    at = Thresholds(collapse_drop=0.0625)
    d = diagnose_run(HEALTHY_METRICS, evals, thresholds=at)
    assert d.heldout_drop == 0.0625 and d.collapsed is False
    assert diagnose_run(HEALTHY_METRICS, evals).collapsed is True  # default 0.05
    assert math.isnan(d.val_drop)  # no validation part logged


def test_drop_is_zero_at_the_peak_and_nan_when_unmeasured():
    assert heldout_drop(HEALTHY_EVALS) == 0.0
    assert math.isnan(heldout_drop([]))
    assert math.isnan(heldout_drop([{"step": 0, "heldout_reward_accuracy": 0.9},
                                    {"step": 5, "heldout_reward_accuracy": None}]))
    assert eval_peak([], "heldout_reward_accuracy") == (pytest.approx(math.nan, nan_ok=True),
                                                        None)


# ---------------------------------------------------------------- silenced


def test_a_model_answering_no_is_silenced_by_its_yes_ratio():
    s = silenced(SILENT_EVALS)
    assert s.silenced is True and s.one_way is True and s.yes_ratio == 0.135
    assert s.recall_collapsed is None and math.isnan(s.recall_ratio)
    row = diagnose_run(HEALTHY_METRICS, SILENT_EVALS).as_dict()
    assert row["silenced"] is True and row["pope_one_way"] is True
    assert row["initial_pope_adversarial_f1"] == 0.72
    assert row["final_pope_adversarial_f1"] == 0.25
    assert row["moved"] is True and row["collapsed"] is False


@pytest.mark.parametrize(("yes", "fires"), [(0.19, True), (0.2, False), (0.5, False),
                                             (0.8, False), (0.81, True), (0.95, True)])
def test_yes_ratio_band_is_closed(yes: float, fires: bool):
    evals = [{"step": 10, "pope_adversarial_yes_ratio": yes}]
    assert silenced(evals).silenced is fires


def test_caption_recall_below_half_the_base_is_silenced():
    evals = [{"step": 10, "recall": 0.2, "pope_adversarial_yes_ratio": 0.5}]
    s = silenced(evals, base={"recall": 0.6})
    assert s.silenced is True and s.one_way is False
    assert s.recall_ratio == pytest.approx(1 / 3) and s.recall_collapsed is True
    kept = silenced(evals, base={"recall": 0.35})  # 0.2 / 0.35 = 0.57 >= 0.5
    assert kept.silenced is False and kept.recall_collapsed is False
    assert silenced(evals).recall_collapsed is None and silenced(evals).silenced is False
    row = diagnose_run(HEALTHY_METRICS, evals, base={"recall": 0.6, "chair_s": 0.3}).as_dict()
    assert row["silenced"] is True and row["recall_collapsed"] is True
    assert row["base_recall"] == 0.6 and row["base_chair_s"] == 0.3


# ---------------------------------------------------------------- healthy and shape


def test_a_healthy_run_has_no_finding():
    d = diagnose_run(HEALTHY_METRICS, HEALTHY_EVALS, base={"recall": 0.62})
    row = d.as_dict()
    assert row["moved"] is True and row["collapsed"] is False and row["silenced"] is False
    assert row["recall_collapsed"] is False and row["pope_one_way"] is False
    assert row["heldout_drop"] == 0.0 and row["heldout_best_step"] == 50
    assert row["steps_to_target"] == 25
    assert initial_eval(HEALTHY_EVALS)["recall"] == 0.6 and row["initial_recall"] == 0.6


def test_new_columns_are_flat_scalars_and_present_without_evals():
    row = diagnose_run(STUCK_METRICS, []).as_dict()
    for key in ("moved", "loss_start", "loss_end", "collapsed", "heldout_drop",
                "heldout_best_step", "val_drop", "silenced", "pope_one_way", "recall_ratio",
                "recall_collapsed"):
        assert key in row
    assert all(v is None or isinstance(v, bool | int | float | str) for v in row.values())
    assert row["collapsed"] is False and row["silenced"] is False
    assert math.isnan(row["heldout_drop"]) and math.isnan(row["heldout_best_step"])
    assert not any(k.startswith(("initial_", "base_")) for k in row)


@pytest.mark.parametrize("bad", [dict(yes_ratio_low=0.9, yes_ratio_high=0.8),
                                 dict(yes_ratio_high=1.5), dict(margin_floor=-1.0),
                                 dict(collapse_drop=-0.1)])
def test_thresholds_reject_impossible_finding_settings(bad: dict):
    with pytest.raises(ValueError):
        Thresholds(**bad)
