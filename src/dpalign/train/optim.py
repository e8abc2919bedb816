"""Optimizers by name and the learning-rate schedule (transformers' ``get_scheduler``), and
the ``optim`` section of a training config that chooses them.

``dpadam_bc`` is DP-AdamBC (Tang, Shpilevskiy and Lecuyer, AAAI 2024, "DP-AdamBC: Your
DP-Adam Is Actually DP-SGD (Unless You Apply Bias Correction)"): AdamW whose bias-corrected
second moment has the DP noise variance phi = (sigma_g C_t / B)^2 subtracted and is floored
at gamma' (``optim.eps_floor``) before the square root (``adam_bc_update``). phi reaches it
each step from the DP step's metrics row (``dp_noise_variance``) through ``set_noise_variance``
(called by ``Session.step``), stored in its param groups; without DP it is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import Field, field_validator
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType

from dpalign.config import Section, one_of

Params = Iterable[torch.nn.Parameter]
Tensor = torch.Tensor

NOISE_VARIANCE_KEY = "noise_variance"  # param-group key of the optimizers that take phi
# gamma': our default, Adam's usual eps (the paper treats gamma' as a hyperparameter). Where
# v_hat < phi (noise-dominated coordinates) the step is lr m_hat / sqrt(gamma'), so gamma'
# must be set on the scale of phi = (sigma_g C / B)^2 when B is small (e.g. 1e-2 at B = 4).
DEFAULT_EPS_FLOOR = 1e-8


def adam_bc_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                   step: int, *, lr: float, betas: tuple[float, float], weight_decay: float,
                   noise_variance: float, eps_floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """One DP-AdamBC update of one parameter (all tensors the same shape, ``step`` >= 1
    the number of this update): returns new (param, exp_avg, exp_avg_sq); nothing in place.

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)
        param = param (1 - lr wd) - lr m_hat / sqrt(max(v_hat - phi, eps_floor))

    with phi = ``noise_variance`` (decoupled weight decay as AdamW). With phi = 0 this is
    AdamW except that AdamW divides by sqrt(v_hat) + eps instead (relative difference
    ~ eps / sqrt(v_hat) where v_hat >= eps_floor)."""
    beta1, beta2 = betas
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    m_hat = exp_avg / (1 - beta1 ** step)
    v_hat = exp_avg_sq / (1 - beta2 ** step)
    denom = (v_hat - noise_variance).clamp(min=eps_floor).sqrt()
    return param * (1 - lr * weight_decay) - lr * m_hat / denom, exp_avg, exp_avg_sq


class DPAdamBC(torch.optim.Optimizer):
    """DP-AdamBC over ``adam_bc_update``; each param group's ``noise_variance`` is phi
    (set per step by ``set_noise_variance``; 0 = plain AdamW with the floor)."""

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 eps_floor: float = DEFAULT_EPS_FLOOR, noise_variance: float = 0.0) -> None:
        if not eps_floor > 0:
            raise ValueError(f"eps_floor must be > 0, got {eps_floor}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                                  "eps_floor": eps_floor, NOISE_VARIANCE_KEY: noise_variance})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                new, state["exp_avg"], state["exp_avg_sq"] = adam_bc_update(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                    lr=group["lr"], betas=tuple(group["betas"]),
                    weight_decay=group["weight_decay"],
                    noise_variance=group[NOISE_VARIANCE_KEY], eps_floor=group["eps_floor"])
                p.copy_(new)
        return loss


def set_noise_variance(optimizer: torch.optim.Optimizer, variance: float) -> None:
    """Give phi (the DP noise variance per coordinate of the mean gradient, 0 without DP)
    to every param group that takes it; other optimizers are left as they are."""
    if not (variance >= 0 and math.isfinite(variance)):
        raise ValueError(f"noise variance must be finite and >= 0, got {variance}")
    for group in optimizer.param_groups:
        if NOISE_VARIANCE_KEY in group:
            group[NOISE_VARIANCE_KEY] = variance


OPTIMIZERS: dict[str, Callable[[Params, OptimConfig], torch.optim.Optimizer]] = {
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum,
                                             weight_decay=c.weight_decay),
    "dpadam_bc": lambda params, c: DPAdamBC(params, lr=c.lr, weight_decay=c.weight_decay,
                                            eps_floor=c.eps_floor),
}


class OptimConfig(Section):
    name: str = Field("adamw", description="adamw | sgd | dpadam_bc (DP-AdamBC: the DP noise "
                                           "variance taken out of Adam's second moment)")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (decoupled for adamw and "
                                                       "dpadam_bc)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum (unused by the others)")
    schedule: str = Field("cosine", description="a transformers scheduler over the run's steps: "
                                                "cosine, linear, constant, "
                                                "constant_with_warmup, ...")
    warmup_steps: int = Field(0, ge=0, description="warmup steps of the schedule (linear from "
                                                   "0 to lr; constant has none)")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="without DP-SGD: clip the gradient's total norm to this (None "
                               "= no clipping); DP-SGD clips to privacy.max_grad_norm instead")
    eps_floor: float = Field(DEFAULT_EPS_FLOOR, gt=0,
                             description="dpadam_bc: floor gamma' of v_hat - phi")

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        return one_of("optimizer", name, OPTIMIZERS)

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        return one_of("schedule", name, [s.value for s in SchedulerType])


def build_optimizer(params: Params, cfg: OptimConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = OPTIMIZERS[cfg.name](params, cfg)
    schedule = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=total_steps)
    return optimizer, schedule
