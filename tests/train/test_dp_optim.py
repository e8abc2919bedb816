"""DP-AdamBC against hand-computed steps and AdamW, SGD with momentum under DP, and the
clipping modes in real tiny DP runs: adaptive C follows its logged b_t and resumes exactly,
automatic clipping equals g C / (||g|| + gamma) per pair, dpadam_bc receives the noise
variance of each step."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import CrashError, crash_at, without_time
from dpalign.io import read_jsonl
from dpalign.losses.objective import pair_logps
from dpalign.models.pairs import collate
from dpalign.privacy.clipping import next_clip_norm, split_sigma
from dpalign.privacy.sampling import shuffled_batch
from dpalign.train.checkpoint import latest_checkpoint
from dpalign.train.config import TrainConfig
from dpalign.train.loop import Session, TrainResult, initial_state, prepare, train
from dpalign.train.optim import DPAdamBC, adam_bc_update, set_noise_variance
from dpalign.train.state import LoopState

MakeConfig = Callable[..., TrainConfig]  # the make_config fixture (tests/conftest.py)


# --- DP-AdamBC: the update rule -----------------------------------------------------------

def test_adam_bc_update_equals_hand_computed_steps() -> None:
    """Two coordinates, three steps, lr 0.1, betas (0.9, 0.999), wd 0.01, phi 0.02,
    floor 1e-3; gradients (0.3, 0.01), (0.2, -0.02), (-0.1, 0.03). Worked out in plain
    floats: m, v moving averages, bias corrected, v_hat - phi floored (the second coordinate
    always hits the floor: its v_hat ~ 4e-4 < phi), param (1 - lr wd) - lr m_hat / sqrt(.)."""
    lr, b1, b2, wd, phi, floor = 0.1, 0.9, 0.999, 0.01, 0.02, 1e-3
    grads = [(0.3, 0.01), (0.2, -0.02), (-0.1, 0.03)]
    p, m, v = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0]
    tp, tm, tv = (torch.tensor(x, dtype=torch.float64) for x in (p, m, v))
    floored = []
    for t, g in enumerate(grads, start=1):
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            floored.append(v_hat - phi < floor)
            p[i] = p[i] * (1 - lr * wd) - lr * m_hat / math.sqrt(max(v_hat - phi, floor))
        tp, tm, tv = adam_bc_update(tp, torch.tensor(g, dtype=torch.float64), tm, tv, t, lr=lr,
                                    betas=(b1, b2), weight_decay=wd, noise_variance=phi,
                                    eps_floor=floor)
        assert tp.tolist() == pytest.approx(p, rel=1e-14, abs=1e-15)
        assert tm.tolist() == pytest.approx(m, rel=1e-14)
        assert tv.tolist() == pytest.approx(v, rel=1e-14)
    assert floored == [False, True] * 3  # step 1: v_hat = 0.09, so 0.09 - 0.02 is used
    # step 1 by hand: m_hat = g, v_hat = g^2: 1 * 0.999 - 0.1 * 0.3 / sqrt(0.07)
    assert 1.0 * 0.999 - 0.1 * 0.3 / math.sqrt(0.07) == pytest.approx(
        adam_bc_update(torch.tensor([1.0], dtype=torch.float64),
                       torch.tensor([0.3], dtype=torch.float64),
                       torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                       1, lr=lr, betas=(b1, b2), weight_decay=wd, noise_variance=phi,
                       eps_floor=floor)[0].item(), rel=1e-15)


def test_dpadam_bc_with_zero_noise_variance_is_adamw() -> None:
    """phi = 0: 20 steps of DPAdamBC equal torch.optim.AdamW (lr 0.01, wd 0.1) on the same
    gradients to rtol 1e-5: the only difference is AdamW's + eps (1e-8) in the denominator
    against our floor 1e-8 inside the root, ~1e-8 / sqrt(v_hat) relative with gradients
    of size ~0.01-3."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    a = torch.nn.Parameter(init.clone())
    b = torch.nn.Parameter(init.clone())
    ours = DPAdamBC([a], lr=0.01, weight_decay=0.1)
    adamw = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(5, 7, generator=gen, dtype=torch.float64) * torch.linspace(0.01, 3, 7)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        adamw.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-8)
    assert not torch.equal(a.detach(), init)


