"""RL under DP (``method: rloo | grpo``): advantages and the loss against hand-computed values,
the per-prompt DP gradient against a one-prompt autograd loop, the composition of the reward
model's and the policy's privacy against ``dp_accounting`` run directly, and a resumed RL run
against an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from PIL import Image

from conftest import CrashError, MakeConfig, crash_at, without_time
from dpalign.data.records import read_preference_jsonl
from dpalign.io import read_jsonl
from dpalign.models.load import load_model
from dpalign.privacy.accounting import Ledger
from dpalign.privacy.per_pair import make_engine
from dpalign.rl.advantages import grpo_advantages, kl_shaped, rl_loss, rloo_advantages
from dpalign.rl.config import RewardConfig
from dpalign.rl.privacy import CompositionError, check_disjoint, composed
from dpalign.rl.reward import RewardModel, write_reward_info
from dpalign.rl.rollout import Rollout, _rows, as_units, rollout_loss
from dpalign.train.checkpoint import latest_checkpoint
from dpalign.train.config import TrainConfig
from dpalign.train.loop import prepare, train
from dpalign.train.rl_step import RLDPStep, RLPlainStep
from dpalign.world.load import World

RM_LEDGER = Ledger().record(1.1, 0.2, 5)
RM_PRIVACY = {"enabled": True, "delta": 1e-5, "accountant": "pld", "unit": "example"}


# --- advantages and the loss: hand-computed values -----------------------------------------

def test_rloo_advantages_by_hand() -> None:
    """r = (1, 2, 3, 6): A_j = r_j - mean of the other three = (1 - 11/3, 2 - 10/3, 3 - 3,
    6 - 2); they sum to 0."""
    adv = rloo_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-8 / 3, -4 / 3, 0.0, 4.0]]))
    assert abs(float(adv.sum())) < 1e-6


def test_grpo_advantages_by_hand() -> None:
    """r = (1, 2, 3, 6): mean 3, Bessel std sqrt(14/3) = 2.16025; a group of equal rewards
    gives zeros (not NaN)."""
    adv = grpo_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]), eps=1e-4)
    std = math.sqrt(14 / 3) + 1e-4
    torch.testing.assert_close(adv[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / std)
    assert torch.equal(adv[1], torch.zeros(4))


def test_rl_loss_value_and_gradient_by_hand() -> None:
    """One prompt, k = 2: rewards (1, 0), log pi (-2, -4) over (2, 4) tokens, log ref
    (-2.5, -3), kl_beta 0.5. Shaped rewards 1 - 0.5 * 0.5 = 0.75 and 0 - 0.5 * (-1) = 0.5.
    RLOO: A = (0.25, -0.25); loss = -(0.25 * -2 - 0.25 * -4) / 2 = -0.25; d loss / d log pi
    = -A / k = (-0.125, 0.125). GRPO: deviations +-0.125 from the mean, Bessel std
    sqrt(0.03125) = 0.176777, A = +-0.125 / (0.176777 + eps) = +-0.70671; loss =
    -(0.70671 * -2 / 2 - 0.70671 * -4 / 4) / 2 = 0; gradient -A / (k T) = (-0.17668,
    0.08834)."""
    rewards = torch.tensor([[1.0, 0.0]])
    tokens = torch.tensor([[2.0, 4.0]])
    ref = torch.tensor([[-2.5, -3.0]])
    torch.testing.assert_close(kl_shaped(rewards, torch.tensor([[-2.0, -4.0]]), ref, 0.5),
                               torch.tensor([[0.75, 0.5]]))
    logp = torch.tensor([[-2.0, -4.0]], requires_grad=True)
    out = rl_loss("rloo", rewards, logp, tokens, ref, kl_beta=0.5)
    torch.testing.assert_close(out.per_unit, torch.tensor([-0.25]))
    (grad,) = torch.autograd.grad(out.per_unit.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([[-0.125, 0.125]]))
    out = rl_loss("grpo", rewards, logp, tokens, ref, kl_beta=0.5, eps=1e-4)
    a = 0.125 / (math.sqrt(0.03125) + 1e-4)
    torch.testing.assert_close(out.advantages, torch.tensor([[a, -a]]))
    torch.testing.assert_close(out.per_unit, torch.tensor([0.0]), atol=1e-7, rtol=0)
    (grad,) = torch.autograd.grad(out.per_unit.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([[-a / 4, a / 8]]))


def test_a_prompts_loss_depends_on_its_own_samples_only() -> None:
    """Changing prompt 1's rewards leaves prompt 0's loss as it was (its privacy unit)."""
    logp, tokens, ref = torch.randn(2, 3), torch.ones(2, 3), torch.randn(2, 3)
    rewards = torch.randn(2, 3)
    other = rewards.clone()
    other[1] += torch.tensor([5.0, -3.0, 1.0])
    for method in ("rloo", "grpo"):
        a = rl_loss(method, rewards, logp, tokens, ref, kl_beta=0.1).per_unit
        b = rl_loss(method, other, logp, tokens, ref, kl_beta=0.1).per_unit
        assert a[0] == b[0] and a[1] != b[1]


# --- the per-prompt DP gradient --------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
               small_world: Path) -> Path:
    """A reward model on the tiny model with a seeded random head (shown the objects), its
    'training' ledger RM_LEDGER on the small world's held-out records."""
    loaded = load_model(tiny_model)
    model = RewardModel(loaded.model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen))
    folder = tmp_path_factory.mktemp("reward") / "final"
    model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    held = read_preference_jsonl(World.load(small_world).heldout_file)
    write_reward_info(folder, RewardConfig(enabled=True, facts="objects"),
                      ledger=RM_LEDGER.to_json(), privacy=RM_PRIVACY, records=held,
                      hidden=model.head.in_features)
    return folder


