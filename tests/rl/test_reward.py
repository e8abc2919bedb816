"""The reward model: Bradley-Terry values and gradients worked out by hand, ties and the
Wilson interval, the score read at the last attended token (both paddings, every tiny
family), per-pair DP gradients against a one-pair-at-a-time loop, the zero head, the saved
folder, factual augmentation, and a short DP reward run (held-out accuracy = ``evaluate_reward``
of the saved model, resume = uninterrupted, the ledger's epsilon)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoModelForImageTextToText

from conftest import CrashError, MakeConfig, crash_at, without_time
from dpalign.data.fewshot import few_shot
from dpalign.data.records import read_preference_jsonl, write_preference_jsonl
from dpalign.data.schema import PreferenceRecord
from dpalign.io import read_jsonl
from dpalign.losses import LOSSES
from dpalign.losses.base import PairLogps
from dpalign.losses.config import LossConfig
from dpalign.losses.objective import Objective, pair_logps
from dpalign.models.load import load_model
from dpalign.models.logprobs import forward_inputs
from dpalign.models.lora import LoraConfig
from dpalign.models.pairs import EncodedPair, collate, encode_pairs
from dpalign.privacy.accounting import Ledger, epsilon
from dpalign.privacy.per_pair import per_pair_grads
from dpalign.rl.config import RewardConfig
from dpalign.rl.reward import (
    HEAD_FILE,
    FactsError,
    LoadedReward,
    RewardModel,
    load_reward_model,
    reward_trainable,
    with_facts,
    write_reward_info,
    zero_reference,
)
from dpalign.rl.reward_eval import RewardEval, evaluate_reward, pair_outcomes
from dpalign.train.config import TrainConfig
from dpalign.train.loop import TrainResult, train
from dpalign.world.load import World

BT = Objective.from_config(LossConfig(name="bradley_terry"))
GRAD_ATOL = 1e-10  # float64 per-pair gradients vs the loop (as tests/privacy/test_per_pair)
# float32 scores of one row in two layouts / recomputed by hand differ by rounding only:
# measured <= 2.5e-7 of the largest |score| (~3e-6 at |r| ~ 14); 1e-5 of it is 40x that.
SCORE_RTOL = 1e-5
REWARD = {"enabled": True, "facts": "objects"}
DP = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "account_every": 1}


@pytest.fixture(scope="module")
def records(small_world: Path) -> list[PreferenceRecord]:
    return read_preference_jsonl(World.load(small_world).pool_file)


def _pad(processor: object) -> int:
    return int(processor.tokenizer.pad_token_id)  # type: ignore[attr-defined]


def _rewards(chosen: list[float], rejected: list[float], *, grad: bool = False) -> PairLogps:
    w = torch.tensor(chosen, dtype=torch.float64, requires_grad=grad)
    r = torch.tensor(rejected, dtype=torch.float64, requires_grad=grad)
    ones = torch.ones(len(chosen), dtype=torch.float64)
    return PairLogps(w, r, ones, ones)


# --- the loss and the accuracy --------------------------------------------------------------

def test_bradley_terry_values_and_gradients_by_hand() -> None:
    """L = -log s(r_w - r_l) = log(1 + e^-(r_w - r_l)); dL/dr_w = -s(r_l - r_w) = -dL/dr_l.
    (1.5, 0.5): log(1 + e^-1) = 0.313262, -s(-1) = -0.268941; (0, 0): log 2, -1/2;
    (-2, 1): log(1 + e^3) = 3.048587, -s(3) = -0.952574. Registered; beta plays no part."""
    assert "bradley_terry" in LOSSES
    policy = _rewards([1.5, 0.0, -2.0], [0.5, 0.0, 1.0], grad=True)
    out = BT(policy, zero_reference(3))
    expected = torch.tensor([0.31326169, 0.69314718, 3.04858735], dtype=torch.float64)
    torch.testing.assert_close(out.per_example, expected, atol=1e-8, rtol=0)
    d_w, d_l = torch.autograd.grad(out.per_example.sum(), [policy.chosen, policy.rejected])
    torch.testing.assert_close(d_w, torch.tensor([-0.26894142, -0.5, -0.95257413],
                                                 dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(d_l, -d_w, atol=0, rtol=0)
    other_beta = Objective.from_config(LossConfig(name="bradley_terry", beta=3.0))
    assert torch.equal(other_beta(policy, zero_reference(3)).per_example, out.per_example)
    # metrics: the rewards themselves; the (0, 0) pair is a tie and counts 0
    assert out.metrics["reward_accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert out.metrics["reward_margin"].tolist() == [1.0, 0.0, -3.0]


def test_ties_accuracy_and_wilson_interval() -> None:
    """A margin within 1e-5 of |r_w| + |r_l| is a tie and counts as wrong. 4 pairs: right,
    tie (margin 5e-6 <= 1e-5 * 2), right by 1e-4, wrong -> accuracy 2/4, ties 1; the 95 %
    Wilson interval for 2 of 4 (z = 1.959964): (k + z^2/2)/(n + z^2) -+
    z/(n + z^2) sqrt(k(n-k)/n + z^2/4) = 0.5 -+ 0.4006 = [0.150, 0.850]."""
    chosen = torch.tensor([2.0, 1.0, 1.0, -1.0])
    rejected = torch.tensor([1.0, 1.0 + 5e-6, 1.0 - 1e-4, 0.5])
    correct, tie = pair_outcomes(chosen, rejected)
    assert correct.tolist() == [True, False, True, False]
    assert tie.tolist() == [False, True, False, False]
    result = RewardEval(["a", "b", "c", "d"], chosen, rejected)
    assert (result.n, result.ties, result.accuracy) == (4, 1, 0.5)
    z, n, k = 1.959963984540054, 4, 2
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    assert result.ci == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert result.ci == pytest.approx((0.15003, 0.84997), abs=1e-5)
    assert result.mean_margin == pytest.approx((1.0 - 5e-6 + 1e-4 - 1.5) / 4, abs=1e-7)
    rows = result.rows()
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert rows[0] == {"id": "a", "reward_chosen": 2.0, "reward_rejected": 1.0, "margin": 1.0,
                       "correct": True}


# --- the score --------------------------------------------------------------------------------

def _by_hand(model: RewardModel, batch: object) -> Tensor:
    """w . h + b at each row's last attended position, found by a plain loop over the mask,
    from the backbone's own ``output_hidden_states``."""
    inputs = forward_inputs(model.backbone, batch.tokens, batch.images)  # type: ignore[attr-defined]
    hidden = model.backbone(**inputs, output_hidden_states=True).hidden_states[-1]
    mask = inputs["attention_mask"]
    w, b = model.head.weight[0].double(), float(model.head.bias[0])
    values = []
    for i in range(mask.shape[0]):
        last = max(j for j in range(mask.shape[1]) if mask[i, j])
        values.append(float(hidden[i, last].double() @ w) + b)
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "idefics3"])
def test_scores_read_the_last_attended_token(family_dirs: dict[str, Path],
                                             records: list[PreferenceRecord],
                                             family: str) -> None:
    """``scores`` = the head applied by hand to the last layer's hidden state at each row's
    last attended token, with right and with left padding; the same rows in the two
    layouts agree (all within SCORE_RTOL of the largest |score|)."""
    vlm = load_model(family_dirs[family])
    model = RewardModel(vlm.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen))
        model.head.bias.fill_(0.25)
    pairs = encode_pairs(records[:2], vlm.processor)
    right = collate(pairs, _pad(vlm.processor), side="right")
    left = collate(pairs, _pad(vlm.processor), side="left")
    assert not torch.equal(right.tokens.attention_mask, left.tokens.attention_mask)
    with torch.no_grad():
        got = {side: model.scores(b.tokens, b.images, b.images_per_row)
               for side, b in (("right", right), ("left", left))}
        hand = {"right": _by_hand(model, right), "left": _by_hand(model, left)}
    atol = SCORE_RTOL * float(hand["right"].abs().max())
    assert atol > 1e-5  # the head is not ~0: the check has teeth
    for side in ("right", "left"):
        torch.testing.assert_close(got[side], hand[side], atol=atol, rtol=0, msg=side)
    torch.testing.assert_close(got["left"], got["right"], atol=atol, rtol=0)
    pair = model.score_pairs(right)
    assert torch.equal(pair.chosen, got["right"][:2]) and torch.equal(pair.rejected,
                                                                      got["right"][2:])
    assert pair.chosen_tokens.tolist() == [1.0, 1.0]


