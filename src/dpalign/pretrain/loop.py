"""What every pretraining stage shares: the run it trains, and the supervised loop.

``optimise`` is the one loop (loss, backward, optional clipping, optimiser and schedule
step, zero grads); ``supervised`` wraps it the way the language-model stages train
(AdamW, cosine schedule with warm-up, gradient clipping, loss EMA, a row every
``log_every`` steps, a progress bar). The vision-side stages (``vision_warmup``) call
``optimise`` directly: plain AdamW, a row every step. ``shuffled_batches``: the index
batches of an epoch-wise shuffle, as the language-model stages draw them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import ProcessorMixin, get_cosine_schedule_with_warmup

from dpalign.progress import make_progress
from dpalign.world.load import World

Log = Callable[[dict[str, float]], None]


@dataclass
class PretrainRun:
    """What the stages of a preset share: they train ``model`` (a stage may replace it, e.g.
    by merging adapters), append ``log`` rows and fill ``summary`` (``pretrain.json``)."""

    model: nn.Module
    processor: ProcessorMixin
    world: World
    cfg: Any
    data: Any
    gen: torch.Generator
    start: float
    on_log: Log | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.processor.tokenizer.pad_token_id  # type: ignore[attr-defined]


Stage = Callable[[PretrainRun], None]


def shuffled_batches(n: int, batch_size: int, steps: int,
                     gen: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of ``batch_size``, reshuffling at each epoch boundary."""
    order = torch.randperm(n, generator=gen)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield order[cursor:cursor + batch_size]
        cursor += batch_size


@dataclass(frozen=True)
class Step:
    """One optimiser step: its number (from 1), loss, gradient norm before clipping (None
    without clipping) and whatever else ``loss_of`` returned (None if only the loss)."""

    step: int
    loss: float
    grad_norm: float | None
    aux: Any


def optimise(params: list[nn.Parameter], optim: torch.optim.Optimizer, batches: Iterable[Tensor],
             loss_of: Callable[[Tensor], Tensor | tuple[Tensor, Any]], *,
             sched: torch.optim.lr_scheduler.LRScheduler | None = None,
             max_grad_norm: float | None = None) -> Iterator[Step]:
    """One step per batch of indices: ``loss_of(idx)`` (a loss, or ``(loss, aux)``),
    backward, clip ``params`` to ``max_grad_norm`` (if given), optimiser step, schedule
    step (if given), gradients dropped. Yields each step after it is taken."""
    for step, idx in enumerate(batches, 1):
        out = loss_of(idx)
        loss, aux = out if isinstance(out, tuple) else (out, None)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                     if max_grad_norm is not None else None)
        optim.step()
        if sched is not None:
            sched.step()
        optim.zero_grad(set_to_none=True)
        yield Step(step, float(loss.detach()),
                   None if grad_norm is None else float(grad_norm), aux)


@dataclass(frozen=True)
class Supervised:
    """The logged rows of a ``supervised`` loop, its last loss EMA, and its trainable size."""

    rows: list[dict[str, Any]]
    loss_ema: float
    trainable_parameters: int


def supervised(model: nn.Module, batches: Iterable[Tensor], loss_of: Callable[[Tensor], Tensor],
               *, name: str, steps: int, lr: float, weight_decay: float, warmup_steps: int,
               max_grad_norm: float, log_every: int, start: float,
               tags: dict[str, Any] | None = None, on_log: Log | None = None) -> Supervised:
    """``steps`` AdamW steps on the parameters of ``model`` that require grad (cosine
    schedule after ``warmup_steps``, gradients clipped to ``max_grad_norm``), ``model`` in
    train mode meanwhile. A row (``tags`` first, then step, loss, loss EMA, grad norm, lr,
    seconds since ``start``) on step 1, every ``log_every`` steps and the last step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(optim, warmup_steps, steps)
    rows: list[dict[str, Any]] = []
    running = math.nan
    with make_progress() as bar:
        task = bar.add_task(name, total=steps, info="")
        for s in optimise(params, optim, batches, loss_of, sched=sched,
                          max_grad_norm=max_grad_norm):
            running = s.loss if math.isnan(running) else 0.95 * running + 0.05 * s.loss
            if s.step == 1 or s.step % log_every == 0 or s.step == steps:
                row = {**(tags or {}), "step": s.step, "loss": s.loss, "loss_ema": running,
                       "grad_norm": s.grad_norm, "lr": sched.get_last_lr()[0],
                       "time": time.perf_counter() - start}
                rows.append(row)
                if on_log:
                    on_log(row)
            bar.update(task, advance=1, info=f"loss {running:.3f}")
    model.eval()
    return Supervised(rows, running, sum(p.numel() for p in params))
