"""Shared types of the preference losses (DESIGN §4).

A loss is a pure function ``f(policy, ref, *, beta, ...) -> LossOut``: it takes the summed
response log-probs of a batch of preference pairs under the policy and under the frozen
reference model and returns one unreduced loss per pair. The training step reduces, and the
DP step clips each pair's gradient, so a loss must never mix pairs except through inputs
passed in explicitly (e.g. DAMA's running reward-gap mean).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class PairLogps:
    """Summed log-probs of the response tokens of B preference pairs.

    chosen, rejected:   (B,) log p(y_w | m, x) and log p(y_l | m, x), summed over tokens.
    chosen_tokens, rejected_tokens: (B,) number of response tokens (float), for per-token
                        means (IPO's length normalisation, the SFT term).
    chosen_corrupt:     (B,) log p(y_w | m', x) under mDPO's corrupted image m', or None.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_corrupt: Tensor | None = None

    def index(self, idx: Tensor | slice | int) -> PairLogps:
        """The pairs at ``idx`` (keeps the batch dimension for a tensor or slice)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return PairLogps(pick(self.chosen), pick(self.rejected), pick(self.chosen_tokens),
                         pick(self.rejected_tokens), pick(self.chosen_corrupt))

    def to(self, device: torch.device | str) -> PairLogps:
        """The same log-probs on ``device``."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return PairLogps(move(self.chosen), move(self.rejected), move(self.chosen_tokens),
                         move(self.rejected_tokens), move(self.chosen_corrupt))

    def detach(self) -> PairLogps:
        def d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return PairLogps(d(self.chosen), d(self.rejected), d(self.chosen_tokens),
                         d(self.rejected_tokens), d(self.chosen_corrupt))

    @staticmethod
    def cat(parts: Sequence[PairLogps]) -> PairLogps:
        """The pairs of ``parts`` one after another: (B1 + B2 + ...,) each field."""
        def join(name: str) -> Tensor | None:
            fields = [getattr(p, name) for p in parts]
            return None if fields[0] is None else torch.cat(fields)

        return PairLogps(*(join(f.name) for f in dataclasses.fields(PairLogps)))


@dataclass(frozen=True)
class LossOut:
    """per_example: (B,) loss of each pair, unreduced.
    metrics: name -> (B,) per-pair diagnostics, detached (at least ``reward_chosen``,
    ``reward_rejected``, ``reward_margin``: beta-scaled implicit rewards)."""

    per_example: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[LossOut]) -> LossOut:
        """The pairs of ``parts`` one after another (per_example and every metric)."""
        return LossOut(torch.cat([p.per_example for p in parts]),
                       {k: torch.cat([p.metrics[k] for p in parts]) for k in parts[0].metrics})


def implicit_rewards(policy: PairLogps, ref: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """beta * (log pi - log ref) for chosen and rejected, each (B,)."""
    return beta * (policy.chosen - ref.chosen), beta * (policy.rejected - ref.rejected)


# A pair whose log-ratio margin is within TIE_RTOL of the log-probs' magnitude is a tie.
# Scoring the same model in two batch layouts, or with AVX2 vs AVX-512 kernels, moves a
# summed float32 log-prob by up to ~2.3e-7 relative (measured on the tiny preset); 1e-5 is
# ~80 float32 ulps, 40x that, and far below any margin one optimizer step produces.
TIE_RTOL = 1e-5


def reward_ties(policy: PairLogps, ref: PairLogps) -> Tensor:
    """(B,) bool: the pair's margin (log pi - log ref)(chosen) - (...)(rejected) is within
    ``TIE_RTOL * (|log pi(y_w)| + |log ref(y_w)| + |log pi(y_l)| + |log ref(y_l)|)`` of 0,
    i.e. indistinguishable from rounding: a policy equal to its reference ties on every pair
    however the two were batched."""
    margin = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    scale = (policy.chosen.abs() + ref.chosen.abs() + policy.rejected.abs()
             + ref.rejected.abs())
    return margin.abs() <= TIE_RTOL * scale


def reward_metrics(policy: PairLogps, ref: PairLogps, beta: float) -> dict[str, Tensor]:
    """The diagnostics every loss reports, detached, each (B,).

    ``reward_accuracy`` is 1 where the chosen answer's implicit reward exceeds the
    rejected one's by more than rounding (``reward_ties``); a tie counts 0, as a strict
    ``chosen > rejected`` does in TRL, so the untrained policy scores exactly 0.
    """
    with torch.no_grad():
        chosen, rejected = implicit_rewards(policy, ref, beta)
        wins = (chosen > rejected) & ~reward_ties(policy, ref)
        return {"reward_chosen": chosen, "reward_rejected": rejected,
                "reward_margin": chosen - rejected,
                "reward_accuracy": wins.to(chosen.dtype)}
