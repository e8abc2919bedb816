"""A step's batches in chunks (pairs collated a micro-batch at a time, with their reference
log-probs) and the plain, non-DP step's gradients (the loss and its metrics are
``dpalign.losses.objective``; the DP step is ``dpalign.train.dp_step``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpalign.data.sampling import batch_indices, steps_per_epoch
from dpalign.losses.base import LossOut, PairLogps
from dpalign.losses.objective import Objective, pair_logps, step_metrics
from dpalign.models.pairs import EncodedPair, PairBatch, collate
from dpalign.online.source import OfflinePairs, PairSource
from dpalign.train.config import TrainConfig
from dpalign.train.state import LoopState


def chunks(n: int, size: int | None) -> list[slice]:
    """``range(n)`` cut into consecutive slices of at most ``size`` (one slice when None)."""
    size = size or max(n, 1)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def chunk_batches(pairs: Sequence[EncodedPair], idx: list[int], ref: PairLogps, pad_id: int, *,
                  with_corrupt: bool, size: int | None) -> list[tuple[PairBatch, PairLogps]]:
    """Pairs ``idx`` collated ``size`` at a time (``chunks``), each chunk with the reference
    log-probs of its pairs (``ref`` holds every pair's, indexed like ``pairs``)."""
    return [(collate([pairs[i] for i in idx[part]], pad_id, with_corrupt=with_corrupt),
             ref.index(torch.tensor(idx[part]))) for part in chunks(len(idx), size)]


@dataclass(frozen=True)
class PlainStep:
    """The non-DP step: the backward of the batch-mean loss (``train.micro_batch_size``
    pairs at a time, the gradients summed), clipped to ``optim.max_grad_norm``. A loss with
    a batch context (DAMA) gets it from the whole batch's policy log-probs."""

    cfg: TrainConfig
    model: torch.nn.Module
    pairs: list[EncodedPair]
    ref: PairLogps
    objective: Objective
    params: list[torch.nn.Parameter]
    pad_id: int
    source: PairSource | None = None

    def __call__(self, step: int, state: LoopState) -> tuple[dict[str, Any], LoopState]:
        """Set ``.grad`` for batch ``step`` (1-based); the metrics row and the new state.
        The pairs come from ``source`` (online / mixed DPO make them now; default: the
        recorded pairs); a batch entry that got no pair (an online tie) adds nothing to
        the loss, which stays divided by the batch size."""
        cfg, objective = self.cfg, self.objective
        drawn = batch_indices(len(self.pairs), cfg.train.batch_size, cfg.train.seed, step - 1)
        got = (self.source or OfflinePairs(self.pairs, self.ref))(step, [[i] for i in drawn])
        epoch = (step - 1) // steps_per_epoch(len(self.pairs), cfg.train.batch_size)
        idx = [i for unit in got.groups for i in unit]
        if not idx:
            return ({"epoch": epoch, "loss": None, **got.metrics, "grad_norm": 0.0},
                    LoopState(state.loss_state, state.ledger))
        parts = chunk_batches(got.pairs, idx, got.ref, self.pad_id,
                              with_corrupt=objective.spec.needs_corrupt,
                              size=cfg.train.micro_batch_size)
        batch_ref = got.ref.index(torch.tensor(idx))
        first = pair_logps(self.model, parts[0][0])
        context, loss_state = (self._context(first, [b for b, _ in parts[1:]], batch_ref,
                                             state.loss_state)
                               if objective.has_batch_context else ({}, state.loss_state))
        results, policies = [], []
        for k, (batch, part_ref) in enumerate(parts):
            policy = first if k == 0 else pair_logps(self.model, batch)
            result = objective(policy, part_ref, hardness=batch.hardness, **context)
            (result.per_example.sum() / len(drawn)).backward()
            results.append(LossOut(result.per_example.detach(), result.metrics))
            policies.append(policy.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params,
                                                   cfg.optim.max_grad_norm or math.inf)
        row = {"epoch": epoch,
               **step_metrics(LossOut.cat(results), PairLogps.cat(policies), batch_ref,
                              kl=objective.spec.logs_kl),
               **got.metrics, "grad_norm": float(grad_norm)}
        return row, LoopState(loss_state, state.ledger)

    def _context(self, first: PairLogps, rest: list[PairBatch], batch_ref: PairLogps,
                 loss_state: Any) -> tuple[dict[str, Any], Any]:
        """The loss's batch context from the whole batch (``first`` chunk's policy
        log-probs, the ``rest`` taken without a graph; ``batch_ref`` the whole batch's)."""
        with torch.no_grad():
            later = [pair_logps(self.model, batch) for batch in rest]
        return self.objective.batch_context(PairLogps.cat([first.detach(), *later]), batch_ref,
                                            loss_state)