# --- per-pair DP gradients ---------------------------------------------------------------------

def _trainable_reward(tiny_model: Path) -> tuple[nn.Module, object, dict[str, nn.Parameter]]:
    """A LoRA reward model in float64, LoRA A/B and the head perturbed off their start."""
    vlm = load_model(tiny_model)
    model = reward_trainable(RewardModel(vlm.model), LoraConfig()).double().train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in params and "head.bias" not in params  # the bias cancels: frozen
    assert all("lora_" in n for n in params if not n.startswith("head."))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in params.items():
            scale = 0.5 if name.startswith("head.") else 0.05
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model, vlm.processor, params


def _one_at_a_time(model: nn.Module, pairs: list[EncodedPair], pad_id: int,
                   params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    rows = []
    for pair in pairs:
        one = collate([pair], pad_id)
        loss = BT(pair_logps(model, one), zero_reference(1)).per_example.sum()
        rows.append(torch.autograd.grad(loss, list(params.values())))
    return {name: torch.stack([r[k] for r in rows]) for k, name in enumerate(params)}


@pytest.mark.parametrize("engine", ["hooks", "loop"])
def test_per_pair_grads_equal_one_at_a_time(tiny_model: Path, records: list[PreferenceRecord],
                                            engine: str) -> None:
    """Each pair's gradient (LoRA + head; 4 pairs of different lengths in one padded batch)
    equals autograd of that pair alone, to GRAD_ATOL in float64; every trainable parameter
    gets a non-zero gradient."""
    model, processor, params = _trainable_reward(tiny_model)
    pairs = encode_pairs(records[:4], processor)
    assert len({len(p.prompt) + len(p.chosen) for p in pairs}) > 1
    batch = collate(pairs, _pad(processor))
    got, out = per_pair_grads(model, batch, zero_reference(4), BT, params=params, engine=engine)
    expected = _one_at_a_time(model, pairs, _pad(processor), params)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=GRAD_ATOL, rtol=0, msg=name)
        assert float(g.abs().max()) > 1e-6, name
    with torch.no_grad():
        plain = BT(pair_logps(model, batch), zero_reference(4)).per_example
    torch.testing.assert_close(out.per_example, plain, atol=GRAD_ATOL, rtol=0)


