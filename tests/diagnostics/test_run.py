"""Per-run diagnostics against answers worked out by hand (or by an explicit loop that
restates the documented definition)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dpalign.diagnostics import (
    Divergence,
    RunDirError,
    Thresholds,
    best_eval,
    diagnose_run,
    diagnose_run_dir,
    ema,
    final_epsilon,
    final_eval,
    find_divergence,
    kl_drift,
    loss_limit,
    loss_volatility,
    mean_finite,
    steps_to_target,
)


def _metrics(losses: list[float | None], **columns: list) -> list[dict]:
    """Metric rows for steps 1..n with the given losses and extra per-step columns."""
    rows = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    for key, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            row[key] = value
    return rows


def _ema_by_hand(x: list[float], decay: float) -> list[float]:
    """The documented EMA, restated as a plain loop."""
    slope = (x[-1] - x[0]) / (len(x) - 1)
    out = [x[0] - decay / (1 - decay) * slope]
    for value in x[1:]:
        out.append(decay * out[-1] + (1 - decay) * value)
    return out


def _population_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# ---------------------------------------------------------------- smoothing and volatility


def test_ema_of_a_line_is_the_line_lagged_by_decay_over_one_minus_decay_slopes():
    steps = np.arange(1, 201)
    loss = 0.7 - 0.001 * steps
    # lag = decay / (1 - decay) * slope = 9 * (-0.001): the EMA sits 0.009 above the line.
    np.testing.assert_allclose(ema(loss, 0.9), loss + 0.009, atol=1e-12)


def test_smooth_linear_trace_has_zero_volatility_and_does_not_diverge():
    metrics = _metrics([0.7 - 0.001 * step for step in range(1, 201)])
    assert loss_volatility([row["loss"] for row in metrics]) == pytest.approx(0.0, abs=1e-12)
    assert find_divergence(metrics) == Divergence(step=None, reason=None)
    assert not diagnose_run(metrics, []).diverged


def test_volatility_of_a_four_step_oscillation_worked_on_paper():
    # x = [1, -1, 1, -1], decay 0.5: slope b = -2/3, s0 = 1 - 1 * b = 5/3,
    # s = [5/3, 1/3, 2/3, -1/6], d = [-4/3, 1/3, -5/6], mean(d) = -11/18,
    # deviations = [-13, 17, -4] / 18 -> variance = 474 / 972 = 79 / 162.
    np.testing.assert_allclose(ema([1.0, -1.0, 1.0, -1.0], 0.5), [5 / 3, 1 / 3, 2 / 3, -1 / 6])
    assert loss_volatility([1.0, -1.0, 1.0, -1.0], 0.5) == pytest.approx(math.sqrt(79 / 162))


def test_volatility_without_smoothing_is_the_std_of_raw_differences():
    # 0.5 +- 0.1 alternating over 101 steps: 100 differences of +-0.2 with mean 0 -> std 0.2.
    losses = [0.5 + 0.1 * (-1) ** step for step in range(101)]
    assert loss_volatility(losses, decay=0.0) == pytest.approx(0.2)


def test_volatility_of_an_oscillation_matches_the_loop_and_the_steady_state():
    a, decay = 0.05, 0.9
    losses = [0.6 + a * (-1) ** step for step in range(2001)]
    smoothed = _ema_by_hand(losses, decay)
    diffs = [later - earlier for earlier, later in itertools.pairwise(smoothed)]
    assert loss_volatility(losses, decay) == pytest.approx(_population_std(diffs), rel=1e-9)
    # In steady state the EMA swings +-a(1-decay)/(1+decay), so its differences are
    # +-2a(1-decay)/(1+decay); the start-up transient decays as 0.9^t and barely counts.
    assert loss_volatility(losses, decay) == pytest.approx(2 * a * 0.1 / 1.9, rel=1e-2)
    assert loss_volatility(losses, decay) > loss_volatility([0.6 - 1e-4 * s for s in range(2001)])


def test_volatility_ignores_non_finite_and_null_and_needs_three_points():
    assert math.isnan(loss_volatility([0.7, 0.6]))
    assert math.isnan(loss_volatility([0.7, None, float("nan"), float("inf"), 0.6]))
    assert loss_volatility([1.0, None, -1.0, float("nan"), 1.0, -1.0], 0.5) == pytest.approx(
        math.sqrt(79 / 162))


# ---------------------------------------------------------------- divergence


def test_loss_limit_defaults_to_ten_times_first_finite_loss_plus_one():
    assert loss_limit([None, float("nan"), -0.7, 0.5]) == pytest.approx(8.0)
    assert loss_limit([0.7], Thresholds(loss_limit=2.5)) == 2.5
    assert math.isnan(loss_limit([float("inf")]))


def test_diverging_trace_is_caught_at_the_first_non_finite_loss():
    metrics = _metrics([0.7, 0.69, 0.8, 2.0, float("inf"), float("nan")])
    assert find_divergence(metrics) == Divergence(step=5, reason="loss_nonfinite")
    assert find_divergence(_metrics([0.7, 0.6, float("nan")])).step == 3


def test_loss_above_the_limit_diverges_before_it_becomes_infinite():
    # limit = 10 * 0.7 + 1 = 8.0; 7.9 stays below it, 8.5 exceeds it at step 4.
    metrics = _metrics([0.7, 3.0, 7.9, 8.5, float("inf")])
    assert find_divergence(metrics) == Divergence(step=4, reason="loss_above_limit")
    assert find_divergence(metrics, Thresholds(loss_limit=2.0)).step == 2


def test_kl_proxy_above_its_limit_diverges_and_null_values_never_do():
    metrics = _metrics([0.7, None, 0.5, 0.4], kl_proxy=[0.0, None, 21.0, 1.0])
    assert find_divergence(metrics) == Divergence(step=3, reason="kl_above_limit")
    assert not find_divergence(metrics, Thresholds(kl_limit=25.0)).diverged
    assert find_divergence(_metrics([0.7, 0.6], kl_proxy=[0.0, float("nan")])).reason == (
        "kl_nonfinite")


def test_rows_are_put_in_step_order_before_looking_for_divergence():
    metrics = _metrics([0.7, 0.6, float("nan"), 0.5])[::-1]
    assert find_divergence(metrics).step == 3


# ---------------------------------------------------------------- evaluation


EVALS = [
    {"step": 0, "heldout_reward_accuracy": 0.0, "chair_s": 0.5, "pope_random_yes_ratio": 0.6},
    {"step": 10, "heldout_reward_accuracy": 0.5, "chair_s": 0.2, "pope_random_yes_ratio": 0.4},
    {"step": 20, "heldout_reward_accuracy": 0.7, "chair_s": None, "pope_random_yes_ratio": 0.5},
    {"step": 30, "heldout_reward_accuracy": 0.65, "chair_s": 0.3, "pope_random_yes_ratio": 0.55},
]


def test_steps_to_target_is_the_first_eval_step_at_or_above_the_target():
    assert steps_to_target(EVALS) == 20  # 0.7 >= 0.7: reaching the target counts
    assert steps_to_target(EVALS[::-1]) == 20
    assert steps_to_target(EVALS, target=0.6) == 20
    assert steps_to_target(EVALS, target=0.5) == 10


def test_steps_to_target_is_none_when_never_reached():
    assert steps_to_target(EVALS, target=0.71) is None
    assert steps_to_target([{"step": 5, "heldout_reward_accuracy": None}], target=0.0) is None
    assert steps_to_target([]) is None


def test_final_is_the_last_eval_and_best_is_max_for_accuracy_min_for_hallucination():
    assert final_eval(EVALS) == {"heldout_reward_accuracy": 0.65, "chair_s": 0.3,
                                 "pope_random_yes_ratio": 0.55}
    # best chair_s skips the null at step 20; yes-ratio has no "best" direction.
    assert best_eval(EVALS) == {"heldout_reward_accuracy": 0.7, "chair_s": 0.2}


def test_final_eval_takes_each_key_from_the_last_eval_that_logged_it():
    evals = [{"step": 0, "chair_i": 0.3, "recall": 0.9},
             {"step": 10, "recall": float("nan")}]
    final = final_eval(evals)
    assert final["chair_i"] == 0.3
    assert math.isnan(final["recall"])
    assert best_eval(evals) == {"recall": 0.9, "chair_i": 0.3}


# ---------------------------------------------------------------- DP and KL


def test_dp_means_skip_nulls_and_epsilon_is_the_last_logged_value():
    metrics = _metrics([0.7] * 5,
                       dp_clip_fraction=[0.0, 0.5, None, 1.0, None],
                       dp_noise_to_signal=[2.0, None, 4.0, float("nan"), None],
                       epsilon=[None, 1.5, None, 2.5, None])
    assert mean_finite(metrics, "dp_clip_fraction") == pytest.approx(0.5)
    assert mean_finite(metrics, "dp_noise_to_signal") == pytest.approx(3.0)
    assert final_epsilon(metrics) == 2.5
    assert final_epsilon(metrics, {"privacy": {"epsilon": 3.0}}) == 3.0
    assert final_epsilon(metrics, {"privacy": {"epsilon": None}}) == 2.5


def test_non_dp_run_has_nan_dp_means_and_infinite_epsilon():
    metrics = _metrics([0.7, 0.6])
    assert math.isnan(mean_finite(metrics, "dp_clip_fraction"))
    assert final_epsilon(metrics) == math.inf
    assert final_epsilon(metrics, {"privacy": None, "stopped": None}) == math.inf
    # A DP run that never logged epsilon: unknown, not "no guarantee".
    assert math.isnan(final_epsilon(_metrics([0.7], epsilon=[None])))


def test_kl_drift_is_the_mean_of_the_last_ten_logged_values_and_their_max():
    kl = [float(v) for v in range(1, 16)]
    kl[3] = None  # a null is not a step of the tail
    final, peak = kl_drift(_metrics([0.7] * 15, kl_proxy=kl))
    assert final == pytest.approx(np.mean(range(6, 16)))  # 10.5
    assert peak == 15.0
    assert kl_drift(_metrics([0.7] * 3, kl_proxy=[1.0, 2.0, 3.0]), tail=2) == (2.5, 3.0)
    assert all(math.isnan(v) for v in kl_drift(_metrics([0.7, 0.6])))


# ---------------------------------------------------------------- whole runs


def test_diagnose_run_collects_everything_into_flat_scalar_columns():
    metrics = _metrics([0.7, 0.6, 0.5], kl_proxy=[0.0, 0.5, 1.0])
    row = diagnose_run(metrics, EVALS).as_dict()
    assert row["n_steps"] == 3
    assert row["diverged"] is False
    assert math.isnan(row["diverged_step"]) and row["diverged_reason"] is None
    assert row["loss_volatility"] == pytest.approx(0.0, abs=1e-12)
    assert row["steps_to_target"] == 20
    assert row["kl_final"] == pytest.approx(0.5) and row["kl_max"] == 1.0
    assert row["epsilon"] == math.inf
    assert math.isnan(row["mean_clip_fraction"]) and math.isnan(row["mean_noise_to_signal"])
    assert row["final_chair_s"] == 0.3 and row["best_chair_s"] == 0.2
    assert "best_pope_random_yes_ratio" not in row
    assert all(v is None or isinstance(v, bool | int | float | str) for v in row.values())
    never = diagnose_run(metrics, EVALS, thresholds=Thresholds(target_accuracy=0.9))
    assert never.steps_to_target is None and math.isnan(never.as_dict()["steps_to_target"])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_diagnose_run_dir_reads_a_dp_run_directory(tmp_path: Path):
    metrics = _metrics([0.69, 0.68, 0.67, float("nan")],
                       dp_clip_fraction=[0.0, 0.25, None, 0.5],
                       dp_noise_to_signal=[1.0, None, 3.0, 2.0],
                       epsilon=[None, 0.5, None, None])
    _write_jsonl(tmp_path / "metrics.jsonl", metrics)  # json writes the NaN token
    _write_jsonl(tmp_path / "eval.jsonl", EVALS)
    (tmp_path / "result.json").write_text(json.dumps({"privacy": {"epsilon": 0.9},
                                                      "stopped": None}))
    diag = diagnose_run_dir(tmp_path)
    assert diag.divergence == Divergence(step=4, reason="loss_nonfinite")
    assert diag.mean_clip_fraction == pytest.approx(0.25)
    assert diag.mean_noise_to_signal == pytest.approx(2.0)
    assert diag.epsilon == 0.9
    assert diag.steps_to_target == 20
    assert diag.loss_volatility == pytest.approx(0.0, abs=1e-12)  # 0.69, 0.68, 0.67: a line
    (tmp_path / "result.json").unlink()
    (tmp_path / "eval.jsonl").unlink()
    bare = diagnose_run_dir(tmp_path)
    assert bare.epsilon == 0.5 and bare.steps_to_target is None and bare.final_eval == {}


def test_diagnose_run_dir_names_the_file_and_line_of_a_malformed_row(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n\n{"step": 2, "loss": 0.6\n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:3: not valid JSON"):
        diagnose_run_dir(tmp_path)
    path.write_text('{"step": 1, "loss": 0.7}\n[1, 2]\n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:2: expected a JSON object"):
        diagnose_run_dir(tmp_path)
    path.write_text('{"loss": 0.7}\n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:1: .*integer 'step'"):
        diagnose_run_dir(tmp_path)


def test_diagnose_run_dir_without_metrics_names_the_missing_file(tmp_path: Path):
    with pytest.raises(RunDirError, match=r"metrics\.jsonl: file not found"):
        diagnose_run_dir(tmp_path)


def test_thresholds_reject_impossible_settings():
    with pytest.raises(ValueError, match="ema_decay"):
        Thresholds(ema_decay=1.0)
    with pytest.raises(ValueError, match="kl_tail_steps"):
        Thresholds(kl_tail_steps=0)