def test_set_noise_variance_reaches_only_optimizers_that_take_it() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    bc, sgd = DPAdamBC([p]), torch.optim.SGD([p], lr=0.1)
    set_noise_variance(bc, 0.25)
    set_noise_variance(sgd, 0.25)
    assert bc.param_groups[0]["noise_variance"] == 0.25
    assert "noise_variance" not in sgd.param_groups[0]
    with pytest.raises(ValueError, match="noise variance"):
        set_noise_variance(bc, math.nan)


# --- the optimizers in the DP loop --------------------------------------------------------

def _trainable(run: Session) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in run.model.named_parameters() if p.requires_grad}


def _recording(run: Session) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Wrap the run's grad step so each call records its row and the ``.grad`` it set."""
    calls: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
    inner = run.grad_step

    def step(step: int, state: LoopState) -> tuple[dict[str, Any], LoopState]:
        row, after = inner(step, state)
        calls.append((row, {n: p.grad.detach().clone()  # type: ignore[union-attr]
                            for n, p in _trainable(run).items()}))
        return row, after

    run.grad_step = step
    return calls


def _weights(run: Session) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _trainable(run).items()}


ADAPTIVE = {"enabled": True, "noise_multiplier": 1.0, "clipping": "adaptive",
            "count_noise": 1.0, "account_every": 1}


def test_dpadam_bc_gets_each_steps_noise_variance(make_config: MakeConfig,
                                                  tmp_path: Path) -> None:
    """Adaptive clipping (sigma 1, sigma_b 1 -> sigma_g = 0.75^-1/2) with dpadam_bc: each
    step's row carries phi = (sigma_g C_t / B)^2 with C_t that step's clip norm, the
    optimizer's param groups hold it at its update, and the weights after two steps equal
    ``adam_bc_update`` applied by hand to the recorded noisy gradients. The floor is 0.01
    here: at B = 4 phi ~ 0.08, so where v_hat < phi a floor of 1e-8 would divide by 1e-4
    (steps of ~30 per coordinate); the floor must be chosen on the scale of phi."""
    cfg = make_config(data={"heldout": None}, eval={"every": None},
                      optim={"name": "dpadam_bc", "lr": 0.01, "schedule": "constant",
                             "eps_floor": 0.01},
                      privacy=ADAPTIVE)
    run = prepare(cfg, tmp_path / "run")
    calls = _recording(run)
    sigma_g = split_sigma(1.0, 1.0)
    expected = _weights(run)
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in expected.items()}
    state = initial_state()
    for step in (1, 2):
        _, state = run.step(step, state)
        row, grads = calls[-1]
        phi = (sigma_g * row["dp_clip_norm"] / 4) ** 2
        assert row["dp_noise_variance"] == pytest.approx(phi, rel=1e-14)
        assert run.optimizer.param_groups[0]["noise_variance"] == row["dp_noise_variance"]
        for name, g in grads.items():
            m, v = moments[name]
            expected[name], m, v = adam_bc_update(
                expected[name], g, m, v, step, lr=0.01, betas=(0.9, 0.999), weight_decay=0.0,
                noise_variance=row["dp_noise_variance"], eps_floor=0.01)
            moments[name] = (m, v)
    assert calls[1][0]["dp_clip_norm"] != calls[0][0]["dp_clip_norm"]  # C moved
    for name, p in _trainable(run).items():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_sgd_with_momentum_trains_under_dp(make_config: MakeConfig, tmp_path: Path) -> None:
    """optim sgd (momentum 0.9, lr 0.05, constant) under fixed DP clipping: the weights
    after three steps are the momentum recursion buf = 0.9 buf + g, p -= lr buf applied to
    the recorded noisy gradients, and they moved; phi is 0 for SGD (nothing to set)."""
    cfg = make_config(data={"heldout": None}, eval={"every": None},
                      optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
                      privacy={"enabled": True, "noise_multiplier": 0.5})
    run = prepare(cfg, tmp_path / "run")
    calls = _recording(run)
    start = _weights(run)
    expected = dict(start)
    buf: dict[str, torch.Tensor] = {}
    state = initial_state()
    for step in (1, 2, 3):
        _, state = run.step(step, state)
        for name, g in calls[-1][1].items():
            buf[name] = g if step == 1 else 0.9 * buf[name] + g
            expected[name] = expected[name] - 0.05 * buf[name]
    assert calls[0][0]["dp_noise_variance"] == pytest.approx((0.5 * 1.0 / 4) ** 2, rel=1e-14)
    moved = False
    for name, p in _trainable(run).items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-8, msg=name)
        moved = moved or not torch.equal(p.detach(), start[name])
    assert moved


