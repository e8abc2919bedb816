"""DAMA (Lu et al. 2025, "DAMA: Data- and Model-aware Alignment of Multi-modal LLMs").

DPO with a per-pair beta that combines how hard the pair is (data-aware) with how well the
model currently separates the batch relative to its history (model-aware):

    beta_i = max(beta * alpha_data_i * alpha_model, 1e-3)
    L_i    = -log sigmoid(beta_i * margin_i),   margin_i = (pi_c - ref_c) - (pi_r - ref_r)

Data-aware factor (paper: Algorithm 1, Eq. 6). The paper scores each pair by delta_i, the gap
between the CLIP image-text scores of the chosen and the rejected response (large = easy to
tell apart), and sets alpha_data_i = sigmoid(delta_i) / sigmoid(mean delta over the data).
Our inputs give a hardness h_i in [0, 1] instead (1 = hardest, e.g. the world's
``hardness_score`` metadata), so we use the easiness 1 - h_i as the score:

    delta_i      = data_scale * (1 - h_i)
    delta_bar    = data_scale * (1 - hardness_mean)
    alpha_data_i = sigmoid(delta_i) / sigmoid(delta_bar)

Easy pairs get a larger beta (a more conservative update, against over-fitting them) and hard
pairs a smaller one. ``hardness_mean`` plays the dataset mean; it is a configured constant
rather than a statistic of the private training pairs.

Model-aware factor (Eqs. 12 and 14). With R_B the batch's mean log-ratio margin (no beta) and
R_bar its running mean (EMA with momentum gamma = 0.9, starting at 0 as in the authors' code):

    alpha_model = sigmoid(R_B) / sigmoid(R_bar)        then   R_bar <- gamma R_bar + (1-gamma) R_B

The authors' code takes R_B over a Gaussian-weighted random 80% of the batch; we use the plain
batch mean. alpha_model is one scalar per step that mixes pairs, so it is computed outside the
per-pair loss: ``dama_context`` (DAMA's ``LossSpec.batch_context``, which the training loop
calls once per step with the whole batch's log-probs and R_bar from its state) returns
``alpha_model`` and the new R_bar; the loss itself stays per-pair and vmap-friendly.
Privacy note: alpha_model computed from the current batch makes every pair's step depend on
the other pairs' data, so a DP run must either fix alpha_model = 1 (DAMA's
``LossSpec.private_context``, what the DP step does) or estimate the gap from data it may
use (public, or privatised).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from dpalign.losses.base import LossOut, PairLogps, reward_metrics
from dpalign.losses.dpo import log_ratio_margin
from dpalign.losses.params import LossParams

MIN_BETA = 1e-3


def dama_alpha_data(hardness: Tensor, hardness_mean: float = 0.5,
                    data_scale: float = 1.0) -> Tensor:
    """(B,) data-aware factor from hardness (B,) in [0, 1]; 1 where hardness == hardness_mean."""
    inv_sigmoid_mean = 1.0 + math.exp(-data_scale * (1.0 - hardness_mean))  # 1 / sigmoid(delta_bar)
    return torch.sigmoid(data_scale * (1.0 - hardness)) * inv_sigmoid_mean


def dama_batch_gap(policy: PairLogps, ref: PairLogps) -> Tensor:
    """() the batch's mean log-ratio margin R_B, detached."""
    return log_ratio_margin(policy, ref).detach().mean()


def dama_alpha_model(batch_gap: float | Tensor, running_mean: float | Tensor | None) -> Tensor:
    """() model-aware factor sigmoid(R_B) / sigmoid(R_bar); a missing R_bar counts as 0."""
    gap = torch.as_tensor(batch_gap).detach()
    if not gap.is_floating_point():
        gap = gap.to(torch.get_default_dtype())
    bar = torch.as_tensor(0.0 if running_mean is None else running_mean, dtype=gap.dtype)
    return torch.sigmoid(gap) / torch.sigmoid(bar.to(gap.device))


def update_running_mean(running_mean: float | None, batch_gap: float | Tensor,
                        momentum: float = 0.9) -> float:
    """R_bar <- momentum * R_bar + (1 - momentum) * R_B, with R_bar = 0 before the first step.

    Called by the training loop after the step, outside any vmap (it returns a Python float).
    """
    previous = 0.0 if running_mean is None else float(running_mean)
    return momentum * previous + (1.0 - momentum) * float(batch_gap)


def dama_context(policy: PairLogps, ref: PairLogps, running_mean: float | None,
                 params: DamaParams) -> tuple[dict[str, Any], float]:
    """DAMA's batch context: ``{"alpha_model": ()}`` from the whole batch's policy and
    reference log-probs (each (B,)) and R_bar (``running_mean``), and R_bar advanced by the
    batch's gap with ``params.momentum``."""
    gap = dama_batch_gap(policy, ref)
    alpha = dama_alpha_model(gap, running_mean)
    return {"alpha_model": alpha}, update_running_mean(running_mean, gap, params.momentum)


def dama(policy: PairLogps, ref: PairLogps, *, beta: float, hardness: Tensor,
         alpha_model: float | Tensor = 1.0, hardness_mean: float = 0.5,
         data_scale: float = 1.0) -> LossOut:
    """Per-pair DAMA loss, shape (B,).

    hardness: (B,) in [0, 1]. alpha_model: a scalar (float or 0-d tensor) from
    ``dama_alpha_model``. Metrics add ``alpha_data`` and ``beta_i``, each (B,).
    """
    margin = log_ratio_margin(policy, ref)
    alpha_data = dama_alpha_data(hardness, hardness_mean, data_scale).to(margin.dtype)
    alpha_m = torch.as_tensor(alpha_model, dtype=margin.dtype, device=margin.device)
    beta_i = (beta * alpha_data * alpha_m).detach().clamp(min=MIN_BETA)
    losses = -F.logsigmoid(beta_i * margin)
    metrics = reward_metrics(policy, ref, beta)
    metrics["alpha_data"] = alpha_data.detach()
    metrics["beta_i"] = beta_i
    return LossOut(losses, metrics)


class DamaParams(LossParams):
    """DAMA's hyper-parameters. ``momentum`` configures ``dama_context``'s running mean;
    the others are keyword arguments of ``dama``."""

    hardness_mean: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    data_scale: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, allow_inf_nan=False)
