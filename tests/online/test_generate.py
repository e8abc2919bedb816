"""Sampling from the policy (``dpalign.online.generate``): the image-attention mask BDHS uses
hits only image positions and at the configured rate; positions stay those of the unmasked
prompt (greedy answers equal ``eval.generate``'s in every family); with every image token
masked the answer no longer depends on the image; seeded sampling repeats exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.stats import binom

from dpalign.data.records import read_preference_jsonl
from dpalign.eval.generate import generate
from dpalign.models.encode import PromptEncoder
from dpalign.models.load import load_model
from dpalign.models.logprobs import image_token_id
from dpalign.models.tiny_families import TINY_FAMILIES
from dpalign.online.generate import Query, SamplingConfig, mask_image_positions, sample
from dpalign.world.load import World

GREEDY = SamplingConfig(temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def pool(small_world: Path) -> list:
    return read_preference_jsonl(World.load(small_world).pool_file)


def test_mask_hits_only_image_positions_at_the_rate() -> None:
    """Rows of text ids with a block of image tokens: positions off the image are never
    masked; over 40,000 image positions at rate 0.99 the masked count lies in the
    binomial's 1e-6 interval; rates 0 and 1 mask none and all."""
    token = 7
    ids = torch.randint(10, 100, (100, 500))
    ids[:, 50:450] = token
    ids[:5, 50:60] = 3  # not an image token inside the block
    mask = torch.ones_like(ids)
    mask[:, :4] = 0  # left padding stays padding
    out, hit = mask_image_positions(ids, mask, token, 0.99, torch.Generator().manual_seed(0))
    assert not hit[ids != token].any()
    assert torch.equal(out[ids != token], mask[ids != token])
    assert torch.equal(out[hit], torch.zeros(int(hit.sum()), dtype=out.dtype))
    n = int((ids == token).sum())
    low, high = binom.interval(1 - 1e-6, n, 0.99)
    assert low <= int(hit.sum()) <= high
    for rate, expected in ((0.0, 0), (1.0, n)):
        _, hit = mask_image_positions(ids, mask, token, rate, torch.Generator().manual_seed(1))
        assert int(hit.sum()) == expected


def test_a_real_prompts_image_positions_are_its_image_tokens(tiny_model: Path,
                                                             pool: list) -> None:
    """On the tiny LLaVA's templated prompt, rate 1 masks exactly the expanded image
    placeholder tokens (one per patch) and nothing else."""
    vlm = load_model(tiny_model)
    ids = torch.tensor([PromptEncoder(vlm.processor)(pool[0].prompt, sizes=[(64, 64)])])
    token = image_token_id(vlm.model)
    _, hit = mask_image_positions(ids, torch.ones_like(ids), token, 1.0, torch.Generator())
    assert int(hit.sum()) == int((ids == token).sum()) > 1
    assert torch.equal(hit, ids == token)


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_positions_and_masking_in_every_family(family_dirs: dict[str, Path], pool: list,
                                               name: str) -> None:
    """Greedy ``sample`` (positions handed to ``generate`` from the unmasked prompt) gives
    ``eval.generate``'s answers; with every image token masked, two different images give
    the same answer to the same prompt, and a prefix is continued, not repeated."""
    vlm = load_model(family_dirs[name])
    records = pool[:3]
    paths = [Path(r.images[0]) for r in records]
    queries = [Query((p,), r.prompt) for p, r in zip(paths, records, strict=True)]
    got = sample(vlm.model, vlm.processor, queries, sampling=GREEDY, seed=0)
    expected = generate(vlm.model, vlm.processor, paths, [r.prompt for r in records],
                        max_new_tokens=6)
    assert [g[0].strip() for g in got] == expected

    same_prompt = [Query((p,), "Describe the image.", prefix="A red") for p in paths]
    blind = sample(vlm.model, vlm.processor, same_prompt, sampling=GREEDY, seed=0,
                   image_mask_rate=1.0)
    assert blind[0] == blind[1] == blind[2]


def test_seeded_sampling_repeats_and_n_answers_per_query(tiny_model: Path,
                                                         pool: list) -> None:
    """Temperature sampling with one seed gives the same answers twice, a different seed
    different ones; n answers per query, in query order; batches are seeded apart, so a
    query's answers do not depend on the queries in later batches."""
    vlm = load_model(tiny_model)
    queries = [Query((Path(r.images[0]),), r.prompt) for r in pool[:4]]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8)
    a = sample(vlm.model, vlm.processor, queries, n=3, sampling=cfg, seed=5, batch_size=2)
    b = sample(vlm.model, vlm.processor, queries, n=3, sampling=cfg, seed=5, batch_size=2)
    c = sample(vlm.model, vlm.processor, queries, n=3, sampling=cfg, seed=6, batch_size=2)
    assert a == b and a != c
    assert len(a) == 4 and all(len(row) == 3 for row in a)
    first = sample(vlm.model, vlm.processor, queries[:2], n=3, sampling=cfg, seed=5,
                   batch_size=2)
    assert first == a[:2]
    with pytest.raises(ValueError, match="image_mask_rate"):
        sample(vlm.model, vlm.processor, queries, sampling=cfg, seed=0, image_mask_rate=1.5)
