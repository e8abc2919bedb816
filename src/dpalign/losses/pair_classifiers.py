"""Losses that score each response's own log-ratio r = beta * (log pi - log ref) rather than
their difference (pairwise forms of per-response objectives):

    bco_pair  (Binary Classifier Optimization, Jung et al. 2024):
              L_i = -log sigmoid(r_w) - log sigmoid(-r_l)
    nca_pair  (Noise Contrastive Alignment, Chen et al. 2024):
              L_i = -log sigmoid(r_w) - 0.5 log sigmoid(-r_w) - 0.5 log sigmoid(-r_l)
    sppo_hard (Self-Play Preference Optimization, Wu et al. 2024, with hard 0/1 win
              probabilities): L_i = (r_w / beta - 1 / (2 beta))^2 + (r_l / beta + 1 / (2 beta))^2
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpalign.losses.base import LossOut, PairLogps, reward_metrics
from dpalign.losses.params import LossParams


def _log_ratios(policy: PairLogps, ref: PairLogps) -> tuple[Tensor, Tensor]:
    """Each response's log-ratio log pi - log ref, (B,) each."""
    return policy.chosen - ref.chosen, policy.rejected - ref.rejected


def bco_pair(policy: PairLogps, ref: PairLogps, *, beta: float) -> LossOut:
    """Per-pair BCO loss, shape (B,)."""
    chosen, rejected = _log_ratios(policy, ref)
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return LossOut(losses, reward_metrics(policy, ref, beta))


def nca_pair(policy: PairLogps, ref: PairLogps, *, beta: float) -> LossOut:
    """Per-pair NCA loss, shape (B,)."""
    chosen, rejected = _log_ratios(policy, ref)
    losses = (-F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen)
              - 0.5 * F.logsigmoid(-beta * rejected))
    return LossOut(losses, reward_metrics(policy, ref, beta))


def sppo_hard(policy: PairLogps, ref: PairLogps, *, beta: float) -> LossOut:
    """Per-pair SPPO (hard) loss, shape (B,)."""
    chosen, rejected = _log_ratios(policy, ref)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return LossOut(losses, reward_metrics(policy, ref, beta))


class NoParams(LossParams):
    """No parameters besides ``beta``."""
