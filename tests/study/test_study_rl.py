"""Per-run RL figures (``dpalign.study.rl``) worked out by hand on made-up step logs: finals
over the last 10% of logged steps, least-squares slopes, the hacking rule (reward model up,
judge down, by the trend test) and entropy collapse; NaN for runs other than RL. Their wiring
into ``runs.parquet`` rows, and the rl / reward presets."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from dpalign.study import expand, load_study, preset_path, train_config
from dpalign.study.grid import Point
from dpalign.study.online import online_figures
from dpalign.study.rl import RL_COLUMNS, rl_figures, rl_privacy
from dpalign.study.store import points_table, run_row
from dpalign.train.config import TrainConfig

STEPS = 20
EMPTY = 7
"""The step on which Poisson sampling drew no prompt: every rl_* is null there."""


def _log(reward, judge, entropy, *, steps: int = STEPS, empty: int | None = EMPTY
         ) -> list[dict[str, Any]]:
    """A DP RL run's step log: the given closed forms of the step, kl = 0.01 step."""
    rows = []
    for step in range(1, steps + 1):
        row: dict[str, Any] = {"step": step, "loss": 0.5, "lr": 1e-3, "step_seconds": 0.1,
                               "epsilon": None, "dp_clip_fraction": 0.3,
                               "online_seconds": 0.05}
        if step == empty:
            row |= {"rl_prompts": 0, "rl_samples": 0, **dict.fromkeys(
                ("rl_reward", "rl_reward_std", "rl_judge", "rl_kl", "rl_entropy",
                 "rl_length", "rl_advantage_std"))}
        else:
            row |= {"rl_prompts": 4, "rl_samples": 16, "rl_reward": reward(step),
                    "rl_reward_std": 0.1, "rl_judge": judge(step), "rl_kl": 0.01 * step,
                    "rl_entropy": entropy(step), "rl_length": 12.0, "rl_advantage_std": 1.0}
        rows.append(row)
    return rows


HACKED = _log(lambda s: 0.1 * s, lambda s: 1 - 0.02 * s, lambda s: 2.0 - 0.09 * s)
HONEST = _log(lambda s: 0.1 * s, lambda s: 0.2 + 0.01 * s, lambda s: 1.5)


def test_finals_are_the_last_tenth_of_the_logged_steps() -> None:
    """19 logged steps (step 7 sampled nothing): the last ceil(1.9) = 2 are steps 19, 20."""
    out = rl_figures(HACKED)
    assert set(out) == set(RL_COLUMNS)
    assert out["rl_reward_final"] == pytest.approx((1.9 + 2.0) / 2)
    assert out["rl_judge_final"] == pytest.approx((0.62 + 0.60) / 2)
    assert out["rl_kl_final"] == pytest.approx((0.19 + 0.20) / 2)
    assert out["rl_entropy_final"] == pytest.approx((0.29 + 0.20) / 2)
    # start: steps 1, 2 -> (1.91 + 1.82) / 2
    assert out["rl_entropy_ratio"] == pytest.approx(0.245 / 1.865)


def test_slopes_are_least_squares_per_step() -> None:
    out = rl_figures(HACKED)
    assert out["rl_reward_slope"] == pytest.approx(0.1)
    assert out["rl_judge_slope"] == pytest.approx(-0.02)
    # (1, 1), (2, 3), (4, 4): dx = (-4, -1, 5) / 3, dy = (-5, 1, 4) / 3;
    # slope = sum dx dy / sum dx^2 = (39 / 9) / (42 / 9) = 13 / 14
    noisy = [{"step": s, "rl_prompts": 1, "rl_reward": r, "rl_judge": 0.0}
             for s, r in ((1, 1.0), (2, 3.0), (4, 4.0))]
    assert rl_figures(noisy)["rl_reward_slope"] == pytest.approx(13 / 14)


def test_reward_up_and_judge_down_is_hacking() -> None:
    assert rl_figures(HACKED)["rl_hacking"] == 1.0


