"""DP-SGD in the trainer: the real step against plain autograd references, user-level units,
an exact ledger across resume (checked with ``dp_accounting`` directly), calibration to a
target epsilon, seeded versus OS-entropy noise, and label-DP in the run record."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CrashError, crash_at, pld_epsilon, without_time
from dpalign.data.fewshot import few_shot
from dpalign.data.records import read_preference_jsonl
from dpalign.io import read_jsonl
from dpalign.losses.objective import pair_logps
from dpalign.models.pairs import collate
from dpalign.privacy.accounting import Ledger, epsilon
from dpalign.privacy.config import PrivacyConfig
from dpalign.privacy.plan import SECURE_NOTICE, SEEDED_NOTICE, plan_privacy, privacy_units
from dpalign.privacy.sampling import poisson_batch, shuffled_batch
from dpalign.train.checkpoint import latest_checkpoint
from dpalign.train.config import TrainConfig
from dpalign.train.dp_step import DPStep
from dpalign.train.loop import Session, TrainResult, initial_state, prepare, train
from dpalign.world.load import World

MakeConfig = Callable[..., TrainConfig]  # the make_config fixture (tests/conftest.py)
DELTA = 1e-5


def _trainable(run: Session) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in run.model.named_parameters() if p.requires_grad}


def _perturb(run: Session) -> None:
    """Move the adapters off B = 0 (policy == reference), so that every parameter, lora_A
    included, has a non-zero gradient and the comparisons below are not about zeros."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in _trainable(run).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _dp_step(run: Session, step: int = 1) -> dict[str, Any]:
    """The run's ``DPStep`` (as ``Session.step`` calls it) on a fresh ledger; the state it
    was given stays as it was, the one it returns holds one step."""
    state = initial_state()
    assert isinstance(run.grad_step, DPStep)
    row, after = run.grad_step(step, state)
    assert state.ledger.steps == 0 and after.ledger.steps == 1
    return row


def _pair_grad(run: Session, i: int) -> dict[str, torch.Tensor]:
    """d loss_i / d theta of pair ``i`` alone: its own forward, its own autograd.grad."""
    params = _trainable(run)
    out = run.objective(pair_logps(run.model, collate([run.pairs[i]], run.pad_id)),
                        run.ref.index(slice(i, i + 1)))
    grads = torch.autograd.grad(out.per_example.sum(), list(params.values()))
    return dict(zip(params, grads, strict=True))


def _clip_reference(unit_grads: list[dict[str, torch.Tensor]], c: float,
                    expected_batch: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """sum over units of (unit grad scaled to norm <= C) / B, and the pre-clip norms."""
    norms = [math.sqrt(sum(float(g.double().pow(2).sum()) for g in u.values()))
             for u in unit_grads]
    total = {name: sum(u[name].double() * min(1.0, c / n) for u, n in
                       zip(unit_grads, norms, strict=True)) / expected_batch
             for name in unit_grads[0]}
    return total, norms  # type: ignore[return-value]


def _grads(run: Session) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in _trainable(run).items()}  # type: ignore[union-attr]


# --- the step against references -----------------------------------------------------------

