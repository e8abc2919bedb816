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

Audit canaries (``dpalign.audit``; ``canaries`` None in every other run) join the step as
extra units: *input* canaries are extra pairs (indices past the training pairs) whose
gradients come from the same engine and clipping as any pair; *gradient* canaries are Dirac
units in an audit vector of their own (one coordinate each, no real gradient there), clipped
by the run's rule and released with noise N(0, (grad_sigma C)^2) from the step's
``AUDIT_STREAM``: the same mechanism as the weights' coordinates, drawn apart so that the
weights' noise, and so the trained model, are those of the run without canaries (adaptive
clipping counts them among the unclipped units like any unit, so there C_t moves). The
released audit vector is summed into ``LoopState.audit`` (checkpointed). The clipping, the
noise and the per-unit gradients are methods, so ``dpalign.audit.faults`` can break one
at a time (test-only, unreachable from the CLI).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dpalign.data.schema import PreferenceRecord
from dpalign.losses.base import LossOut, PairLogps
from dpalign.losses.objective import Objective
from dpalign.models.pairs import EncodedPair
from dpalign.online.source import OfflinePairs, PairSource
from dpalign.privacy.clipping import CLIPPING, next_clip_norm
from dpalign.privacy.dp_sgd import empty_units, step_diagnostics, sum_into_units
from dpalign.privacy.per_pair import Engine
from dpalign.privacy.plan import (
    AUDIT_STREAM,
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
class CanaryDraw:
    """The audit canaries sampled for one step.

    ``pairs``: the input canaries' units, each a list of indices into the canary records
    (``Canaries.records``); ``dirac``: (U, k) the magnitudes of the k rows of each sampled
    gradient canary (a unit's gradient is its rows summed: ``dirac.sum(1)`` times the unit
    vector of its coordinate), ``coords``: (U,) those coordinates in the audit vector."""

    pairs: list[list[int]] = field(default_factory=list)
    dirac: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, dtype=torch.float64))
    coords: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