# --- the untrained model, the saved folder ------------------------------------------------

def test_zero_head_ties_every_pair(tiny_model: Path, records: list[PreferenceRecord]) -> None:
    """The untrained reward model scores every answer 0: every pair a tie, accuracy 0,
    margin 0, loss log 2 per pair."""
    vlm = load_model(tiny_model)
    model = RewardModel(vlm.model)
    loaded = LoadedReward(model, vlm.processor, RewardConfig(), {}, tiny_model)
    result = evaluate_reward(loaded, records[:6], batch_size=4)
    assert (result.n, result.ties, result.accuracy, result.mean_margin) == (6, 6, 0.0, 0.0)
    assert result.ci[0] == 0.0
    with torch.no_grad():
        losses = BT(model.score_pairs(collate(encode_pairs(records[:6], vlm.processor),
                                              _pad(vlm.processor))),
                    zero_reference(6)).per_example
    torch.testing.assert_close(losses, torch.full((6,), math.log(2.0)), atol=1e-7, rtol=0)


def test_save_and_load_round_trip(tiny_model: Path, records: list[PreferenceRecord],
                                  tmp_path: Path) -> None:
    """A LoRA reward model saved (adapters merged) and read back by ``load_reward_model``
    scores the pairs as before (within SCORE_RTOL: merging rounds); its facts setting
    comes back from reward.json; the folder's backbone loads with transformers alone,
    with no adapter weights in it."""
    vlm = load_model(tiny_model)
    model = reward_trainable(RewardModel(vlm.model), LoraConfig())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    facts = RewardConfig(enabled=True, facts="objects")
    batch = collate(encode_pairs([with_facts(r, facts) for r in records[:4]], vlm.processor),
                    _pad(vlm.processor))
    with torch.no_grad():
        before = model.score_pairs(batch)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    write_reward_info(folder, facts, ledger=Ledger().to_json(), privacy={"enabled": False},
                      records=records[:4], hidden=model.head.in_features)

    loaded = load_reward_model(folder)
    assert loaded.facts.facts == "objects" and loaded.info["train_ids"] == [
        r.id for r in records[:4]]
    with torch.no_grad():
        after = loaded.model.score_pairs(batch)
    atol = SCORE_RTOL * float(before.chosen.abs().max())
    torch.testing.assert_close(after.chosen, before.chosen, atol=atol, rtol=0)
    torch.testing.assert_close(after.rejected, before.rejected, atol=atol, rtol=0)
    head = load_file(str(folder / HEAD_FILE))
    assert head["weight"].shape == (1, model.head.in_features) and head["bias"].shape == (1,)

    plain = AutoModelForImageTextToText.from_pretrained(folder)
    state = plain.state_dict()
    assert not any("lora" in k for k in load_file(str(folder / "model.safetensors")))
    for name, tensor in loaded.model.backbone.state_dict().items():
        assert torch.equal(state[name], tensor), name