def test_both_up_is_not_hacking() -> None:
    out = rl_figures(HONEST)
    assert out["rl_hacking"] == 0.0
    assert out["rl_reward_slope"] == pytest.approx(0.1)
    assert out["rl_judge_slope"] == pytest.approx(0.01)


def test_a_flat_reward_with_a_falling_judge_is_not_hacking() -> None:
    """The reward model's score only wobbles (first and last blocks' CIs overlap)."""
    flat = _log(lambda s: 1.0 + 0.1 * (s % 2), lambda s: 1 - 0.02 * s, lambda s: 1.0)
    assert rl_figures(flat)["rl_hacking"] == 0.0


def test_entropy_collapse_is_a_ratio_below_one_half() -> None:
    assert rl_figures(HACKED)["rl_entropy_collapse"] == 1.0  # 0.245 / 1.865 = 0.13
    assert rl_figures(HONEST)["rl_entropy_ratio"] == pytest.approx(1.0)
    assert rl_figures(HONEST)["rl_entropy_collapse"] == 0.0
    # 1.0 at the start, 0.6 at the end: ratio 0.6, not collapsed
    mild = _log(lambda s: 0.1, lambda s: 0.1, lambda s: 1.0 if s <= 10 else 0.6)
    assert rl_figures(mild)["rl_entropy_ratio"] == pytest.approx(0.6)
    assert rl_figures(mild)["rl_entropy_collapse"] == 0.0


def test_few_steps_leave_hacking_unmeasured() -> None:
    """3 logged steps: finals over one step; fewer than two trend blocks of two steps."""
    short = _log(lambda s: s, lambda s: -s, lambda s: 4.0 - s, steps=3, empty=None)
    out = rl_figures(short)
    assert (out["rl_reward_final"], out["rl_judge_final"]) == (3.0, -3.0)
    assert out["rl_entropy_ratio"] == pytest.approx(1.0 / 3.0)
    assert math.isnan(out["rl_hacking"])


def test_a_resumed_step_counts_once_its_last_row() -> None:
    rows = [*HACKED[:19], {**HACKED[19], "rl_reward": 99.0}, HACKED[19]]
    assert rl_figures(rows)["rl_reward_final"] == pytest.approx(1.95)


def test_runs_other_than_rl_are_nan() -> None:
    dpo = [{"step": s, "loss": 0.6, "kl_proxy": 0.01} for s in range(1, 11)]
    online = [{"step": s, "loss": 0.6, "online_prompts": 4, "online_pairs": 3,
               "online_seconds": 0.1, "online_score_best": 0.5} for s in range(1, 11)]
    for rows in (dpo, online, []):
        assert all(math.isnan(v) for v in rl_figures(rows).values())
    assert all(math.isnan(v) for v in rl_privacy({"privacy": None}).values())
    assert all(math.isnan(v) for v in rl_privacy({"privacy": {"epsilon": 7.9}}).values())


def test_rl_runs_count_their_generation_seconds() -> None:
    out = online_figures(HACKED)
    assert out["online_seconds"] == pytest.approx(0.05 * STEPS)
    assert math.isnan(out["online_pair_yield"]) and math.isnan(out["online_score_best_final"])
    assert math.isnan(online_figures([{"step": 1, "loss": 0.6}])["online_seconds"])


def _result(total: float) -> dict[str, Any]:
    return {"wall_seconds": 12.0, "privacy": {
        "accountant": "pld", "delta": 1e-5, "sigma": 1.2, "epsilon": 7.9, "unit": "example",
        "reward_model": {"epsilon": 4.0, "delta": 1e-5, "path": "runs/demo/reward/final"},
        "composition": "sequential", "total_epsilon": total}}


def test_privacy_columns_come_from_result_json() -> None:
    assert rl_privacy(_result(11.9)) == {"total_epsilon": 11.9, "reward_model_epsilon": 4.0}


