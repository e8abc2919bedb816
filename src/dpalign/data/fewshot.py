"""Few-shot splits: the first K pairs of a seeded permutation of a preference pool.

The permutation depends only on the seed and the pool, so K=16 is a prefix of K=32 for the
same seed: growing K adds pairs without swapping the ones already chosen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from dpalign.data.schema import PreferenceRecord


def few_shot(records: Sequence[PreferenceRecord], k: int | None, seed: int
             ) -> list[PreferenceRecord]:
    """K records drawn without replacement (all of them, shuffled, when k is None)."""
    if k is not None and not 0 < k <= len(records):
        raise ValueError(f"few-shot k={k} but the pool has {len(records)} pairs")
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[int(i)] for i in order[: k if k is not None else len(records)]]


def validation_split(records: Sequence[PreferenceRecord], fraction: float
                     ) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Disjoint (validation, test) parts of held-out records: the round(fraction x n) records
    whose ids hash lowest (SHA-256) are validation, the rest test; each part keeps the
    file's order. The split depends on the ids alone, not on their order in the file or a
    seed, so every run of a study tunes and tests on the same pairs."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    ranked = sorted(range(len(records)),
                    key=lambda i: hashlib.sha256(records[i].id.encode()).hexdigest())
    chosen = set(ranked[:round(fraction * len(records))])
    return ([r for i, r in enumerate(records) if i in chosen],
            [r for i, r in enumerate(records) if i not in chosen])
