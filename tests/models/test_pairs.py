"""Pair encoding and collation: row order, labels, hardness and mDPO's corrupted pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, ProcessorMixin

from dpalign.data.corrupt import corrupt_image
from dpalign.data.records import read_preference_jsonl
from dpalign.data.schema import PairMetadata, PreferenceRecord
from dpalign.models.encode import IGNORE, pixel_values
from dpalign.models.pairs import EncodedPair, PairBatch, collate, encode_pairs
from dpalign.world.load import World

B = 3


@pytest.fixture(scope="module")
def processor(tiny_model: Path) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def pool(small_world: Path) -> list[PreferenceRecord]:
    return read_preference_jsonl(World.load(small_world).pool_file)


@pytest.fixture(scope="module")
def pairs(pool: list[PreferenceRecord], processor: ProcessorMixin) -> list[EncodedPair]:
    return encode_pairs(pool[:B], processor, corrupt_seed=7)


def _pad(processor: ProcessorMixin) -> int:
    return int(processor.tokenizer.pad_token_id)  # type: ignore[attr-defined]


def _row(batch: PairBatch, r: int) -> tuple[list[int], list[int], list[int]]:
    """(attended ids, labelled ids, positions of labelled tokens within the attended ids)."""
    keep = batch.tokens.attention_mask[r].bool()
    ids = batch.tokens.input_ids[r][keep].tolist()
    labels = batch.tokens.labels[r][keep]
    labelled = (labels != IGNORE).nonzero().flatten().tolist()
    assert (batch.tokens.labels[r][~keep] == IGNORE).all()
    return ids, labels[labels != IGNORE].tolist(), labelled


@pytest.mark.parametrize("side", ["right", "left"])
def test_rows_are_chosen_then_rejected_then_corrupt(pairs: list[EncodedPair],
                                                    processor: ProcessorMixin,
                                                    side: str) -> None:
    """Row r of 3B holds pair r % B with chosen (r < B), rejected (B <= r < 2B) or chosen
    under m' (r >= 2B); labels cover exactly the response tokens; pixels follow the rows."""
    batch = collate(pairs, _pad(processor), with_corrupt=True, side=side)
    assert batch.n_pairs == B and batch.tokens.input_ids.shape[0] == 3 * B
    assert batch.ids == [p.id for p in pairs]
    for r in range(3 * B):
        group, pair = divmod(r, B)
        p = pairs[pair]
        response = p.rejected if group == 1 else p.chosen
        ids, labels, labelled = _row(batch, r)
        assert ids == p.prompt + response
        assert labels == response
        assert labelled == list(range(len(p.prompt), len(p.prompt) + len(response)))
        expected_pixels = p.corrupt.pixel_values[0] if group == 2 else p.images.pixel_values[0]  # type: ignore[index]
        assert torch.equal(batch.images.pixel_values[r], expected_pixels)
        mask = batch.tokens.attention_mask[r]
        real = mask.nonzero().flatten()
        # Padding sits on the requested side only.
        edge = 0 if side == "right" else mask.shape[0] - len(ids)
        assert real.tolist() == list(range(edge, edge + len(ids)))
    assert batch.images_per_row.tolist() == [1] * (3 * B)


def test_two_rows_per_pair_without_corrupt(pairs: list[EncodedPair],
                                           processor: ProcessorMixin) -> None:
    batch = collate(pairs, _pad(processor))
    assert batch.tokens.input_ids.shape[0] == 2 * B and not batch.with_corrupt
    assert batch.images.pixel_values.shape[0] == 2 * B


def test_hardness_comes_from_metadata(pool: list[PreferenceRecord], pairs: list[EncodedPair],
                                      processor: ProcessorMixin) -> None:
    """hardness (B,) equals metadata.hardness_score; one record without it gives None."""
    batch = collate(pairs, _pad(processor))
    scores = [r.metadata.hardness_score for r in pool[:B]]
    assert None not in scores
    assert batch.hardness is not None
    torch.testing.assert_close(batch.hardness, torch.tensor(scores, dtype=torch.float32))
    stripped = pool[1].model_copy(update={"metadata": PairMetadata()})
    without = encode_pairs([pool[0], stripped], processor)
    assert without[1].hardness is None
    assert collate(without, _pad(processor)).hardness is None


def test_with_corrupt_needs_a_corrupt_seed(pool: list[PreferenceRecord],
                                           processor: ProcessorMixin) -> None:
    plain = encode_pairs(pool[:2], processor)
    assert all(p.corrupt is None for p in plain)
    with pytest.raises(ValueError, match="corrupt_seed"):
        collate(plain, _pad(processor), with_corrupt=True)


def test_corrupt_pixels_are_reproducible(pool: list[PreferenceRecord], pairs: list[EncodedPair],
                                         processor: ProcessorMixin) -> None:
    """m' of record i is corrupt_image drawn from default_rng([corrupt_seed, i]); the same
    corrupt_seed gives identical pixels, another seed other crops."""
    again = encode_pairs(pool[:B], processor, corrupt_seed=7)
    other = encode_pairs(pool[:B], processor, corrupt_seed=8)
    for i, (a, b) in enumerate(zip(pairs, again, strict=True)):
        image = Image.open(pool[i].images[0]).convert("RGB")
        expected = pixel_values(processor, [corrupt_image(image, np.random.default_rng([7, i]))])
        assert torch.equal(a.corrupt.pixel_values, expected)  # type: ignore[arg-type]
        assert torch.equal(a.corrupt.pixel_values, b.corrupt.pixel_values)  # type: ignore[arg-type]
    assert any(not torch.equal(a.corrupt.pixel_values, c.corrupt.pixel_values)  # type: ignore[arg-type]
               for a, c in zip(pairs, other, strict=True))
    assert any(not torch.equal(a.corrupt.pixel_values, a.images.pixel_values) for a in pairs)  # type: ignore[arg-type]