def _rl(make_config: MakeConfig, reward_dir: Path, method: str = "rloo",
        **sections: object) -> TrainConfig:
    return make_config(**{"method": method,
                          "rl": {"reward_model": str(reward_dir), "kl_beta": 0.1},
                          "online": {"samples": 3, "sampling": {"max_new_tokens": 8}},
                          **sections})


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_prompt_gradients_equal_a_one_prompt_loop(make_config: MakeConfig, reward_dir: Path,
                                                  tmp_path: Path, method: str) -> None:
    """The DP step's per-prompt gradients (hooks engine: one forward and backward over all
    k U rows) equal, for each prompt, autograd of that prompt's loss over its k answers
    alone; and so do the loop engine's. float64, so the two orders of summation agree to
    1e-9. Adapters are perturbed so that no gradient is trivially zero."""
    cfg = _rl(make_config, reward_dir, method,
              privacy={"enabled": True, "noise_multiplier": 1.0}, train={"steps": 2})
    run = prepare(cfg, tmp_path / "run")
    step = run.grad_step
    assert isinstance(step, RLDPStep) and step.rollouts is not None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in step.engine.params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    rollout = step.rollouts(1, [0, 1, 2, 3])
    assert rollout.rewards.shape == (4, 3) and float(rollout.rewards.std()) > 0
    run.model.double()
    rollout = Rollout(rollout.tokens, rollout.images.to("cpu", torch.float64),
                      rollout.images_per_row, rollout.rewards.double(), rollout.judge.double(),
                      rollout.ref.double(), rollout.texts)
    loss = rollout_loss(run.model, method, cfg.rl.kl_beta, cfg.rl.advantage_eps)
    params = list(step.engine.params.values())
    hooks, out = step.engine.units(rollout, loss)
    loop, _ = make_engine("loop", run.model, step.engine.params).units(rollout, loss)
    for i in range(rollout.n_units):
        one = loss(rollout.unit(i))
        torch.testing.assert_close(one.per_example, out.per_example[i:i + 1], atol=1e-9,
                                   rtol=0)
        expected = torch.autograd.grad(one.per_example.sum(), params, allow_unused=True)
        for (name, _), e in zip(step.engine.params.items(), expected, strict=True):
            e = torch.zeros_like(hooks[name][i]) if e is None else e
            torch.testing.assert_close(hooks[name][i], e, atol=1e-9, rtol=0, msg=name)
            torch.testing.assert_close(loop[name][i], e, atol=1e-9, rtol=0, msg=name)
    assert max(float(g.abs().max()) for g in hooks.values()) > 0