# --- factual augmentation ---------------------------------------------------------------------

RECORD = PreferenceRecord.model_validate({
    "id": "r1", "images": ["a.png"], "prompt": "Describe the image.",
    "chosen": "A dog and a red ball.", "rejected": "A cat.",
    "metadata": {"objects": ["dog", "red ball"], "caption": "A dog with a red ball."}})


def test_with_facts_text() -> None:
    objects = with_facts(RECORD, RewardConfig(enabled=True, facts="objects"))
    assert objects.prompt == "Describe the image.\nFacts: the image shows dog, red ball."
    field = with_facts(RECORD, RewardConfig(enabled=True, facts="field", facts_field="caption"))
    assert field.prompt == "Describe the image.\nFacts: A dog with a red ball."
    assert (objects.chosen, objects.rejected, objects.id) == (RECORD.chosen, RECORD.rejected,
                                                              "r1")
    assert with_facts(RECORD, RewardConfig(enabled=True)) is RECORD


def test_missing_facts_name_the_record() -> None:
    bare = RECORD.model_copy(update={"id": "r2", "metadata": RECORD.metadata.model_copy(
        update={"objects": []})})
    with pytest.raises(FactsError, match=r"record 'r2'.*metadata\.objects"):
        with_facts(bare, RewardConfig(enabled=True, facts="objects"))
    with pytest.raises(FactsError, match=r"record 'r1'.*metadata\.summary"):
        with_facts(RECORD, RewardConfig(enabled=True, facts="field", facts_field="summary"))


def test_trainer_names_the_file_of_a_record_without_facts(
        make_config: MakeConfig, records: list[PreferenceRecord], tmp_path: Path) -> None:
    stripped = [r.model_copy(update={"metadata": r.metadata.model_copy(update={"objects": None})})
                if i == 5 else r for i, r in enumerate(records)]
    pool = tmp_path / "pool.jsonl"
    write_preference_jsonl(pool, stripped)
    cfg = make_config(data={"train": str(pool), "k": None}, reward=REWARD,
                      loss={"name": "bradley_terry"}, train={"steps": 1})
    with pytest.raises(FactsError, match=re.escape(f"{pool}: record '{records[5].id}'")):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "final").exists()


# --- a DP reward run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_cfg(make_config: MakeConfig) -> TrainConfig:
    """4 DP steps of 4 on 16 pool pairs, held-out evaluation at 0, 2, 4 (24 pairs)."""
    return make_config(reward=REWARD, loss={"name": "bradley_terry"}, privacy=DP,
                       optim={"lr": 1e-2}, train={"steps": 4, "batch_size": 4},
                       eval={"every": 2}, checkpoint={"every": 2, "keep": 2})


