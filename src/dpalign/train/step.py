"""A step's batches in chunks: pairs collated a micro-batch at a time, with their reference
log-probs (the loss and its metrics are ``dpalign.losses.objective``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpalign.losses.base import PairLogps
from dpalign.models.pairs import EncodedPair, PairBatch, collate


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
