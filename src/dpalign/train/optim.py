"""Optimizers by name and the learning-rate schedule (transformers' ``get_scheduler``), and
the ``optim`` section of a training config that chooses them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from pydantic import Field, field_validator
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType

from dpalign.config import Section, one_of

Params = Iterable[torch.nn.Parameter]

OPTIMIZERS: dict[str, Callable[[Params, OptimConfig], torch.optim.Optimizer]] = {
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum,
                                             weight_decay=c.weight_decay),
}


class OptimConfig(Section):
    name: str = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)

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
