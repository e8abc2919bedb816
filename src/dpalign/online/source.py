"""Where a step's preference pairs come from: the file (offline), the policy (online), or
both (mixed).

A training step samples privacy units (groups of record indices) and asks its
``PairSource`` for their pairs. ``OfflinePairs`` returns the encoded records with their
cached reference log-probs. ``OnlinePairs`` samples ``online.samples`` answers for each
record's prompt and image from the current policy (seeded by the run's seed and the step, so
a resumed run regenerates them exactly), scores them with the judge and makes the pair
(chosen = best, rejected = worst); a record whose answers all tie gives no pair (its unit
contributes a zero gradient). With ``method: mixed`` each record index of a step is used
offline with probability ``online.offline_fraction`` (a coin of its own per (seed, step,
index), independent of the data), else online.

Privacy (the argument, DESIGN §2 one level on). The unit is still the private record (or
the user): Poisson sampling over records is unchanged, and everything a record's term of the
step depends on -- the prompt and image, the answers (drawn from the policy of the previous
step, itself a DP release, with public randomness), the judge's reading of *that* record's
ground truth, the pair, its loss and gradient -- is a function of that record and of public
or already-released state alone. Adding or removing one record changes one term of the sum,
which is clipped to C with all of the record's pairs together; so each step is the same
subsampled Gaussian mechanism as offline DP-SGD and the ledger accounts it the same way.
Generation itself reads no other record and releases nothing: it is post-processing of the
released weights. A record that gives no pair contributes 0, also within C.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from transformers import ProcessorMixin

from dpalign.data.schema import PreferenceRecord
from dpalign.losses.base import PairLogps
from dpalign.models.pairs import EncodedPair, encode_pairs
from dpalign.online.config import OnlineConfig
from dpalign.online.generate import Query, sample
from dpalign.online.judge import Judge, rank

Reference = Callable[[list[EncodedPair]], PairLogps]
"""Reference log-probs (each field (N,)) of freshly made pairs."""

ONLINE_COIN = 7  # the stream of mixed DPO's offline/online coins


@dataclass(frozen=True)
class StepPairs:
    """A step's pairs: ``pairs`` with their reference log-probs ``ref`` (each field
    (len(pairs),)); ``groups`` the units as indices into ``pairs`` (a unit whose records
    gave no pair is an empty list); ``metrics`` for the step's row."""

    pairs: list[EncodedPair]
    ref: PairLogps
    groups: list[list[int]]
    metrics: dict[str, Any] = field(default_factory=dict)


class PairSource(Protocol):
    """The pairs of units ``groups`` (record indices) for batch ``step`` (1-based)."""

    def __call__(self, step: int, groups: list[list[int]]) -> StepPairs: ...


def _select(pairs: Sequence[EncodedPair], ref: PairLogps, groups: list[list[int]],
            skip: frozenset[int] = frozenset()) -> StepPairs:
    groups = [[i for i in unit if i not in skip] for unit in groups]
    flat = [i for unit in groups for i in unit]
    starts = np.cumsum([0, *[len(unit) for unit in groups]])
    local = [list(range(int(a), int(b))) for a, b in itertools.pairwise(starts)]
    return StepPairs([pairs[i] for i in flat], ref.index(torch.tensor(flat, dtype=torch.long)),
                     local)


@dataclass(frozen=True)
class OfflinePairs:
    """The recorded pairs: ``pairs`` and their cached reference log-probs ``ref``; the
    indices in ``skip`` give no pair (BDHS answers equal to the chosen one)."""

    pairs: Sequence[EncodedPair]
    ref: PairLogps
    skip: frozenset[int] = frozenset()

    def __call__(self, step: int, groups: list[list[int]]) -> StepPairs:
        return _select(self.pairs, self.ref, groups, self.skip)


def online_indices(indices: Sequence[int], n_records: int, seed: int, step: int,
                   offline_fraction: float) -> list[int]:
    """The record indices of a step answered online: those below ``n_records`` (later
    indices are an audit's canaries, always offline) whose coin for (seed, step, index)
    falls at or above ``offline_fraction`` (0: all online)."""
    if offline_fraction == 0:
        return [i for i in indices if i < n_records]
    return [i for i in indices if i < n_records
            and np.random.default_rng([seed, step, i, ONLINE_COIN]).random() >= offline_fraction]