@pytest.fixture(scope="module")
def reward_run(reward_cfg: TrainConfig, tmp_path_factory: pytest.TempPathFactory
               ) -> TrainResult:
    return train(reward_cfg, tmp_path_factory.mktemp("reward") / "whole")


def test_heldout_accuracy_equals_evaluate_reward(reward_cfg: TrainConfig,
                                                 reward_run: TrainResult) -> None:
    """The run's final held-out reward accuracy is the accuracy ``evaluate_reward`` gives
    the saved model on the same file (same pairs counted correct; float32 vs float64 mean
    only); the trained model ties on no pair."""
    loaded = load_reward_model(reward_run.out)
    assert loaded.path == reward_run.out / "final" and loaded.facts.facts == "objects"
    held = read_preference_jsonl(reward_cfg.data.heldout)  # type: ignore[arg-type]
    result = evaluate_reward(loaded, held, batch_size=7)
    final = read_jsonl(reward_run.out / "eval.jsonl")[-1]
    assert final["step"] == 4 and result.n == 24
    assert int(result.correct.sum()) == round(final["heldout_reward_accuracy"] * 24)
    assert result.accuracy == pytest.approx(final["heldout_reward_accuracy"], abs=1e-7)
    assert result.ties == 0 and 0 < result.accuracy < 1


def test_reward_info_ledger_gives_the_epsilon(reward_cfg: TrainConfig,
                                              reward_run: TrainResult) -> None:
    """reward.json: the facts setting, the head's size, the training records (the run's
    few-shot draw) and a ledger (sigma 1, q = 4/16, 4 steps) whose epsilon is the run's."""
    info = json.loads((reward_run.out / "final" / "reward.json").read_text())
    assert (info["facts"], info["hidden_size"]) == ("objects", 128)
    pool = read_preference_jsonl(reward_cfg.data.train)
    assert info["train_ids"] == [r.id for r in few_shot(pool, 16, 0)]
    ledger = Ledger.from_json(json.dumps(info["ledger"]))
    assert [(e.sigma, e.sample_rate) for e in ledger.entries] == [(1.0, 0.25)]
    assert ledger.steps == 4 and info["privacy"]["delta"] == 1e-5
    spent = epsilon(ledger, info["privacy"]["delta"], info["privacy"]["accountant"])
    assert spent == json.loads((reward_run.out / "result.json").read_text())["privacy"][
        "epsilon"]
    assert spent == read_jsonl(reward_run.out / "metrics.jsonl")[-1]["epsilon"]
    # no KL to a reference in a reward model's DP steps (its scores have none)
    assert all("kl_proxy" not in row for row in read_jsonl(reward_run.out / "metrics.jsonl"))


def test_resume_equals_uninterrupted(reward_cfg: TrainConfig, reward_run: TrainResult,
                                     tmp_path: Path) -> None:
    """Crash in step 3 (after the step-2 checkpoint), resume: metrics (but time),
    evaluations, the head, the merged backbone and reward.json are bit-identical to the
    uninterrupted run's."""
    cfg = reward_cfg  # engine hooks; the head's bias is frozen (it cancels in r_w - r_l)
    out = tmp_path / "crashed"
    with pytest.raises(CrashError):
        train(cfg, out, on_step=crash_at(3))
    resumed = train(cfg, out, resume=True)
    assert resumed.steps == 4
    whole = reward_run
    assert without_time(read_jsonl(out / "metrics.jsonl")) == without_time(
        read_jsonl(whole.out / "metrics.jsonl"))
    assert read_jsonl(out / "eval.jsonl") == read_jsonl(whole.out / "eval.jsonl")
    for file in (HEAD_FILE, "model.safetensors"):
        got = load_file(str(out / "final" / file))
        expected = load_file(str(whole.out / "final" / file))
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (file, name)
    assert json.loads((out / "final" / "reward.json").read_text()) == json.loads(
        (whole.out / "final" / "reward.json").read_text())