@pytest.mark.parametrize("engine", ["hooks", "loop"])
def test_sigma0_cinf_step_is_the_plain_mean_gradient(make_config: MakeConfig, tmp_path: Path,
                                                     engine: str) -> None:
    """DESIGN §4: with sigma = 0 and C = inf the DP step is a non-DP step. The trainer's
    step-1 ``.grad`` (fixed-size batch of B = 4 pairs) equals the plain backward of
    objective(pair_logps(batch)).per_example.mean() on the same pairs."""
    cfg = make_config(data={"heldout": None}, eval={"every": None},
                      privacy={"enabled": True, "noise_multiplier": 0.0,
                               "max_grad_norm": math.inf, "sampling": "shuffle",
                               "engine": engine})
    run = prepare(cfg, tmp_path / "run")
    _perturb(run)
    row = _dp_step(run)
    got = _grads(run)

    idx = shuffled_batch(len(run.units), 4, cfg.train.seed, 0)
    params = _trainable(run)
    loss = run.objective(pair_logps(run.model, collate([run.pairs[i] for i in idx], run.pad_id)),
                         run.ref.index(torch.tensor(idx))).per_example.mean()
    expected = torch.autograd.grad(loss, list(params.values()))
    assert row["pairs"] == 4 and row["dp_units"] == 4 and row["dp_clip_fraction"] == 0.0
    assert row["dp_noise_to_signal"] == 0.0
    assert row["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    for name, want in zip(params, expected, strict=True):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_tiny_clip_norm_clips_every_pair_and_divides_by_expected_batch(
        make_config: MakeConfig, tmp_path: Path) -> None:
    """C = 1e-4, sigma = 0, Poisson sampling (q = 4/16): ``.grad`` equals the sum over the
    sampled pairs of each pair's own gradient (one pair per forward) scaled to norm C,
    divided by the EXPECTED batch 4 (the step-1 Poisson batch holds 6 pairs), and every pair
    was clipped. The pre-clip norm diagnostics match the reference norms."""
    c = 1e-4
    cfg = make_config(data={"heldout": None}, eval={"every": None},
                      privacy={"enabled": True, "noise_multiplier": 0.0, "max_grad_norm": c})
    run = prepare(cfg, tmp_path / "run")
    _perturb(run)
    row = _dp_step(run)
    got = _grads(run)

    idx = poisson_batch(16, 0.25, cfg.train.seed, 0)
    assert len(idx) == 6  # != 4: dividing by the actual batch would fail below
    want, norms = _clip_reference([_pair_grad(run, i) for i in idx], c, 4.0)
    assert min(norms) > 100 * c
    assert row["pairs"] == 6 and row["dp_units"] == 6 and row["dp_clip_fraction"] == 1.0
    assert row["dp_norm_max"] == pytest.approx(max(norms), rel=1e-4)
    # quantiles as the step defines them (linear interpolation), from the one-pair norms
    for key, q in (("dp_norm_p10", 0.1), ("dp_norm_p50", 0.5), ("dp_norm_p90", 0.9)):
        assert row[key] == pytest.approx(float(np.quantile(norms, q)), rel=1e-4), key
    for name, g in got.items():
        torch.testing.assert_close(g.double(), want[name], rtol=1e-4, atol=1e-10, msg=name)
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in got.values()))
    assert total <= 6 * c / 4 * (1 + 1e-5)


# --- user-level DP -------------------------------------------------------------------------

def test_user_units_group_pairs_by_user_id(make_config: MakeConfig, small_world: Path,
                                           tmp_path: Path) -> None:
    """privacy.unit=user: the session's units are the (shuffled, k = None) pool's pairs
    grouped by metadata.user_id (order of first appearance), and the step clips each sampled USER's
    summed gradient to C as one vector (B = 4 users, fixed-size sampling)."""
    c = 1e-4
    cfg = make_config(data={"heldout": None, "k": None}, eval={"every": None},
                      privacy={"enabled": True, "unit": "user", "noise_multiplier": 0.0,
                               "max_grad_norm": c, "sampling": "shuffle", "engine": "hooks"})
    records = few_shot(read_preference_jsonl(World.load(small_world).pool_file), None, 0)
    users = [r.user_id for r in records]
    assert all(users)
    hand: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        hand.setdefault(str(user), []).append(i)

    run = prepare(cfg, tmp_path / "run")
    assert [p.id for p in run.pairs] == [r.id for r in records]
    assert run.units == list(hand.values())
    assert run.plan is not None and run.plan.n_units == len(hand)
    assert run.plan.sample_rate == pytest.approx(4 / len(hand))
    assert privacy_units(run.pairs, users, "example") == [[i] for i in range(len(records))]

    _perturb(run)
    row = _dp_step(run)
    got = _grads(run)
    sampled = shuffled_batch(len(hand), 4, cfg.train.seed, 0)
    members = [run.units[u] for u in sampled]
    assert max(len(m) for m in members) >= 2  # grouping is not the identity here
    per_user = []
    for m in members:
        pair_grads = [_pair_grad(run, i) for i in m]
        per_user.append({k: sum(g[k] for g in pair_grads) for k in pair_grads[0]})
    want, _ = _clip_reference(per_user, c, 4.0)  # type: ignore[arg-type]
    assert row["dp_units"] == 4 and row["pairs"] == sum(len(m) for m in members)
    assert row["dp_clip_fraction"] == 1.0
    for name, g in got.items():
        torch.testing.assert_close(g.double(), want[name], rtol=1e-4, atol=1e-10, msg=name)


