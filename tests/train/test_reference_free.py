"""A reference-free loss (SimPO, ORPO) trains with no reference pass over its training pairs.

Two real steps of the trainer on the tiny model (plain, and DP with sigma 0, C = inf and a
shuffled batch, so step 1 holds the same kind of fixed batch): the reference function is
never asked for the training pairs and writes no ``reference/train.safetensors``; the loss
sees a zero reference; no ``kl_proxy`` is logged. The held-out part keeps its reference
(its metrics compare the policy with its start, as for every loss): at step 0 it reads as
all ties. Step 1's logged loss and rewards equal the loss worked out by hand (plain float64
arithmetic) from the first batch's log-probs, scored independently with the loaded model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dpalign.data.sampling import batch_indices
from dpalign.io import read_jsonl
from dpalign.losses.base import PairLogps
from dpalign.losses.objective import Objective
from dpalign.models.load import load_model
from dpalign.models.pairs import encode_pairs
from dpalign.privacy.sampling import shuffled_batch
from dpalign.rundir import RunDir
from dpalign.train import loop
from dpalign.train.checks import check_run
from dpalign.train.config import TrainConfig
from dpalign.train.loop import train
from dpalign.train.reference import compute_reference

MakeConfig = Callable[..., TrainConfig]  # the make_config fixture (tests/conftest.py)
BETA = 0.1
GAMMA = 0.5  # SimPO's default target margin


def softplus(x: float) -> float:
    return math.log1p(math.exp(x)) if x < 30 else x


def log_odds(m: float) -> float:
    """log(P / (1 - P)) of P = e^m."""
    return m - math.log(1.0 - math.exp(m))


def hand_loss(name: str, m_w: float, m_l: float) -> float:
    """One pair's loss from its per-token mean log-probs."""
    if name == "simpo":
        return softplus(GAMMA - BETA * (m_w - m_l))
    return -m_w + BETA * softplus(-(log_odds(m_w) - log_odds(m_l)))


def first_batch_logps(cfg: TrainConfig, private: bool) -> PairLogps:
    """Step 1's pairs scored by the loaded model, as the policy starts (LoRA B = 0)."""
    records = check_run(cfg).records
    n = len(records)
    idx = shuffled_batch(n, 4, cfg.train.seed, 0) if private else batch_indices(n, 4, 0, 0)
    loaded = load_model(cfg.model)
    pairs = encode_pairs([records[i] for i in idx], loaded.processor)
    return compute_reference(loaded.model, pairs, int(loaded.processor.tokenizer.pad_token_id),
                             with_corrupt=False)


CASES = [("simpo", False), ("orpo", False), ("orpo", True)]


@pytest.mark.parametrize(("name", "private"), CASES, ids=["simpo", "orpo", "orpo-dp"])
def test_reference_free_run_takes_no_reference_pass(name: str, private: bool,
                                                     make_config: MakeConfig, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []  # the splits the run asked the reference cache for
    real_cached = loop.cached_reference

    def recording(path: Path, *args: Any, **kwargs: Any) -> PairLogps:
        asked.append(path.stem)
        return real_cached(path, *args, **kwargs)

    refs: list[PairLogps] = []  # the reference every loss call got
    real_call = Objective.__call__

    def spy(self: Objective, policy: PairLogps, ref: PairLogps, **kwargs: Any) -> Any:
        refs.append(ref)
        return real_call(self, policy, ref, **kwargs)

    monkeypatch.setattr(loop, "cached_reference", recording)
    monkeypatch.setattr(Objective, "__call__", spy)
    privacy = ({"enabled": True, "noise_multiplier": 0.0, "max_grad_norm": math.inf,
                "sampling": "shuffle"} if private else {})
    cfg = make_config(data={"k": 8}, train={"steps": 2, "batch_size": 4},
                      loss={"name": name, "beta": BETA}, eval={"every": 2},
                      checkpoint={"every": None}, privacy=privacy)
    result = train(cfg, tmp_path / name)

    assert asked == ["heldout"]  # never "train"
    assert not (result.out / "reference" / "train.safetensors").exists()
    assert (result.out / "reference" / "heldout.safetensors").is_file()
    assert refs and all(float(r.chosen.abs().max()) == 0.0 == float(r.rejected.abs().max())
                        for r in refs)

    rows = read_jsonl(result.out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all("kl_proxy" not in r for r in rows)
    first = rows[0]
    logps = first_batch_logps(cfg, private)
    m_w = (logps.chosen.double() / logps.chosen_tokens.double()).tolist()
    m_l = (logps.rejected.double() / logps.rejected_tokens.double()).tolist()
    # the same four pairs as the trainer's step 1 (its summed log-probs, batch mean)
    assert first["logp_chosen"] == pytest.approx(float(logps.chosen.double().mean()), rel=1e-5)
    assert first["logp_rejected"] == pytest.approx(float(logps.rejected.double().mean()),
                                                   rel=1e-5)
    expected = sum(hand_loss(name, w, r) for w, r in zip(m_w, m_l, strict=True)) / 4
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["reward_chosen"] == pytest.approx(BETA * sum(m_w) / 4, rel=1e-5)
    assert first["reward_margin"] == pytest.approx(
        BETA * (sum(m_w) - sum(m_l)) / 4, rel=1e-4, abs=1e-7)
    assert first["reward_accuracy"] == sum(w > r for w, r in zip(m_w, m_l, strict=True)) / 4
    if name == "orpo":
        assert first["nll_chosen"] == pytest.approx(-sum(m_w) / 4, rel=1e-5)
    assert math.isfinite(rows[1]["loss"]) and rows[1]["loss"] != first["loss"]

    evals = read_jsonl(RunDir(result.out).evals)
    assert evals[0]["step"] == 0  # policy == its start: every held-out pair a tie
    assert evals[0]["heldout_reward_accuracy"] == 0.0
    assert evals[0]["heldout_reward_margin"] == 0.0
    assert evals[-1]["step"] == 2 and evals[-1]["heldout_reward_margin"] != 0.0

