"""Deliberately broken DP steps, for tests of the audit only.

Each is a ``DPStep`` with one part done the way people get it wrong; ``dpalign audit`` and
the configs cannot reach them (``run_audit(..., fault=NAME)`` from Python only). An audit of
a run with one of them must find a lower bound above the claimed epsilon; see
``tests/audit``.

- ``separate_rows``: chosen and rejected rows clipped as separate samples (what a per-row
  engine such as Opacus does to a batch of pairs): a pair's clipped gradient can reach 2C.
  A training pair's rows are the gradients through its chosen and through its rejected
  log-probs alone (``RowObjective``), which sum to the pair's gradient; a gradient
  canary's rows are its ``rows`` Dirac rows.
- ``half_noise``: noise N(0, (sigma C / 2)^2) instead of N(0, (sigma C)^2).
- ``no_clip``: every unit goes through unclipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpalign.losses.base import LossOut, PairLogps
from dpalign.losses.objective import Objective
from dpalign.privacy.dp_sgd import empty_units, per_unit_norms
from dpalign.train.dp_step import CanaryDraw, DPStep, chunked_grads

ROWS = ("chosen", "rejected", "chosen_corrupt")


@dataclass(frozen=True)
class RowObjective(Objective):
    """The objective with the gradient flowing through one row of each pair only: the
    policy's log-probs of the other rows are detached (``row`` one of ``ROWS``)."""

    row: str = "chosen"

    def __call__(self, policy: PairLogps, ref: PairLogps, **kwargs: object) -> LossOut:
        detached = {name: getattr(policy, name).detach() for name in ROWS
                    if name != self.row and getattr(policy, name) is not None}
        return super().__call__(dataclasses.replace(policy, **detached), ref, **kwargs)


@dataclass(frozen=True)
class SeparateRows(DPStep):
    """Rows, not pairs, as the clipped units (see the module doc; example-level units)."""

    def _unit_grads(self, step: int, sampled: list[int],
                    canary_units: list[list[int]] | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        _, metrics = super()._unit_grads(step, sampled, canary_units)
        offset = len(self.pairs) - len(self.canaries.records) if self.canaries else 0
        idx = [i for u in sampled for i in self.units[u]]
        idx += [offset + i for unit in (canary_units or []) for i in unit]
        if not idx:
            return empty_units(self.engine.params), metrics
        fields = {f.name: getattr(self.objective, f.name)
                  for f in dataclasses.fields(Objective)}
        rows = ROWS[:3 if self.objective.spec.needs_corrupt else 2]
        parts = [chunked_grads(self.engine, self.pairs, idx, self.ref,
                               RowObjective(**fields, row=row), self.pad_id,
                               self.cfg.train.micro_batch_size)[0] for row in rows]
        return {name: torch.cat([p[name] for p in parts]) for name in self.engine.params}, metrics

    def _dirac_units(self, draw: CanaryDraw) -> tuple[Tensor, Tensor]:
        rows = draw.dirac.shape[1]
        return draw.dirac.T.reshape(-1), draw.coords.repeat(rows)


@dataclass(frozen=True)
class HalfNoise(DPStep):
    """Noise of std sigma C / 2."""

    def _noise(self, clipped: dict[str, Tensor], step: int, clip_norm: float,
               stream: int = 0) -> dict[str, Tensor]:
        return super()._noise(clipped, step, clip_norm / 2, stream)


@dataclass(frozen=True)
class NoClip(DPStep):
    """No clipping at all."""

    def _clip(self, grads: dict[str, Tensor], clip_norm: float
              ) -> tuple[dict[str, Tensor], Tensor]:
        return {name: g.detach() for name, g in grads.items()}, per_unit_norms(grads)


FAULTS: dict[str, type[DPStep]] = {
    "separate_rows": SeparateRows,
    "half_noise": HalfNoise,
    "no_clip": NoClip,
}