def test_rollout_rows_rewards_and_reference(make_config: MakeConfig, reward_dir: Path,
                                            tmp_path: Path) -> None:
    """Row j U + i holds prompt i's answer j; the rewards are the reward model's scores of
    those answers under the facts prompt; the reference log-probs are the base model's (the
    policy at step 0); the judge's scores are the world judge's."""
    from dpalign.online.judge import WorldJudge
    from dpalign.rl.reward import load_reward_model, with_facts

    cfg = _rl(make_config, reward_dir, train={"steps": 1})
    run = prepare(cfg, tmp_path / "run")
    step = run.grad_step
    assert isinstance(step, RLPlainStep)
    records = [run.records[i] for i in (2, 5)]
    rollout = step.rollouts(1, [2, 5])
    tok = run.processor.tokenizer
    for j in range(3):
        for i in range(2):
            row = rollout.tokens.input_ids[j * 2 + i]
            labels = rollout.tokens.labels[j * 2 + i]
            text = tok.decode(row[labels >= 0], skip_special_tokens=True)
            assert text.strip() == rollout.texts[i][j].strip()
    rm = load_reward_model(reward_dir)
    seen = [with_facts(r, rm.facts) for r in records]
    pictures = [[Image.open(p).convert("RGB") for p in r.images] for r in records]
    rows = _rows(rm.processor, [r.prompt for r in seen], pictures, rollout.texts,
                 rm.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = as_units(rm.model.scores(*rows), 3)
        logp = as_units(rollout_policy_logps(run.model, rollout), 3)
    torch.testing.assert_close(rollout.rewards, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollout.ref, logp, atol=1e-4, rtol=1e-5)
    judge = WorldJudge()
    assert rollout.judge.tolist() == [judge(r, t) for r, t in zip(records, rollout.texts,
                                                                  strict=True)]


def rollout_policy_logps(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    from dpalign.models.logprobs import sequence_logps

    return sequence_logps(model, rollout.tokens, rollout.images, rollout.images_per_row).total


# --- privacy: composition ------------------------------------------------------------------

def _pld(ledgers: list[tuple[float, float, int]], delta: float) -> float:
    acc = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, 1e-4)
    for sigma, q, steps in ledgers:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    steps)
    return float(acc.get_epsilon(delta))


def test_composition_against_dp_accounting() -> None:
    """Sequential: the accountant over both mechanisms (PLD, run directly); parallel: the
    larger of the two epsilons; a reward model without DP makes the total infinite; the
    sequential total is below the sum of the two epsilons (the accountant composes tightly)."""
    info = {"ledger": json.loads(RM_LEDGER.to_json()), "privacy": RM_PRIVACY}
    policy = Ledger().record(0.9, 0.25, 12)
    seq = composed(policy, info, "sequential", 1e-5)
    eps_rm, eps_policy = _pld([(1.1, 0.2, 5)], 1e-5), _pld([(0.9, 0.25, 12)], 1e-5)
    assert seq["reward_model"]["epsilon"] == pytest.approx(eps_rm, rel=1e-9)
    assert seq["total_epsilon"] == pytest.approx(
        _pld([(1.1, 0.2, 5), (0.9, 0.25, 12)], 1e-5), rel=1e-9)
    assert max(eps_rm, eps_policy) < seq["total_epsilon"] < eps_rm + eps_policy
    par = composed(policy, info, "parallel", 1e-5)
    assert par["total_epsilon"] == pytest.approx(max(eps_rm, eps_policy), rel=1e-9)
    no_dp = {**info, "privacy": {**RM_PRIVACY, "enabled": False}}
    assert composed(policy, no_dp, "sequential", 1e-5)["total_epsilon"] == math.inf
    assert composed(None, info, "parallel", 1e-5)["total_epsilon"] == math.inf