def test_automatic_clipping_step_is_the_scaled_pair_gradients(make_config: MakeConfig,
                                                              tmp_path: Path) -> None:
    """privacy.clipping automatic, sigma 0, C = 0.5, gamma 0.01, fixed batches of 4: the
    DP step's ``.grad`` equals sum_i g_i C / (||g_i|| + gamma) / 4 with each g_i from the
    pair's own autograd (float64 reference; rtol 1e-4 as the existing step tests)."""
    cfg = make_config(data={"heldout": None}, eval={"every": None},
                      privacy={"enabled": True, "noise_multiplier": 0.0, "clipping": "automatic",
                               "max_grad_norm": 0.5, "sampling": "shuffle"})
    run = prepare(cfg, tmp_path / "run")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapters off B = 0 so every gradient is non-zero
        for p in _trainable(run).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    row, _ = run.grad_step(1, initial_state())
    params = _trainable(run)
    got = {n: p.grad.detach().clone() for n, p in params.items()}  # type: ignore[union-attr]
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in shuffled_batch(len(run.units), 4, cfg.train.seed, 0):
        out = run.objective(pair_logps(run.model, collate([run.pairs[i]], run.pad_id)),
                            run.ref.index(slice(i, i + 1)))
        g = dict(zip(params, torch.autograd.grad(out.per_example.sum(), list(params.values())),
                     strict=True))
        norm = math.sqrt(sum(float(x.double().square().sum()) for x in g.values()))
        for n in want:
            want[n] += g[n].double() * (0.5 / (norm + 0.01)) / 4
    assert row["dp_clip_norm"] == 0.5 and "dp_unclipped_estimate" not in row
    for n in want:
        assert want[n].abs().max() > 0, n
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-7, msg=n)


# --- adaptive clipping in whole runs ------------------------------------------------------

@pytest.fixture(scope="module")
def adaptive_finished(make_config: MakeConfig, tmp_path_factory: pytest.TempPathFactory
                      ) -> tuple[TrainConfig, TrainResult]:
    """6 uninterrupted adaptive DP steps (sigma 1, sigma_b 1, C_0 = 1, gamma 0.5, eta 0.2,
    Poisson q = 4/16) with dpadam_bc, checkpoints every 2."""
    cfg = make_config(privacy=ADAPTIVE, optim={"name": "dpadam_bc", "lr": 0.01,
                                                "eps_floor": 0.01})
    return cfg, train(cfg, tmp_path_factory.mktemp("adaptive") / "whole")


