"""Losses on the log-ratio margin d = (pi_w - ref_w) - (pi_l - ref_l) beyond the sigmoid:

    exo_pair (EXO, Ji et al. 2024, eq. 16, two responses): the reverse KL from
              q = softmax(beta d, 0) to the target p = (1 - eps, eps):
              L_i = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),
              q_w = sigmoid(beta d), q_l = sigmoid(-beta d); ``epsilon`` in (0, 1/2)
    discopop (Chan Lu et al. 2024, eq. 5): with z = beta d and m = sigmoid(z / tau),
              L_i = (1 - m) (-log sigmoid(z)) + m exp(-z)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from dpalign.losses.base import LossOut, PairLogps, reward_metrics
from dpalign.losses.dpo import log_ratio_margin
from dpalign.losses.params import LossParams


def exo_pair(policy: PairLogps, ref: PairLogps, *, beta: float,
             epsilon: float = 1e-3) -> LossOut:
    """Per-pair EXO loss, shape (B,)."""
    z = beta * log_ratio_margin(policy, ref)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-epsilon))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(epsilon)))
    return LossOut(losses, reward_metrics(policy, ref, beta))


class ExoParams(LossParams):
    epsilon: float = Field(1e-3, gt=0, lt=0.5, description="the target's weight on the "
                                                           "rejected answer")


def discopop(policy: PairLogps, ref: PairLogps, *, beta: float,
             tau: float = 0.05) -> LossOut:
    """Per-pair DiscoPOP loss, shape (B,)."""
    z = beta * log_ratio_margin(policy, ref)
    mix = torch.sigmoid(z / tau)
    losses = (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)
    return LossOut(losses, reward_metrics(policy, ref, beta))


class DiscopopParams(LossParams):
    tau: float = Field(0.05, gt=0, description="temperature of the logistic/exponential mix")