class Canaries(Protocol):
    """What a DP step needs of an audit's canaries (``dpalign.audit.canaries``).

    ``records``: input canaries, encoded after the training pairs (empty for gradient
    canaries); ``size``: the audit vector's length (0 for input canaries); ``draw(step, C)``
    the canaries of batch ``step`` (1-based); ``dp_step``: the DP step class to run
    (``DPStep``, or a deliberately broken one from ``dpalign.audit.faults`` in tests)."""

    records: Sequence[PreferenceRecord]
    size: int
    dp_step: type[DPStep]

    def draw(self, step: int, clip_norm: float) -> CanaryDraw: ...


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
    canaries: Canaries | None = None
    source: PairSource | None = None

    def __call__(self, step: int, state: LoopState) -> tuple[dict[str, Any], LoopState]:
        """Set ``.grad`` for batch ``step`` (1-based); the metrics row and the new state
        (one more step in its ledger). The per-pair gradients are taken
        ``train.micro_batch_size`` pairs at a time."""
        privacy = self.cfg.privacy
        clip_norm = privacy.max_grad_norm if state.clip_norm is None else state.clip_norm
        sampled = self.plan.sample(privacy, self.cfg.train.seed, step)
        draw = self.canaries.draw(step, clip_norm) if self.canaries else CanaryDraw()
        grads, metrics = self._unit_grads(step, sampled, draw.pairs)
        clipped, norms = self._clip(grads, clip_norm)
        if rank_and_world()[1] > 1:
            clipped, norms = all_reduce_units(clipped, norms)
        noisy = self._noise(clipped, step, clip_norm)
        for name, param in self.engine.params.items():
            param.grad = noisy[name].to(param.dtype)
        audit, dirac_norms = self._release_dirac(draw, step, clip_norm, state.audit)
        ledger = state.ledger.append(self.plan.entry(privacy))
        sigma = self.plan.gradient_sigma
        diag = step_diagnostics(clipped, norms, sigma, clip_norm, self.plan.expected_batch)
        adaptive: dict[str, float] = {}
        next_norm = state.clip_norm
        if CLIPPING[privacy.clipping].adapts:
            unclipped = noisy_count_once(torch.cat([norms, dirac_norms]), clip_norm, self.plan,
                                         privacy, step)
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
        if self.canaries:
            row["audit_canaries"] = len(draw.pairs) + len(draw.coords)
        return row, dataclasses.replace(state, ledger=ledger, clip_norm=next_norm, audit=audit)

    def _clip(self, grads: dict[str, torch.Tensor], clip_norm: float
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The run's clipping rule on units ``{name: (U, *shape)}``: clipped, norms (U,)."""
        return CLIPPING[self.cfg.privacy.clipping].clip(grads, clip_norm,
                                                        self.cfg.privacy.auto_gamma)

    def _noise(self, clipped: dict[str, torch.Tensor], step: int, clip_norm: float,
               stream: int = 0) -> dict[str, torch.Tensor]:
        """The noisy mean ``{name: shape}`` of clipped units ``{name: (U, *shape)}``: noise
        N(0, (grad_sigma C)^2) per coordinate from the step's generator ``stream``."""
        return noisy_once(clipped, self.plan, self.cfg.privacy, step, clip_norm, stream)

    def _dirac_units(self, draw: CanaryDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient canaries as units: (N,) magnitudes and (N,) coordinates, one unit
        per canary (its rows summed)."""
        return draw.dirac.sum(dim=1), draw.coords

    def _release_dirac(self, draw: CanaryDraw, step: int, clip_norm: float,
                       audit: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Clip the gradient canaries with the run's rule, sum them into the audit vector,
        add the step's audit noise and add the release to ``audit`` (float64, (size,)).
        A Dirac unit a e_i is clipped as the one-coordinate unit (a,): its norm is |a|, so
        the rule sees exactly the norm of the full vector. Returns the new running sum (None
        without gradient canaries) and the canaries' pre-clip norms (N,)."""
        size = self.canaries.size if self.canaries else 0
        if not size:
            return audit, torch.zeros(0, dtype=torch.float64)
        values, coords = self._dirac_units(draw)
        clipped, norms = self._clip({"audit": values.view(-1, 1).float()}, clip_norm)
        total = torch.zeros(1, size).index_add_(1, coords, clipped["audit"].view(1, -1))
        released = self._noise({"audit": total}, step, clip_norm, AUDIT_STREAM)["audit"]
        start = torch.zeros(size, dtype=torch.float64) if audit is None else audit
        return start + released.double(), norms

    def _unit_grads(self, step: int, sampled: list[int],
                    canary_units: list[list[int]] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's share of the sampled units (data parallel: every world-size-th):
        their gradients ``{name: (U, *shape)}`` (U pairs, or U users when the unit is the
        user) and the loss metrics of their pairs (``loss`` None when there are none).
        ``canary_units`` (input canaries, indices into the canary records, which follow the
        training pairs) join after them; the metrics are of the training pairs alone. The
        pairs come from the step's ``source`` (online / mixed DPO make them now); a unit
        that got no pair (an online tie) has a zero gradient."""
        rank, world = rank_and_world()
        mine = [self.units[u] for u in sampled[rank::world]]
        offset = len(self.pairs) - len(self.canaries.records) if self.canaries else 0
        canaries = [[offset + i for i in unit] for unit in (canary_units or [])]
        got = self.pair_source(step, mine + canaries)
        idx = [i for unit in got.groups for i in unit]
        if not idx:
            return (empty_units(self.engine.params, len(got.groups)),
                    {"loss": None, **got.metrics})
        grads, out = chunked_grads(self.engine, got.pairs, idx, got.ref, self.objective,
                                   self.pad_id, self.cfg.train.micro_batch_size)
        if any(len(unit) != 1 for unit in got.groups):  # users, or units without a pair
            grads = sum_into_units(grads, [u for u, unit in enumerate(got.groups)
                                           for _ in unit], len(got.groups))
        real = sum(len(unit) for unit in got.groups[:len(mine)])
        if not real:
            return grads, {"loss": None, **got.metrics}
        return grads, {"loss": float(out.per_example[:real].mean()),
                       **{k: float(v[:real].float().mean()) for k, v in out.metrics.items()},
                       **got.metrics}

    @property
    def pair_source(self) -> PairSource:
        """Where the step's pairs come from: ``source``, else the recorded pairs."""
        return self.source or OfflinePairs(self.pairs, self.ref)
