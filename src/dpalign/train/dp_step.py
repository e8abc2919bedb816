"""The DP-SGD step of a run: sample units, per-pair gradients, clip, noise, update.

Each step samples units with the run's ``PrivacyPlan`` (Poisson by default, possibly none),
computes each pair's gradient of its own total loss, sums the pairs of one user when the
unit is the user, clips every unit to C, adds N(0, sigma^2 C^2) once, divides by the
expected batch and returns the state with the step recorded in its ledger (saved in every
checkpoint). Batches and noise are functions of (seed, step), so resume is exact. The plan,
the noise and the data-parallel helpers are ``dpalign.privacy.plan``; the clipping rule
(``privacy.clipping``: fixed, adaptive, automatic) is ``dpalign.privacy.clipping``. Adaptive
clipping's C_t lives in the ``LoopState`` (so in checkpoints) and its noisy count is drawn
from a stream of its own, so fixed clipping draws exactly the noise it always did.

Each row logs ``dp_clip_norm`` (the C used), ``dp_noise_variance`` (the per-coordinate
variance (grad_sigma C / B)^2 of the noise in the mean gradient, which DP-AdamBC subtracts;
``Session.step`` hands it to the optimizer) and, for adaptive clipping,
``dp_unclipped_estimate`` (b_t, from which C_{t+1} follows).

Under ``torch.distributed`` every rank draws the same sample, takes every world-size-th unit
and clips its units; the clipped sums are all-reduced and rank 0 adds the noise once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpalign.losses.base import LossOut, PairLogps
from dpalign.losses.objective import Objective
from dpalign.models.pairs import EncodedPair
from dpalign.privacy.clipping import CLIPPING, next_clip_norm
from dpalign.privacy.dp_sgd import empty_units, group_by_unit, step_diagnostics
from dpalign.privacy.per_pair import Engine
from dpalign.privacy.plan import (
    PrivacyPlan,
    all_reduce_units,
    noisy_count_once,
    noisy_once,
    rank_and_world,
    spent_epsilon,
)
from dpalign.train.config import TrainConfig
from dpalign.train.state import LoopState
from dpalign.train.step import chunk_batches


def chunked_grads(engine: Engine, pairs: Sequence[EncodedPair], idx: list[int], ref: PairLogps,
                  objective: Objective, pad_id: int, micro_batch: int | None
                  ) -> tuple[dict[str, torch.Tensor], LossOut]:
    """Per-pair gradients ``{name: (B, *shape)}`` and the ``LossOut`` of pairs ``idx``
    (B = len(idx)), from ``engine`` run on consecutive chunks of at most ``micro_batch``
    pairs. A pair's gradient depends on that pair alone, so the chunks give the same rows as
    one batch; only the memory of one chunk's forward and backward is needed at a time."""
    # A batch context mixes pairs of one batch; under DP the loss takes its private one.
    context = objective.spec.private_context
    parts = [engine(batch, batch_ref, objective, batch.hardness, **context)
             for batch, batch_ref in chunk_batches(pairs, idx, ref, pad_id, size=micro_batch,
                                                   with_corrupt=objective.spec.needs_corrupt)]
    grads = {name: torch.cat([g[name] for g, _ in parts]) for name in engine.params}
    return grads, LossOut.cat([out for _, out in parts])


def noise_variance(sigma: float, clip_norm: float, expected_batch: float) -> float:
    """(sigma C / B)^2: the variance of each coordinate of the noise in the mean gradient
    (0 when sigma = 0, also with C = inf)."""
    return 0.0 if sigma == 0 else (sigma * clip_norm / expected_batch) ** 2


@dataclass(frozen=True)
class DPStep:
    """The DP step: ``.grad`` of the trainable parameters set to the noisy clipped mean of
    the sampled ``units`` (pair indices of each privacy unit); ``total`` is the planned
    steps (epsilon is accounted every ``privacy.account_every`` steps and at the last)."""

    cfg: TrainConfig
    engine: Engine
    pairs: list[EncodedPair]
    ref: PairLogps
    objective: Objective
    units: list[list[int]]
    plan: PrivacyPlan
    pad_id: int
    total: int

    def __call__(self, step: int, state: LoopState) -> tuple[dict[str, Any], LoopState]:
        """Set ``.grad`` for batch ``step`` (1-based); the metrics row and the new state
        (one more step in its ledger). The per-pair gradients are taken
        ``train.micro_batch_size`` pairs at a time."""
        privacy = self.cfg.privacy
        rule = CLIPPING[privacy.clipping]
        clip_norm = privacy.max_grad_norm if state.clip_norm is None else state.clip_norm
        sampled = self.plan.sample(privacy, self.cfg.train.seed, step)
        grads, metrics = self._unit_grads(sampled)
        clipped, norms = rule.clip(grads, clip_norm, privacy.auto_gamma)
        if rank_and_world()[1] > 1:
            clipped, norms = all_reduce_units(clipped, norms)
        noisy = noisy_once(clipped, self.plan, privacy, step, clip_norm)
        for name, param in self.engine.params.items():
            param.grad = noisy[name].to(param.dtype)
        ledger = state.ledger.append(self.plan.entry(privacy))
        sigma = self.plan.gradient_sigma
        diag = step_diagnostics(clipped, norms, sigma, clip_norm, self.plan.expected_batch)
        adaptive: dict[str, float] = {}
        next_norm = state.clip_norm
        if rule.adapts:
            unclipped = noisy_count_once(norms, clip_norm, self.plan, privacy, step)
            next_norm = next_clip_norm(clip_norm, unclipped, privacy.target_quantile,
                                       privacy.clip_lr)
            adaptive = {"dp_unclipped_estimate": unclipped}
        accounted = step % privacy.account_every == 0 or step == self.total
        row = {**metrics, "pairs": sum(len(self.units[u]) for u in sampled),
               **{f"dp_{k}": (None if isinstance(v, float) and math.isnan(v) else v)
                  for k, v in diag.as_dict().items()},
               "dp_clip_norm": clip_norm, **adaptive,
               "dp_noise_variance": noise_variance(sigma, clip_norm, self.plan.expected_batch),
               "epsilon": spent_epsilon(ledger, privacy) if accounted else None}
        return row, dataclasses.replace(state, ledger=ledger, clip_norm=next_norm)

    def _unit_grads(self, sampled: list[int]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
        """This rank's share of the sampled units (data parallel: every world-size-th):
        their gradients ``{name: (U, *shape)}`` (U pairs, or U users when the unit is the
        user) and the loss metrics of their pairs (``loss`` None when there are none)."""
        rank, world = rank_and_world()
        mine = sampled[rank::world]
        idx = [i for u in mine for i in self.units[u]]
        if not idx:
            return empty_units(self.engine.params), {"loss": None}
        grads, out = chunked_grads(self.engine, self.pairs, idx, self.ref, self.objective,
                                   self.pad_id, self.cfg.train.micro_batch_size)
        if self.cfg.privacy.unit == "user":
            grads, _ = group_by_unit(grads, [u for u in mine for _ in self.units[u]])
        return grads, {"loss": float(out.per_example.mean()),
                       **{k: float(v.float().mean()) for k, v in out.metrics.items()}}