@dataclass(frozen=True)
class OnlinePairs:
    """Pairs made from the policy's own answers (see the module doc).

    ``records``: the training records (index i is ``offline.pairs[i]``'s record);
    ``offline``: the recorded pairs (mixed DPO, audit canaries); ``offline_fraction``: 0 for
    online DPO; ``reference``: log-probs of new pairs under the reference model;
    ``corrupt_seed``: mDPO's corrupted images of new pairs (None: the loss needs none)."""

    cfg: OnlineConfig
    model: torch.nn.Module
    processor: ProcessorMixin
    records: Sequence[PreferenceRecord]
    offline: OfflinePairs
    judge: Judge
    reference: Reference
    seed: int
    offline_fraction: float = 0.0
    corrupt_seed: int | None = None
    hardness_field: str = "hardness_score"

    def __call__(self, step: int, groups: list[list[int]]) -> StepPairs:
        tick = time.perf_counter()
        flat = [i for unit in groups for i in unit]
        online = online_indices(flat, len(self.records), self.seed, step, self.offline_fraction)
        made, scores = self._make(step, online)
        new = [made[i] for i in online if made[i] is not None]
        new_pairs = encode_pairs(new, self.processor, hardness_field=self.hardness_field,
                                 corrupt_seed=None if self.corrupt_seed is None
                                 else self.corrupt_seed * 1_000_003 + step)
        new_ref = self.reference(new_pairs) if new_pairs else None
        where = {rec.id: k for k, rec in enumerate(new)}
        pairs: list[EncodedPair] = []
        rows: list[PairLogps] = []
        local: list[list[int]] = []
        for unit in groups:
            local.append([])
            for i in unit:
                if i in made:
                    if made[i] is None:
                        continue
                    k = where[made[i].id]  # type: ignore[union-attr]
                    pairs.append(new_pairs[k])
                    rows.append(new_ref.index(slice(k, k + 1)))  # type: ignore[union-attr]
                else:
                    pairs.append(self.offline.pairs[i])
                    rows.append(self.offline.ref.index(slice(i, i + 1)))
                local[-1].append(len(pairs) - 1)
        ref = PairLogps.cat(rows) if rows else self.offline.ref.index(slice(0, 0))
        return StepPairs(pairs, ref, local, self._metrics(online, made, scores, len(flat),
                                                          time.perf_counter() - tick))

    def _make(self, step: int, online: list[int]
              ) -> tuple[dict[int, PreferenceRecord | None], list[list[float]]]:
        """For each online index, the record with the judge's best and worst answers as
        chosen and rejected (None when all tie), and every answer's score."""
        queries = [Query(tuple(self.records[i].images), self.records[i].prompt) for i in online]
        answers = sample(self.model, self.processor, queries, n=self.cfg.samples,
                         sampling=self.cfg.sampling, seed=self.seed * 1_000_003 + step,
                         batch_size=self.cfg.batch_size) if queries else []
        made: dict[int, PreferenceRecord | None] = {}
        scores: list[list[float]] = []
        for i, texts in zip(online, answers, strict=True):
            record = self.records[i]
            scored = list(self.judge(record, texts))
            scores.append(scored)
            picked = rank(scored)
            made[i] = None if picked is None else record.model_copy(update={
                "id": f"{record.id}@{step}", "chosen": texts[picked[0]].strip(),
                "rejected": texts[picked[1]].strip()})
        return made, scores

    @staticmethod
    def _metrics(online: list[int], made: dict[int, PreferenceRecord | None],
                 scores: list[list[float]], n: int, seconds: float) -> dict[str, Any]:
        pairs = sum(r is not None for r in made.values())
        flat = [s for row in scores for s in row]
        return {"online_prompts": len(online), "online_pairs": pairs,
                "online_ties": len(online) - pairs,
                "online_share": len(online) / n if n else None,
                "online_score_mean": float(np.mean(flat)) if flat else None,
                "online_score_best": float(np.mean([max(r) for r in scores])) if scores else None,
                "online_score_worst": float(np.mean([min(r) for r in scores])) if scores
                else None,
                "online_seconds": seconds}
