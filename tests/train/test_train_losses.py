"""Every registered loss trains end to end; step 1 (policy == reference, zero margins) logs
the loss's closed-form value, worked out by hand below. A reference-free loss (SimPO, ORPO)
has no reference to equal: its table value is checked on log-probs with equal per-token
means, and its first step against the policy's own log-probs in test_reference_free.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpalign.data.fewshot import few_shot
from dpalign.data.records import read_preference_jsonl
from dpalign.data.sampling import batch_indices
from dpalign.io import read_jsonl
from dpalign.losses import LOSSES, REWARD_LOSSES, PairLogps
from dpalign.train.config import TrainConfig
from dpalign.train.loop import train
from dpalign.world.load import World

MakeConfig = Callable[..., TrainConfig]  # the make_config fixture (tests/conftest.py)
BETA = 0.1
LOG2 = math.log(2.0)

# Loss at zero log-ratio margin (every D = 0), default parameters, beta = 0.1:
#   dpo, cdpo (any eps), robust (any e: ((1-e) - e) log 2 / (1-2e)), mmdpo (beta_i = beta),
#   dama (any beta_i): -log sigmoid(0) = log 2
#   ipo: (0 - 1/(2 beta))^2 = 5^2 = 25;  hinge: max(0, 1 - 0) = 1
#   mdpo: three sigmoid terms at 0 (anchor_delta 0): 3 log 2
#   apo_zero: (1 - s(0)) + s(0) = 1;  apo_down: s(0) + (1 - s(0)) = 1
#   bco_pair, nca_pair: -log s(0) - log s(0) = 2 log 2 (nca: log 2 + 0.5 log 2 + 0.5 log 2)
#   sppo_hard: (0 - 1/(2 beta))^2 + (0 + 1/(2 beta))^2 = 2 * 5^2 = 50
#   exo_pair (eps 1e-3): 0.5 (log 0.5 - log(1 - eps)) + 0.5 (log 0.5 - log eps)
#   discopop: mix s(0/tau) = 0.5: 0.5 log 2 + 0.5 exp(0)
#   bradley_terry (a reward run): the head starts at zero, r = 0 for every answer: log 2
# Reference-free, at equal per-token means m_w = m_l = m (margin 0), here m = -log 2:
#   simpo (gamma 0.5): -log sigmoid(0 - gamma) = log(1 + e^0.5)
#   orpo: P(y) = e^m = 1/2, odds 1, log-odds ratio 0: -m + beta (-log sigmoid(0))
#         = log 2 + beta log 2
EXO_EPS = 1e-3
SIMPO_GAMMA = 0.5
AT_ZERO_MARGIN = {"dpo": LOG2, "cdpo": LOG2, "robust": LOG2, "mmdpo": LOG2, "dama": LOG2,
                  "ipo": (1 / (2 * BETA)) ** 2, "hinge": 1.0, "mdpo": 3 * LOG2,
                  "apo_zero": 1.0, "apo_down": 1.0, "bco_pair": 2 * LOG2, "nca_pair": 2 * LOG2,
                  "sppo_hard": 2 * (1 / (2 * BETA)) ** 2,
                  "exo_pair": -LOG2 - 0.5 * (math.log1p(-EXO_EPS) + math.log(EXO_EPS)),
                  "discopop": 0.5 * LOG2 + 0.5,
                  "simpo": math.log1p(math.exp(SIMPO_GAMMA)), "orpo": LOG2 + BETA * LOG2,
                  "bradley_terry": LOG2}
REFERENCE_FREE = sorted(n for n, spec in LOSSES.items() if spec.reference_free)


def test_every_registered_loss_has_a_hand_value() -> None:
    assert set(AT_ZERO_MARGIN) == set(LOSSES)


@pytest.mark.parametrize("name", REFERENCE_FREE)
def test_reference_free_hand_values_at_equal_means(name: str) -> None:
    """Mean log-prob -log 2 per token on 3 chosen and 7 rejected tokens (and any reference)."""
    half = -LOG2
    policy = PairLogps(torch.tensor([3 * half]), torch.tensor([7 * half]),
                       torch.tensor([3.0]), torch.tensor([7.0]))
    ref = PairLogps(torch.tensor([-9.0]), torch.tensor([-1.0]), torch.tensor([3.0]),
                    torch.tensor([7.0]))
    out = LOSSES[name].call(policy, ref, beta=BETA)
    assert out.per_example.item() == pytest.approx(AT_ZERO_MARGIN[name], rel=1e-6)
    assert out.metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-7)


def _dama_beta_i(world: Path) -> float:
    """Mean beta_i of DAMA's first batch by hand: alpha_model = sigmoid(0)/sigmoid(0) = 1 and
    alpha_data = sigmoid(1 - h) / sigmoid(1 - 0.5) with h the pair's hardness_score."""
    pool = few_shot(read_preference_jsonl(World.load(world).pool_file), 8, seed=0)
    batch = [pool[i] for i in batch_indices(8, 4, 0, 0)]

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    scores = [r.metadata.hardness_score for r in batch]
    return sum(BETA * sigmoid(1 - h) / sigmoid(0.5) for h in scores) / len(scores)  # type: ignore[operator]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_trains_two_steps_from_its_closed_form(name: str, make_config: MakeConfig,
                                                    small_world: Path, tmp_path: Path) -> None:
    """Two steps of 4 pairs: step 1's logged loss is the zero-margin value, step 2 moved away
    from it; mDPO caches the corrupted-image reference, DAMA and MM-DPO log their beta_i."""
    cfg = make_config(data={"k": 8, "heldout": None}, train={"steps": 2, "batch_size": 4},
                      loss={"name": name, "beta": BETA}, eval={"every": None},
                      checkpoint={"every": None},
                      reward={"enabled": name in REWARD_LOSSES})
    result = train(cfg, tmp_path / name)
    rows = read_jsonl(result.out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    first, second = rows
    reference_free = LOSSES[name].reference_free
    if not reference_free:  # (reference-free: step 1 by hand in test_reference_free.py)
        assert first["loss"] == pytest.approx(AT_ZERO_MARGIN[name], rel=1e-5, abs=1e-5)
        assert first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    if name in REWARD_LOSSES or reference_free:  # no reference to be close to
        assert "kl_proxy" not in first and "kl_proxy" not in second
    else:
        assert first["kl_proxy"] == pytest.approx(0.0, abs=1e-10)
    assert math.isfinite(second["loss"]) and second["loss"] != first["loss"]
    assert second["grad_norm"] > 0
    reference = result.out / "reference" / "train.safetensors"
    # neither a reward model nor a reference-free loss has one
    assert reference.is_file() == (name not in REWARD_LOSSES and not reference_free)
    if reference.is_file():
        assert ("chosen_corrupt" in load_file(str(reference))) == (name == "mdpo")
    if name == "mdpo":
        for term in ("loss_resp", "loss_img", "loss_anchor"):
            assert first[term] == pytest.approx(LOG2, abs=1e-5)
        assert first["image_margin"] == pytest.approx(0.0, abs=1e-4)
    if name == "mmdpo":
        assert first["beta_i"] == pytest.approx(BETA, rel=1e-4)
    if name == "dama":
        assert first["beta_i"] == pytest.approx(_dama_beta_i(small_world), rel=1e-4)
    assert (result.out / "final" / "model.safetensors").is_file()
