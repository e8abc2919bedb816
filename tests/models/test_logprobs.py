"""Sequence log-probs: the vectorised sum equals a hand loop, padding on either side gives
each row's log-probs alone, and a wrong image-token count fails naming the row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpalign.data.records import read_preference_jsonl
from dpalign.data.schema import PreferenceRecord
from dpalign.models.encode import IGNORE, PromptEncoder, TokenBatch, pad_batch, response_ids
from dpalign.models.load import LoadedModel, load_model
from dpalign.models.logprobs import (
    ImageTokenMismatchError,
    image_token_id,
    logits_needed,
    position_ids,
    sequence_logps,
    token_logps,
)
from dpalign.models.pairs import EncodedPair, encode_pairs
from dpalign.world.load import World


@pytest.fixture(scope="module")
def vlm(tiny_model: Path) -> LoadedModel:
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def records(small_world: Path) -> list[PreferenceRecord]:
    """Five pool records: prompts and responses of different lengths."""
    return read_preference_jsonl(World.load(small_world).pool_file)[:5]


@pytest.fixture(scope="module")
def pairs(vlm: LoadedModel, records: list[PreferenceRecord]) -> list[EncodedPair]:
    return encode_pairs(records, vlm.processor)


def _pad_id(vlm: LoadedModel) -> int:
    return int(vlm.processor.tokenizer.pad_token_id)  # type: ignore[attr-defined]


def _loop_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per row: sum of log_softmax(logits[t-1])[labels[t]] over labelled t, and the count,
    one position at a time."""
    totals, counts = [], []
    for row in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            target = int(labels[row, t])
            if target == IGNORE:
                continue
            step = logits[row, t - 1].double()
            total += float(step[target] - torch.logsumexp(step, dim=0))
            count += 1
        totals.append(total)
        counts.append(count)
    return totals, counts


def test_token_logps_equals_a_position_by_position_loop() -> None:
    """token_logps sums log p(label_t | <t) over exactly the non-IGNORE labels (shifted by
    one), for IGNORE spans at the start, middle and end, including an all-IGNORE row."""
    gen = torch.Generator().manual_seed(0)
    n, length, vocab = 4, 11, 13
    logits = torch.randn(n, length, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (n, length), generator=gen)
    labels[0, :4] = IGNORE  # prompt then response
    labels[1, :2] = IGNORE  # response followed by right padding
    labels[1, 7:] = IGNORE
    labels[2, 3:5] = IGNORE  # a hole in the middle
    labels[3, :] = IGNORE  # nothing to score
    out = token_logps(logits, labels)
    totals, counts = _loop_logps(logits, labels)
    torch.testing.assert_close(out.total, torch.tensor(totals, dtype=torch.float32),
                               atol=1e-5, rtol=1e-6)
    assert out.tokens.tolist() == counts == [7, 5, 8, 0]
    assert out.total[3] == 0
    torch.testing.assert_close(out.mean[:3], out.total[:3] / out.tokens[:3])


