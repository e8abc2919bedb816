"""Anchored Preference Optimization (D'Oosterlinck et al. 2024, eqs. 7 and 8), on each
response's own log-ratio r = beta * (log pi - log ref):

    apo_zero: L_i = (1 - sigmoid(r_w)) + sigmoid(r_l)          (raise y_w, lower y_l)
    apo_down: L_i = sigmoid(r_w) + (1 - sigmoid(r_w - r_l))    (lower both, y_l more)
"""

from __future__ import annotations

import torch

from dpalign.losses.base import LossOut, PairLogps, implicit_rewards, reward_metrics
from dpalign.losses.params import LossParams


def apo_zero(policy: PairLogps, ref: PairLogps, *, beta: float) -> LossOut:
    """Per-pair APO-zero loss, shape (B,): the chosen answer is better than the model's."""
    chosen, rejected = implicit_rewards(policy, ref, beta)
    losses = (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)
    return LossOut(losses, reward_metrics(policy, ref, beta))


def apo_down(policy: PairLogps, ref: PairLogps, *, beta: float) -> LossOut:
    """Per-pair APO-down loss, shape (B,): the chosen answer is worse than the model's."""
    chosen, rejected = implicit_rewards(policy, ref, beta)
    losses = torch.sigmoid(chosen) + (1 - torch.sigmoid(chosen - rejected))
    return LossOut(losses, reward_metrics(policy, ref, beta))


class ApoParams(LossParams):
    """APO has no parameters besides ``beta``."""