def test_user_unit_without_user_id_is_refused_naming_the_record(make_config: MakeConfig,
                                                                 small_world: Path) -> None:
    """A record without metadata.user_id under privacy.unit=user: ValueError naming it."""
    records = few_shot(read_preference_jsonl(World.load(small_world).pool_file), 16, 0)
    users: list[str | None] = [r.user_id for r in records]
    users[5] = None
    with pytest.raises(ValueError, match="user_id") as info:
        privacy_units(records, users, "user")  # type: ignore[arg-type]
    assert repr(records[5].id) in str(info.value)
    assert privacy_units(records, users, "example")[5] == [5]  # pair-level needs no user


# --- the ledger across resume --------------------------------------------------------------

def _pld_reference(sigma: float, q: float, steps: int) -> float:
    """epsilon at DELTA of ``steps`` Poisson-subsampled Gaussian steps, by dp_accounting."""
    return pld_epsilon(sigma, q, steps, DELTA)


DP_RUN = {"privacy": {"enabled": True, "noise_multiplier": 1.0, "account_every": 1}}


@pytest.fixture(scope="module")
def dp_finished(make_config: MakeConfig, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[TrainConfig, TrainResult]:
    """6 uninterrupted DP steps (sigma 1, Poisson q = 4/16, C = 1), checkpoints every 2."""
    cfg = make_config(**DP_RUN)
    return cfg, train(cfg, tmp_path_factory.mktemp("dp") / "whole")


def test_dp_resume_keeps_the_ledger_exact(dp_finished: tuple[TrainConfig, TrainResult],
                                          tmp_path: Path) -> None:
    """Crash inside step 5 (after the step-4 checkpoint, whose state holds a 4-step ledger),
    resume: metrics (noise diagnostics and epsilon included), evaluations and final weights
    equal the uninterrupted run's; epsilon after t steps is dp_accounting's PLD epsilon of
    t Poisson(q = 0.25) Gaussian(sigma = 1) steps, and result.json reports the 6-step one."""
    cfg, whole = dp_finished
    out = tmp_path / "crashed"

    with pytest.raises(CrashError):
        train(cfg, out, on_step=crash_at(5))
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None and ck.step == 4
    assert ck.state.ledger == Ledger().record(1.0, 0.25, 4)

    train(cfg, out, resume=True)
    rows = read_jsonl(out / "metrics.jsonl")
    assert without_time(rows) == without_time(read_jsonl(whole.out / "metrics.jsonl"))
    assert read_jsonl(out / "eval.jsonl") == read_jsonl(whole.out / "eval.jsonl")
    final = load_file(str(out / "final" / "model.safetensors"))
    expected = load_file(str(whole.out / "final" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name

    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["epsilon"] == pytest.approx(_pld_reference(1.0, 0.25, r["step"]), rel=1e-9)
    assert all(a["epsilon"] < b["epsilon"] for a, b in itertools.pairwise(rows))
    summary = json.loads((out / "result.json").read_text())
    eps6 = summary["privacy"]["epsilon"]
    assert eps6 == epsilon((1.0, 0.25, 6), DELTA, "pld")
    assert eps6 == pytest.approx(_pld_reference(1.0, 0.25, 6), rel=1e-9)
    assert epsilon((1.0, 0.25, 6), DELTA, "rdp") >= eps6  # RDP is the looser bound
    assert summary["privacy"]["steps_taken"] == 6 and summary["stopped"] is None
    plan = json.loads((out / "privacy.json").read_text())
    assert {k: plan[k] for k in ("sigma", "sample_rate", "units", "budget_steps")} == {
        "sigma": 1.0, "sample_rate": 0.25, "units": 16, "budget_steps": 6}
    assert {k: summary["privacy"][k] for k in plan} == plan


# --- target epsilon ------------------------------------------------------------------------

def test_target_epsilon_calibrates_sigma_and_is_met(make_config: MakeConfig,
                                                    tmp_path: Path) -> None:
    """privacy.target_epsilon = 2: sigma in privacy.json is the smallest that keeps the 6
    planned Poisson(q = 0.25) steps within 2 by dp_accounting's PLD (a 0.1% smaller sigma
    exceeds it), the run takes all 6 steps without a stop, and its final epsilon is just
    below 2.

    With a calibrated sigma ``budget_steps`` equals the planned steps, so the budget stop
    is exercised with a fixed sigma below; budget_steps is the LARGEST step count within the
    target (T + 1 steps of the calibrated sigma exceed it)."""
    target = 2.0
    cfg = make_config(data={"heldout": None}, eval={"every": None}, checkpoint={"every": None},
                      privacy={"enabled": True, "target_epsilon": target,
                               "account_every": 3})
    result = train(cfg, tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "privacy.json").read_text())
    sigma = plan["sigma"]
    assert plan["target_epsilon"] == target and plan["budget_steps"] == 6
    assert _pld_reference(sigma, 0.25, 6) <= target < _pld_reference(sigma * 0.999, 0.25, 6)
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["stopped"] is None and summary["privacy"]["steps_taken"] == 6
    assert target - 0.01 < summary["privacy"]["epsilon"] <= target
    assert [r["epsilon"] is not None for r in read_jsonl(result.out / "metrics.jsonl")] == [
        False, False, True, False, False, True]

    direct = plan_privacy(cfg.privacy, 16, 4, 6)
    assert direct.sigma == sigma and direct.budget_steps == 6
    assert _pld_reference(sigma, 0.25, 7) > target  # a 7th step would exceed: budget is tight


def test_plan_budget_for_a_target_reached_by_a_known_sigma() -> None:
    """Target = epsilon of 10 steps at sigma 1.2 (q = 0.1): the plan for 10 steps calibrates
    sigma ~1.2 and allows exactly 10 steps; a DP config needs a sigma or a target."""
    target = _pld_reference(1.2, 0.1, 10)
    cfg = PrivacyConfig(enabled=True, target_epsilon=target)
    plan = plan_privacy(cfg, n_units=40, batch_size=4, steps=10)
    assert plan.sample_rate == pytest.approx(0.1) and plan.expected_batch == 4.0
    assert plan.sigma == pytest.approx(1.2, abs=1e-3) and plan.budget_steps == 10
    with pytest.raises(ValueError, match="exceeds the 3 privacy units"):
        plan_privacy(cfg, n_units=3, batch_size=4, steps=10)
    with pytest.raises(ValueError, match=r"give privacy\.noise_multiplier"):
        PrivacyConfig(enabled=True)


def test_fixed_sigma_stops_before_the_target_is_exceeded(make_config: MakeConfig,
                                                         tmp_path: Path) -> None:
    """noise_multiplier 1 and target_epsilon = epsilon of 4 steps (PLD, q = 0.25): the run
    plans 6 steps, takes 4, says why it stopped, and spends at most the target."""
    target = _pld_reference(1.0, 0.25, 4) * 1.0001
    cfg = make_config(data={"heldout": None}, eval={"every": None},
                      checkpoint={"every": 2},
                      privacy={"enabled": True, "noise_multiplier": 1.0,
                               "target_epsilon": target, "account_every": 1})
    result = train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["stopped"].startswith("stopped before step 5")
    assert summary["privacy"]["steps_taken"] == 4 and summary["privacy"]["budget_steps"] == 4
    assert summary["privacy"]["epsilon"] == pytest.approx(_pld_reference(1.0, 0.25, 4),
                                                          rel=1e-9)
    assert summary["privacy"]["epsilon"] <= target < _pld_reference(1.0, 0.25, 5)
    assert [r["step"] for r in read_jsonl(result.out / "metrics.jsonl")] == [1, 2, 3, 4]


# --- noise seeding -------------------------------------------------------------------------

def _short(make_config: MakeConfig, **privacy: Any) -> TrainConfig:
    return make_config(data={"heldout": None}, train={"steps": 2}, eval={"every": None},
                       checkpoint={"every": None},
                       privacy={"enabled": True, "noise_multiplier": 1.0, **privacy})


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_noise_is_seeded_per_step(make_config: MakeConfig, tmp_path: Path) -> None:
    """Seeded noise: the same config twice gives identical metrics and weights; another
    privacy.noise_seed draws the same batches (same step-1 loss, same pairs) but other
    noise, so other weights. privacy.json says the seeded noise is NOT for deployment."""
    cfg = _short(make_config)
    a, b = (train(cfg, tmp_path / name).out for name in ("a", "b"))
    other = train(_short(make_config, noise_seed=1), tmp_path / "other").out
    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert without_time(rows_a) == without_time(rows_b)
    assert _same_weights(_weights(a), _weights(b))
    first, first_other = read_jsonl(a / "metrics.jsonl")[0], read_jsonl(other / "metrics.jsonl")[0]
    assert first["loss"] == first_other["loss"] and first["pairs"] == first_other["pairs"]
    assert not _same_weights(_weights(a), _weights(other))
    notice = json.loads((a / "privacy.json").read_text())["noise"]
    assert notice == SEEDED_NOTICE and "NOT for deployment" in notice


def test_secure_noise_is_not_reproducible(make_config: MakeConfig, tmp_path: Path) -> None:
    """privacy.secure_noise=true: privacy.json carries the OS-entropy notice and two runs of
    the same config end with different weights (same batches, other noise)."""
    cfg = _short(make_config, secure_noise=True)
    a, b = (train(cfg, tmp_path / name).out for name in ("a", "b"))
    notice = json.loads((a / "privacy.json").read_text())["noise"]
    assert notice == SECURE_NOTICE and "OS entropy" in notice
    assert read_jsonl(a / "metrics.jsonl")[0]["loss"] == read_jsonl(b / "metrics.jsonl")[0]["loss"]
    assert not _same_weights(_weights(a), _weights(b))


# --- label-DP ------------------------------------------------------------------------------

def test_label_dp_is_reported(make_config: MakeConfig, tmp_path: Path) -> None:
    """privacy.label_epsilon without DP-SGD: result.json's privacy block holds the label
    epsilon, the flip rate 1 / (1 + e^eps) and the label-level guarantee, and no DP-SGD
    figures; no privacy.json is written."""
    eps = 1.5
    cfg = make_config(data={"heldout": None}, train={"steps": 1}, eval={"every": None},
                      checkpoint={"every": None},
                      loss={"name": "robust", "params": {"flip_rate": 1 / (1 + math.exp(eps))}},
                      privacy={"label_epsilon": eps})
    train(cfg, tmp_path / "run")
    privacy = json.loads((tmp_path / "run" / "result.json").read_text())["privacy"]
    assert privacy["label_epsilon"] == eps
    assert privacy["label_flip_rate"] == pytest.approx(1 / (1 + math.exp(eps)), rel=1e-12)
    assert "label-level" in privacy["label_guarantee"]
    assert "epsilon" not in privacy and "sigma" not in privacy
    assert not (tmp_path / "run" / "privacy.json").exists()


def test_label_dp_sets_the_robust_loss_flip_rate() -> None:
    """With label-DP and loss robust, the loss's known flip rate is 1 / (1 + e^eps) unless
    given; an explicit flip_rate is kept; other losses are left alone."""
    base = {"model": "m", "data": {"train": "t.jsonl"}, "privacy": {"label_epsilon": 1.5}}
    cfg = TrainConfig.model_validate({**base, "loss": {"name": "robust"}})
    assert cfg.loss.params["flip_rate"] == pytest.approx(1 / (1 + math.exp(1.5)))
    kept = TrainConfig.model_validate({**base, "loss": {"name": "robust",
                                                        "params": {"flip_rate": 0.3}}})
    assert kept.loss.params["flip_rate"] == 0.3
    assert TrainConfig.model_validate({**base, "loss": {"name": "dpo"}}).loss.params == {}
