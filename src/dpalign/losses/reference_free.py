"""Reference-free losses: the policy's own per-token mean log-probs, no reference model.

With m_w, m_l the mean log-prob per response token of y_w and y_l (``token_means``):

    simpo (SimPO, Meng et al. 2024, with TRL's label smoothing eps):
          h_i = beta (m_w - m_l) - gamma
          L_i = -(1 - eps) log sigmoid(h_i) - eps log sigmoid(-h_i)
    orpo  (ORPO, Hong et al. 2024; beta is their lambda):
          log odds(y) = m - log(1 - exp(m))         (odds of P(y) = exp(m))
          L_i = -m_w - beta log sigmoid(log odds(y_w) - log odds(y_l))

Both average over response tokens themselves (``LossSpec.averages_tokens``), so they take
the summed log-probs of ``PairLogps`` like every loss, and ``loss.length_normalize`` is
rejected for them (it would divide twice). ``ref`` is ignored: a run of these losses has no
reference pass and passes zeros (``LossSpec.reference_free``).

Implicit rewards (the ``reward_*`` metrics), as TRL's CPO/SimPO and ORPO trainers log them:
beta * m, the policy's own mean token log-prob scaled by beta, for each response. Ties are
``reward_ties`` on the means against a zero reference: a pair whose m_w - m_l is within
rounding of 0 counts 0 in ``reward_accuracy``.

ORPO's NLL is the chosen response's mean token NLL, per pair (the paper's L_SFT). TRL's
ORPOTrainer takes it over prompt and response tokens of the whole batch at once
(token-weighted); the two agree for a one-token prompt and one pair, or equal lengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from dpalign.losses.base import LossOut, PairLogps, reward_metrics
from dpalign.losses.ipo import token_means
from dpalign.losses.params import LossParams

# A mean token log-prob above this (every token's probability above 1 - 1e-6) is read as
# this: log(1 - exp(m)) is -inf at m = 0, and its gradient with it.
LOGP_CEILING = -1e-6
_LOG_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x))
    above -log 2, log1p(-exp(x)) below. ``x`` is clamped at ``LOGP_CEILING``; each branch
    sees only its own range, so neither puts an inf (or a NaN gradient) into the other."""
    x = x.clamp(max=LOGP_CEILING)
    near_zero = torch.log(-torch.expm1(x.clamp(min=_LOG_HALF)))
    far = torch.log1p(-torch.exp(x.clamp(max=_LOG_HALF)))
    return torch.where(x > _LOG_HALF, near_zero, far)


def own_rewards(means: PairLogps, beta: float) -> dict[str, Tensor]:
    """``reward_metrics`` of a reference-free loss: beta * mean token log-prob for each
    response, ties against a zero reference; each (B,), detached."""
    zeros = PairLogps(torch.zeros_like(means.chosen), torch.zeros_like(means.rejected),
                      means.chosen_tokens, means.rejected_tokens)
    return reward_metrics(means, zeros, beta)


def simpo(policy: PairLogps, ref: PairLogps, *, beta: float, gamma: float = 0.5,
          label_smoothing: float = 0.0) -> LossOut:
    """Per-pair SimPO loss, shape (B,); ``ref`` is ignored."""
    means = token_means(policy)
    h = beta * (means.chosen - means.rejected) - gamma
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(h)
              - label_smoothing * F.logsigmoid(-h))
    return LossOut(losses, own_rewards(means, beta))


class SimpoParams(LossParams):
    gamma: float = Field(0.5, ge=0, allow_inf_nan=False,
                         description="target reward margin (TRL's simpo_gamma, default 0.5)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="probability that a label is flipped")


def orpo(policy: PairLogps, ref: PairLogps, *, beta: float) -> LossOut:
    """Per-pair ORPO loss, shape (B,); ``ref`` is ignored. Adds ``nll_chosen`` (-m_w) and
    ``log_odds_ratio`` (log odds(y_w) - log odds(y_l)) to the metrics, each (B,)."""
    means = token_means(policy)
    log_odds = ((means.chosen - log1mexp(means.chosen))
                - (means.rejected - log1mexp(means.rejected)))
    nll = -means.chosen
    losses = nll - beta * F.logsigmoid(log_odds)
    metrics = own_rewards(means, beta) | {"nll_chosen": nll.detach(),
                                          "log_odds_ratio": log_odds.detach()}
    return LossOut(losses, metrics)


class OrpoParams(LossParams):
    """ORPO has no parameters besides ``beta`` (the odds-ratio term's weight, lambda)."""
