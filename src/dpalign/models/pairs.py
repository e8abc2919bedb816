"""Pair-aware collation: preference records -> one padded batch of chosen/rejected rows.

A batch of B pairs becomes 2B rows (chosen rows, then rejected rows) or 3B with mDPO's
corrupted image (the chosen response again, under m'). All rows of one pair stay in one
batch so that the pair's log-probs, loss and gradient are computed together (DESIGN §2).
Tokens and pixels are computed once per record (``encode_pairs``); ``collate`` only pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import ProcessorMixin

from dpalign.data.corrupt import corrupt_image
from dpalign.data.schema import PreferenceRecord
from dpalign.models.encode import PromptEncoder, TokenBatch, pad_batch, response_ids
from dpalign.models.families import ImageInputs, process_images


@dataclass(frozen=True)
class EncodedPair:
    """One record as tokens and pixels.

    prompt, chosen, rejected: token ids (responses end with eos).
    images: the record's processed images (``ImageInputs``, any VLM family; empty for a
    text-only pair); corrupt: the same for m', or None.
    hardness: the record's hardness score in [0, 1], or None when it has none.
    """

    id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    images: ImageInputs
    corrupt: ImageInputs | None
    hardness: float | None


@dataclass(frozen=True)
class PairBatch:
    """B pairs as R = 2B (or 3B) rows: rows [0, B) chosen, [B, 2B) rejected, [2B, 3B) chosen
    under the corrupted image. images: every row's images in row order (I = sum of
    images_per_row); images_per_row: (R,); hardness: (B,) or None."""

    ids: list[str]
    tokens: TokenBatch
    images: ImageInputs
    images_per_row: Tensor
    hardness: Tensor | None
    n_pairs: int
    with_corrupt: bool


def select_rows(tokens: TokenBatch, images: ImageInputs, images_per_row: Tensor,
                rows: Sequence[int] | Tensor) -> tuple[TokenBatch, ImageInputs, Tensor]:
    """Rows ``rows`` of a padded batch (tokens (R, L), the rows' images in row order,
    ``images_per_row`` (R,)) alone, in that order: their tokens with the columns that are
    padding in all of them dropped, their images, their (len(rows),) image counts."""
    rows = [int(r) for r in rows]
    starts = images_per_row.cumsum(0) - images_per_row
    index = [j for r in rows for j in range(int(starts[r]),
                                            int(starts[r] + images_per_row[r]))]
    keep = tokens.attention_mask[rows].bool().any(dim=0)
    picked = TokenBatch(*(t[rows][:, keep] for t in (tokens.input_ids, tokens.attention_mask,
                                                      tokens.labels)))
    return picked, images.select(index), images_per_row[rows]


def _hardness(record: PreferenceRecord, field: str) -> float | None:
    value = getattr(record.metadata, field, None) if record.metadata else None
    return None if value is None else float(value)


def encode_pairs(records: Sequence[PreferenceRecord], processor: ProcessorMixin, *,
                 corrupt_seed: int | None = None,
                 hardness_field: str = "hardness_score") -> list[EncodedPair]:
    """Tokenise prompts and responses and process images once per record. With
    ``corrupt_seed`` set, each record also gets its corrupted images, drawn from a
    generator seeded by (corrupt_seed, record position) so they never change on resume."""
    pairs = []
    encoder = PromptEncoder(processor)
    for i, record in enumerate(records):
        images = [Image.open(p).convert("RGB") for p in record.images]
        corrupt = None
        if corrupt_seed is not None:
            rng = np.random.default_rng([corrupt_seed, i])
            corrupt = process_images(processor, [corrupt_image(im, rng) for im in images])
        pairs.append(EncodedPair(
            id=record.id, prompt=encoder(record.prompt, sizes=[im.size for im in images]),
            chosen=response_ids(processor, record.chosen),
            rejected=response_ids(processor, record.rejected),
            images=process_images(processor, images), corrupt=corrupt,
            hardness=_hardness(record, hardness_field)))
    return pairs


def collate(pairs: Sequence[EncodedPair], pad_id: int, *, with_corrupt: bool = False,
            side: str = "right") -> PairBatch:
    """Pad the rows of ``pairs`` into one batch (see ``PairBatch`` for the row order)."""
    if with_corrupt and any(p.corrupt is None for p in pairs):
        raise ValueError("with_corrupt needs pairs encoded with a corrupt_seed")
    groups = [(p.chosen, p.images) for p in pairs] + [(p.rejected, p.images) for p in pairs]
    if with_corrupt:
        groups += [(p.chosen, p.corrupt) for p in pairs]  # type: ignore[misc]
    prompts = [p.prompt for p in pairs] * (3 if with_corrupt else 2)
    tokens = pad_batch(prompts, [r for r, _ in groups], pad_id, side=side)
    scores = [p.hardness for p in pairs]
    return PairBatch(
        ids=[p.id for p in pairs], tokens=tokens,
        images=ImageInputs.cat([im for _, im in groups]),
        images_per_row=torch.tensor([len(im) for _, im in groups]),
        hardness=None if None in scores else torch.tensor(scores, dtype=torch.float32),
        n_pairs=len(pairs), with_corrupt=with_corrupt)