def test_parallel_composition_needs_disjoint_data(small_world: Path) -> None:
    """A shared record id or image file refuses parallel composition, naming it."""
    world = World.load(small_world)
    pool = read_preference_jsonl(world.pool_file)
    held = read_preference_jsonl(world.heldout_file)
    info = {"train_ids": [r.id for r in held],
            "train_images": sorted({str(Path(p).resolve()) for r in held for p in r.images})}
    check_disjoint(info, pool)
    with pytest.raises(CompositionError, match=repr(held[0].id)):
        check_disjoint(info, [*pool, held[0]])


# --- runs ----------------------------------------------------------------------------------

def test_dp_rl_run_resumes_exactly_and_composes_its_privacy(make_config: MakeConfig,
                                                            reward_dir: Path,
                                                            tmp_path: Path) -> None:
    """Crash in step 3 of a DP GRPO run, resume from the step-2 checkpoint: the regenerated
    answers, metrics and final weights equal the uninterrupted run's; the ledger is the
    plan's (q = 4/16, sigma 1, 4 steps) and privacy.json's total is the sequential
    composition with the reward model's ledger, as dp_accounting computes it."""
    cfg = _rl(make_config, reward_dir, "grpo",
              privacy={"enabled": True, "noise_multiplier": 1.0, "account_every": 1},
              train={"steps": 4}, checkpoint={"every": 2, "keep": 2}, eval={"every": None},
              data={"heldout": None})
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(CrashError):
        train(cfg, tmp_path / "crashed", on_step=crash_at(3))
    train(cfg, tmp_path / "crashed", resume=True)
    rows = read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    assert without_time(rows) == without_time(read_jsonl(whole.out / "metrics.jsonl"))
    assert any(r["rl_prompts"] for r in rows)
    for r in rows:  # loss: the objective's value, minus the mean KL-shaped reward
        if r["rl_prompts"]:
            assert r["loss"] == pytest.approx(-(r["rl_reward"] - 0.1 * r["rl_kl"]), abs=1e-6)
    first = next(r for r in rows if r["rl_prompts"])
    # adapters start at B = 0: at step 1 the policy is the reference, up to the rounding of
    # two batch layouts (~1e-8 relative on a log-prob of tens of nats)
    assert first["step"] != 1 or abs(first["rl_kl"]) < 1e-5
    from safetensors.torch import load_file
    final = load_file(str(tmp_path / "crashed" / "final" / "model.safetensors"))
    for name, tensor in load_file(str(whole.out / "final" / "model.safetensors")).items():
        assert torch.equal(final[name], tensor), name
    ck = latest_checkpoint(whole.out / "checkpoints")
    assert ck is not None and ck.state.ledger == Ledger().record(1.0, 0.25, 4)
    privacy = json.loads((whole.out / "privacy.json").read_text())
    assert privacy["composition"] == "sequential"
    assert privacy["epsilon"] == pytest.approx(_pld([(1.0, 0.25, 4)], 1e-5), rel=1e-9)
    assert privacy["total_epsilon"] == pytest.approx(
        _pld([(1.1, 0.2, 5), (1.0, 0.25, 4)], 1e-5), rel=1e-9)
    result = json.loads((whole.out / "result.json").read_text())
    assert result["privacy"] == privacy


def test_rl_config_errors(make_config: MakeConfig, reward_dir: Path) -> None:
    """RL needs a reward model and LoRA; bradley_terry is refused for a policy."""
    with pytest.raises(ValueError, match=r"rl\.reward_model"):
        make_config(method="rloo")
    with pytest.raises(ValueError, match=r"lora\.enabled"):
        _rl(make_config, reward_dir, lora={"enabled": False})
    with pytest.raises(ValueError, match="dpalign reward train"):
        make_config(loss={"name": "bradley_terry"})