def test_adaptive_run_logs_clip_norms_that_follow_the_update_rule(
        adaptive_finished: tuple[TrainConfig, TrainResult]) -> None:
    """C_1 = privacy.max_grad_norm; C_{t+1} = C_t exp(-0.2 (b_t - 0.5)) from the logged
    dp_unclipped_estimate b_t, exactly (the same float operations); phi = (sigma_g C_t / 4)^2;
    privacy.json reports sigma 1, grad_sigma and count_sigma; result.json the C after step 6;
    epsilon is that of sigma = 1 (the run's ledger records sigma)."""
    cfg, whole = adaptive_finished
    rows = read_jsonl(whole.out / "metrics.jsonl")
    assert rows[0]["dp_clip_norm"] == 1.0
    assert all(math.isfinite(r["loss"]) for r in rows if r["loss"] is not None)
    for a, b in itertools.pairwise(rows):
        assert b["dp_clip_norm"] == next_clip_norm(a["dp_clip_norm"], a["dp_unclipped_estimate"],
                                                   0.5, 0.2)
    sigma_g = split_sigma(1.0, 1.0)
    assert sigma_g == pytest.approx(2 / math.sqrt(3), rel=1e-14)
    for r in rows:
        assert r["dp_noise_variance"] == pytest.approx((sigma_g * r["dp_clip_norm"] / 4) ** 2,
                                                       rel=1e-14)
        assert -2 < r["dp_unclipped_estimate"] < 3  # (count - U/2 + N(0,1)) / 4 + 1/2
    assert len({r["dp_clip_norm"] for r in rows}) == 6
    plan = json.loads((whole.out / "privacy.json").read_text())
    assert plan["sigma"] == 1.0 and plan["count_sigma"] == 1.0
    assert plan["grad_sigma"] == sigma_g and plan["clipping"] == "adaptive"
    summary = json.loads((whole.out / "result.json").read_text())["privacy"]
    assert summary["final_clip_norm"] == next_clip_norm(
        rows[-1]["dp_clip_norm"], rows[-1]["dp_unclipped_estimate"], 0.5, 0.2)
    fixed = train(cfg.model_copy(update={"privacy": cfg.privacy.model_copy(
        update={"clipping": "fixed"})}), whole.out.parent / "fixed")
    assert [r["epsilon"] for r in read_jsonl(fixed.out / "metrics.jsonl")] == [
        r["epsilon"] for r in rows]


def test_adaptive_resume_equals_the_uninterrupted_run(
        adaptive_finished: tuple[TrainConfig, TrainResult], tmp_path: Path) -> None:
    """Crash inside step 5: the step-4 checkpoint's state holds C_5 (the clip norm the
    uninterrupted run used at step 5); the resumed run's metrics, evaluations and final
    weights equal the uninterrupted run's bit for bit."""
    cfg, whole = adaptive_finished
    out = tmp_path / "crashed"
    with pytest.raises(CrashError):
        train(cfg, out, on_step=crash_at(5))
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None and ck.step == 4
    rows = read_jsonl(whole.out / "metrics.jsonl")
    assert ck.state.clip_norm == rows[4]["dp_clip_norm"]
    assert json.loads((ck.path / "state.json").read_text())["clip_norm"] == ck.state.clip_norm

    train(cfg, out, resume=True)
    assert without_time(read_jsonl(out / "metrics.jsonl")) == without_time(rows)
    assert read_jsonl(out / "eval.jsonl") == read_jsonl(whole.out / "eval.jsonl")
    final = load_file(str(out / "final" / "model.safetensors"))
    expected = load_file(str(whole.out / "final" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


def test_loop_state_without_clip_norm_reads_as_before() -> None:
    """A checkpoint state from before adaptive clipping (no clip_norm key) loads with None,
    and a state without one writes the same object as before."""
    old = {"dama_running_mean": 0.25, "ledger": LoopState().ledger.to_json()}
    state = LoopState.from_dict(old)
    assert state.clip_norm is None and state.loss_state == 0.25
    assert state.to_dict() == old
    assert LoopState.from_dict(LoopState(None, clip_norm=0.3).to_dict()).clip_norm == 0.3


def test_automatic_clipping_run(make_config: MakeConfig, tmp_path: Path) -> None:
    """A whole automatic-clipping run: every row logs C = max_grad_norm, no b_t, and
    phi = (sigma C / B)^2 = (0.8 * 0.5 / 4)^2; privacy.json names the rule."""
    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 0.8,
                               "clipping": "automatic", "max_grad_norm": 0.5})
    result = train(cfg, tmp_path / "run")
    rows = read_jsonl(result.out / "metrics.jsonl")
    assert result.steps == 6 and len(rows) == 6
    assert all(r["dp_clip_norm"] == 0.5 and "dp_unclipped_estimate" not in r for r in rows)
    assert all(r["dp_noise_variance"] == pytest.approx(0.01, rel=1e-14) for r in rows)
    plan = json.loads((result.out / "privacy.json").read_text())
    assert plan["clipping"] == "automatic" and plan["grad_sigma"] == 0.8
    assert plan["count_sigma"] is None