def _config(tmp_path: Path, **extra: Any) -> TrainConfig:
    return TrainConfig.model_validate({
        "model": tmp_path / "model", "data": {"train": tmp_path / "pool.jsonl", "k": 8},
        "lora": {"enabled": True}, **extra})


def _run_dir(path: Path, metrics: list[dict[str, Any]], result: dict[str, Any]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (path / "result.json").write_text(json.dumps(result))
    return path


def test_runs_table_rows_carry_the_rl_figures(tmp_path: Path) -> None:
    rloo = Point("dp_sgd", 8.0, 8, "dpo", None, 0, (), "rloo")
    config = _config(tmp_path, method="rloo", rl={"reward_model": tmp_path / "rm"})
    row = run_row(rloo, _run_dir(tmp_path / "runs" / rloo.name, HACKED, _result(11.9)), config)
    assert row["status"] == "ok" and row["method"] == "rloo"
    assert row["reward_model_run"] is False
    assert {k: row[k] for k in RL_COLUMNS} == pytest.approx(rl_figures(HACKED))
    assert (row["total_epsilon"], row["reward_model_epsilon"], row["epsilon"]) == (
        11.9, 4.0, 7.9)
    assert row["online_seconds"] == pytest.approx(0.05 * STEPS)
    # a reward-model run: flagged, no RL figures
    reward = Point("dp_sgd", 8.0, 8, "bradley_terry", None, 0)
    rm_config = _config(tmp_path, reward={"enabled": True}, loss={"name": "bradley_terry"})
    rm_row = run_row(reward, _run_dir(tmp_path / "runs" / reward.name,
                                      [{"step": 1, "loss": 0.69}],
                                      {"privacy": {"sigma": 1.0, "epsilon": 7.5}}), rm_config)
    assert rm_row["reward_model_run"] is True
    assert all(math.isnan(rm_row[k]) for k in (*RL_COLUMNS, "total_epsilon"))
    # the flag is carried to points.parquet like a grid column, the figures aggregated
    import pandas as pd

    points = points_table(pd.DataFrame([row, rm_row]))
    assert points.set_index("point")["reward_model_run"].to_dict() == {
        rloo.point: False, reward.point: True}
    assert points.set_index("point").loc[rloo.point, "rl_hacking_mean"] == 1.0


# --- presets -------------------------------------------------------------------------------

def test_rl_preset_compares_offline_dpo_with_rloo_and_grpo(small_world: Path) -> None:
    study = load_study(preset_path("rl"), [f"world={small_world}"])
    points = expand(study)
    assert len(points) == 3 * 3 * 3
    assert {p.point for p in points if p.mechanism == "dp_sgd"} == {
        f"dp_sgd-eps{e}-k64-dpo{m}" for e in (8, 1) for m in ("", "-rloo", "-grpo")}
    config = train_config(study, next(p for p in points if p.method == "grpo"))
    assert (config.method, config.online.samples, config.online.sampling.max_new_tokens,
            config.train.steps, config.train.batch_size, config.eval.every) == (
        "grpo", 4, 40, 30, 16, 10)
    assert (str(config.rl.reward_model), config.rl.kl_beta) == ("runs/demo/reward/final", 0.05)


def test_reward_preset_is_a_grid_of_reward_models(small_world: Path) -> None:
    study = load_study(preset_path("reward"), [f"world={small_world}"])
    points = expand(study)
    assert len(points) == 3 * 3
    assert {p.point for p in points} == {
        "none-epsinf-k128-bradley_terry", "dp_sgd-eps8-k128-bradley_terry",
        "dp_sgd-eps1-k128-bradley_terry"}
    configs = [train_config(study, p) for p in points]
    assert all(c.reward.enabled and c.reward.facts == "objects" and c.method == "offline"
               and c.loss.name == "bradley_terry" and c.eval.world is False
               and c.train.steps == 30 and c.train.batch_size == 16 for c in configs)
