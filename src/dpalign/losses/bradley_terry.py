"""The Bradley-Terry loss of a reward model (DESIGN §5).

A reward model r scores each response; the pair's loss is

    L_i = -log sigmoid(r(x, y_w) - r(x, y_l))

Here ``policy.chosen`` / ``policy.rejected`` hold the rewards r(x, y_w), r(x, y_l), each (B,),
as ``dpalign.rl.reward.RewardModel`` scores a pair; the reference and ``beta`` play no part
(a reward model has no reference; the loss is scale-free in r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpalign.losses.base import LossOut, PairLogps, reward_metrics
from dpalign.losses.params import LossParams


def bradley_terry(policy: PairLogps, ref: PairLogps, *, beta: float) -> LossOut:
    """(B,) -log sigmoid(r_w - r_l), with r_w = ``policy.chosen``, r_l = ``policy.rejected``.
    The metrics are the rewards themselves (``reward_chosen`` = r_w, ...) and the pairwise
    accuracy r_w > r_l (a tie within rounding counts 0)."""
    del ref, beta
    zero = torch.zeros_like(policy.chosen)
    losses = -F.logsigmoid(policy.chosen - policy.rejected)
    return LossOut(losses, reward_metrics(policy, PairLogps(zero, zero, zero, zero), 1.0))


class BradleyTerryParams(LossParams):
    """The Bradley-Terry loss has no parameters."""
