"""How well a saved reward model ranks a preference file's pairs (``dpalign reward eval``).

Each pair is scored as in training: the record gets the facts the model was trained with
(``loaded.facts``, ``with_facts``), its chosen and rejected answers are scored in one batch
(``RewardModel.score_pairs``), and the pair counts as correct when r(x, y_w) > r(x, y_l) by
more than rounding (``dpalign.losses.base.reward_ties`` with a zero reference, the rule of the
trainer's held-out ``reward_accuracy``): a tie counts 0, so the untrained (zero-headed) model
scores exactly 0. The accuracy comes with its 95 % Wilson interval over the n pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from scipy.stats import binomtest
from torch import Tensor

from dpalign.data.schema import PreferenceRecord
from dpalign.losses.base import PairLogps, reward_ties
from dpalign.models.pairs import collate, encode_pairs
from dpalign.progress import make_progress
from dpalign.rl.reward import LoadedReward, with_facts, zero_reference

CONFIDENCE = 0.95


def pair_outcomes(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """(correct, tie), each (N,) bool, for rewards r_w = ``chosen``, r_l = ``rejected``: a tie
    is a margin within rounding of 0 (``reward_ties``), correct is r_w > r_l and no tie."""
    ones = torch.ones_like(chosen)
    tie = reward_ties(PairLogps(chosen, rejected, ones, ones), zero_reference(len(chosen)))
    return (chosen > rejected) & ~tie, tie


@dataclass(frozen=True)
class RewardEval:
    """Per-pair rewards of N pairs (``chosen`` r(x, y_w), ``rejected`` r(x, y_l), each (N,)
    float32 on the CPU) and what follows from them."""

    ids: list[str]
    chosen: Tensor
    rejected: Tensor

    @cached_property
    def _outcomes(self) -> tuple[Tensor, Tensor]:
        return pair_outcomes(self.chosen, self.rejected)

    @property
    def correct(self) -> Tensor:
        """(N,) bool: r_w > r_l by more than rounding."""
        return self._outcomes[0]

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def ties(self) -> int:
        """Pairs whose two rewards are equal up to rounding (counted as not correct)."""
        return int(self._outcomes[1].sum())

    @property
    def accuracy(self) -> float:
        return int(self.correct.sum()) / self.n

    @property
    def ci(self) -> tuple[float, float]:
        """The accuracy's 95 % Wilson score interval."""
        interval = binomtest(int(self.correct.sum()), self.n).proportion_ci(
            confidence_level=CONFIDENCE, method="wilson")
        return float(interval.low), float(interval.high)

    @property
    def mean_margin(self) -> float:
        """Mean of r_w - r_l over the pairs."""
        return float((self.chosen.double() - self.rejected.double()).mean())

    def summary(self) -> dict[str, Any]:
        """``n``, ``accuracy``, ``ci_low``, ``ci_high``, ``ties``, ``mean_margin``."""
        low, high = self.ci
        return {"n": self.n, "accuracy": self.accuracy, "ci_low": low, "ci_high": high,
                "ties": self.ties, "mean_margin": self.mean_margin}

    def rows(self) -> list[dict[str, Any]]:
        """One row per pair: id, reward_chosen, reward_rejected, margin, correct."""
        return [{"id": pid, "reward_chosen": float(w), "reward_rejected": float(r),
                 "margin": float(w) - float(r), "correct": bool(c)}
                for pid, w, r, c in zip(self.ids, self.chosen.tolist(),
                                        self.rejected.tolist(), self.correct.tolist(),
                                        strict=True)]


def evaluate_reward(loaded: LoadedReward, records: Sequence[PreferenceRecord],
                    batch_size: int = 32) -> RewardEval:
    """Score ``records`` (with the model's own facts setting) in batches of ``batch_size``
    pairs. Raises ``ValueError`` for no records and ``FactsError`` naming a record that lacks
    the facts the model was trained with."""
    if not records:
        raise ValueError("no preference pairs to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    shown = [with_facts(r, loaded.facts) for r in records]
    pad_id = int(loaded.processor.tokenizer.pad_token_id)
    model = loaded.model
    was_training = model.training
    model.eval()
    chosen: list[Tensor] = []
    rejected: list[Tensor] = []
    with make_progress() as bar, torch.no_grad():
        task = bar.add_task("reward eval", total=len(shown), info="")
        for start in range(0, len(shown), batch_size):
            part = encode_pairs(shown[start:start + batch_size], loaded.processor)
            scores = model.score_pairs(collate(part, pad_id))
            chosen.append(scores.chosen.float().cpu())
            rejected.append(scores.rejected.float().cpu())
            bar.advance(task, len(part))
    model.train(was_training)
    return RewardEval([r.id for r in records], torch.cat(chosen), torch.cat(rejected))