def test_logits_needed_keeps_every_scored_position() -> None:
    """The trailing logits kept start one before the earliest labelled token of any row, and
    token_logps on just those equals token_logps on all positions."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 13, (3, 10), generator=gen)
    labels[0, :6] = IGNORE  # left-padded row: response at positions 6..9
    labels[1, :4] = IGNORE  # right-padded row: response 4..7, padding after
    labels[1, 8:] = IGNORE
    labels[2, :] = IGNORE
    assert logits_needed(labels) == 10 - 3  # logit at position 3 predicts label 4
    assert logits_needed(torch.full((2, 5), IGNORE)) == 1
    logits = torch.randn(3, 10, 13, generator=gen)
    keep = logits_needed(labels)
    part, whole = token_logps(logits[:, -keep:], labels[:, -keep:]), token_logps(logits, labels)
    torch.testing.assert_close(part.total, whole.total, rtol=0, atol=0)
    assert part.tokens.tolist() == whole.tokens.tolist() == [4, 4, 0]


def test_position_ids_count_only_attended_tokens() -> None:
    """Left padding starts positions at 0 on the first real token; right padding keeps 0..n."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_sequence_logps_equals_manual_log_softmax(vlm: LoadedModel,
                                                  pairs: list[EncodedPair]) -> None:
    """One unpadded example: sequence_logps == the response tokens' log_softmax summed from
    the model's own logits, and its token count == len(response_ids)."""
    model, pair = vlm.model, pairs[1]
    batch = pad_batch([pair.prompt], [pair.chosen], _pad_id(vlm))
    with torch.no_grad():
        got = sequence_logps(model, batch, pair.images.pixel_values)
        logits = model(input_ids=batch.input_ids, pixel_values=pair.images.pixel_values).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    start = len(pair.prompt)
    manual = sum(float(logp[start + j - 1, token]) for j, token in enumerate(pair.chosen))
    assert got.total.item() == pytest.approx(manual, abs=1e-4)
    assert got.tokens.tolist() == [len(pair.chosen)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_row_alone(vlm: LoadedModel, records: list[PreferenceRecord],
                                            pairs: list[EncodedPair], side: str) -> None:
    """Rows of different lengths padded left or right give the log-probs of each row run
    alone (batch of one, no padding), and the response-token counts are
    len(response_ids(text)) of each row's response."""
    model, pad = vlm.model, _pad_id(vlm)
    rows = [(p.prompt, response, p.images.pixel_values) for p in pairs[:4]
            for response in (p.chosen, p.rejected)]
    texts = [text for r in records[:4] for text in (r.chosen, r.rejected)]
    lengths = {len(prompt) + len(response) for prompt, response, _ in rows}
    assert len(lengths) > 2, "the test needs rows of different lengths"
    batch = pad_batch([r[0] for r in rows], [r[1] for r in rows], pad, side=side)
    with torch.no_grad():
        together = sequence_logps(model, batch, torch.cat([r[2] for r in rows]))
        alone = [sequence_logps(model, pad_batch([prompt], [response], pad), pixels)
                 for prompt, response, pixels in rows]
    torch.testing.assert_close(together.total, torch.cat([a.total for a in alone]),
                               atol=1e-4, rtol=0)
    assert together.tokens.tolist() == [len(response_ids(vlm.processor, t)) for t in texts]
    assert torch.isfinite(together.total).all()


def test_token_counts_are_response_ids(vlm: LoadedModel) -> None:
    """The counted tokens of a response are its ``response_ids`` (text tokens + eos)."""
    processor = vlm.processor
    encoder = PromptEncoder(processor, (64, 64))
    texts = ["No.", "A red fork and a blue kitten.", "Yes, there is a cyan cup on the left."]
    ids = [response_ids(processor, t) for t in texts]
    assert all(r[-1] == processor.tokenizer.eos_token_id for r in ids)  # type: ignore[attr-defined]
    batch = pad_batch([encoder("Describe the image.")] * 3, ids, _pad_id(vlm))
    assert (batch.labels != IGNORE).sum(dim=1).tolist() == [len(r) for r in ids]
    pixels = torch.zeros(3, 3, 64, 64)
    with torch.no_grad():
        out = sequence_logps(vlm.model, batch, pixels)
    assert out.tokens.tolist() == [len(r) for r in ids]


def _count_forwards(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_dropped_image_token_names_the_row_before_the_forward(
        vlm: LoadedModel, pairs: list[EncodedPair]) -> None:
    """Row 1 missing one <image> placeholder raises ImageTokenMismatchError naming row 1,
    and the model's forward never runs."""
    model = vlm.model
    token = image_token_id(model)
    broken = list(pairs[1].prompt)
    broken.remove(token)
    batch = pad_batch([pairs[0].prompt, broken], [pairs[0].chosen, pairs[1].chosen],
                      _pad_id(vlm))
    pixels = torch.cat([pairs[0].images.pixel_values, pairs[1].images.pixel_values])
    per_image = sum(t == token for t in pairs[0].prompt)
    calls, handle = _count_forwards(model)
    try:
        with pytest.raises(ImageTokenMismatchError, match=r"^row 1: ") as info:
            sequence_logps(model, batch, pixels)
    finally:
        handle.remove()
    assert calls == []
    assert f"{per_image - 1} image tokens" in str(info.value)
    assert f"give {per_image} features" in str(info.value)


def test_two_image_prompt_with_one_image_names_the_row(vlm: LoadedModel,
                                                       pairs: list[EncodedPair]) -> None:
    """A prompt templated for 2 images on a row given 1 image fails at that row (row 2)."""
    model, processor = vlm.model, vlm.processor
    two = PromptEncoder(processor, (64, 64))("Compare the images.", n_images=2)
    prompts = [pairs[0].prompt, pairs[1].prompt, two]
    batch: TokenBatch = pad_batch(prompts, [p.chosen for p in pairs[:3]], _pad_id(vlm))
    pixels = torch.cat([p.images.pixel_values for p in pairs[:3]])
    calls, handle = _count_forwards(model)
    try:
        with pytest.raises(ImageTokenMismatchError, match=r"^row 2: .*1 image\(s\)"):
            sequence_logps(model, batch, pixels)
    finally:
        handle.remove()
    assert calls == []
    # With images_per_row saying two images, the same row passes the check and runs.
    per_row = torch.tensor([1, 1, 2])
    pixels2 = torch.cat([pixels, pairs[2].images.pixel_values])
    with torch.no_grad():
        out = sequence_logps(model, batch, pixels2, per_row)
    assert torch.isfinite(out.total).all() and calls == []
