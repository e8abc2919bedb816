"""One preference step's maths: pair log-probs from a batch, the configured loss, metrics.

``pair_logps`` runs the model once over all rows of a ``PairBatch``; ``Objective`` turns
policy and reference log-probs into the per-pair loss (plus the optional SFT term) and
``step_metrics`` reduces the per-pair diagnostics to the numbers logged per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dpalign.losses import LossSpec, get_loss, token_means, with_sft
from dpalign.losses.base import LossOut, PairLogps
from dpalign.losses.config import LossConfig
from dpalign.losses.params import LossParams
from dpalign.models.logprobs import sequence_logps
from dpalign.models.pairs import PairBatch


@runtime_checkable
class PairScorer(Protocol):
    """A model that scores a pair's responses itself (a reward model:
    ``dpalign.rl.reward.RewardModel``), in place of their log-probs."""

    def score_pairs(self, batch: PairBatch) -> PairLogps: ...


def pair_logps(model: torch.nn.Module, batch: PairBatch) -> PairLogps:
    """Summed response log-probs per pair, each (B,), from one forward over 2B/3B rows; a
    ``PairScorer`` (a reward model) gives its scores instead, so that the engines, steps and
    evaluations that train and measure a policy train and measure it alike."""
    if isinstance(model, PairScorer):
        return model.score_pairs(batch)
    seq = sequence_logps(model, batch.tokens, batch.images, batch.images_per_row)
    b = batch.n_pairs
    return PairLogps(
        chosen=seq.total[:b], rejected=seq.total[b:2 * b],
        chosen_tokens=seq.tokens[:b], rejected_tokens=seq.tokens[b:2 * b],
        chosen_corrupt=seq.total[2 * b:] if batch.with_corrupt else None)


@dataclass(frozen=True)
class Objective:
    """The configured loss as one callable: (policy, ref) -> LossOut with (B,) entries."""

    spec: LossSpec
    params: LossParams
    beta: float
    sft_weight: float = 0.0
    length_normalize: bool = False

    @classmethod
    def from_config(cls, cfg: LossConfig) -> Objective:
        spec = get_loss(cfg.name)
        return cls(spec, spec.make_params(cfg.params), cfg.beta, cfg.sft_weight,
                   cfg.length_normalize)

    def __call__(self, policy: PairLogps, ref: PairLogps, *, hardness: Tensor | None = None,
                 alpha_model: float | Tensor | None = None) -> LossOut:
        scored_policy, scored_ref = ((token_means(policy), token_means(ref))
                                     if self.length_normalize else (policy, ref))
        out = self.spec.call(scored_policy, scored_ref, beta=self.beta, params=self.params,
                             hardness=hardness, alpha_model=alpha_model)
        return with_sft(out, policy, self.sft_weight) if self.sft_weight else out

    @property
    def has_batch_context(self) -> bool:
        """Whether the loss takes inputs from the whole batch (``LossSpec.batch_context``)."""
        return self.spec.batch_context is not None

    def batch_context(self, policy: PairLogps, ref: PairLogps, state: Any
                      ) -> tuple[dict[str, Any], Any]:
        """The loss's keyword inputs from the whole batch's log-probs (each (B,)) and the
        loop's loss state, and the new state; ``({}, state)`` for a loss without a context."""
        hook = self.spec.batch_context
        return ({}, state) if hook is None else hook(policy, ref, state, self.params)


def kl_proxy(policy: PairLogps, ref: PairLogps) -> Tensor:
    """(B,) 0.5 * mean over the two responses of (log pi - log ref)^2, per token: the k2
    estimate of KL(pi || ref) on the pair's own responses (non-negative, 0 at start)."""
    chosen = (policy.chosen - ref.chosen) / policy.chosen_tokens.clamp(min=1)
    rejected = (policy.rejected - ref.rejected) / policy.rejected_tokens.clamp(min=1)
    return 0.25 * (chosen.square() + rejected.square())


def with_policy_metrics(out: LossOut, policy: PairLogps, ref: PairLogps, *,
                        kl: bool = True) -> LossOut:
    """``out`` plus per-pair (B,) ``logp_chosen``, ``logp_rejected`` and ``kl_proxy``
    (detached), so a per-pair engine logs what ``step_metrics`` logs for a plain step.
    ``kl``: ``LossSpec.logs_kl``; False for a reward model's scores or a reference-free loss,
    which have no reference to be close to: no ``kl_proxy``."""
    extra = {"logp_chosen": policy.chosen, "logp_rejected": policy.rejected}
    if kl:
        extra["kl_proxy"] = kl_proxy(policy, ref)
    return LossOut(out.per_example, {**out.metrics, **{k: v.detach() for k, v in extra.items()}})


def step_metrics(out: LossOut, policy: PairLogps, ref: PairLogps, *,
                 kl: bool = True) -> dict[str, float]:
    """Batch means of the loss, the loss's diagnostics and the log-prob summaries, and
    ``kl_proxy`` where ``kl`` (``LossSpec.logs_kl``: not for a reward model's scores nor a
    reference-free loss)."""
    with torch.no_grad():
        values = {"loss": out.per_example.mean()}
        values |= {name: v.float().mean() for name, v in out.metrics.items()}
        values |= {"logp_chosen": policy.chosen.mean(), "logp_rejected": policy.rejected.mean()}
        if kl:
            values["kl_proxy"] = kl_proxy(policy, ref).mean()
        return {k: float(v) for k, v in values.items()}
