"""mDPO's corrupted image, few-shot splits and batch order."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpalign.data.corrupt import RATIO, SCALE, corrupt_image, crop_box
from dpalign.data.fewshot import few_shot
from dpalign.data.records import read_preference_jsonl
from dpalign.data.sampling import batch_indices, steps_per_epoch
from dpalign.data.schema import PreferenceRecord
from dpalign.world.load import World


@pytest.fixture(scope="module")
def pool(small_world: Path) -> list[PreferenceRecord]:
    return read_preference_jsonl(World.load(small_world).pool_file)


# --- corrupted image ---------------------------------------------------------------------

SIZES = [(64, 64), (63, 65), (65, 63), (17, 31), (31, 17), (7, 5), (224, 160)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_crop_box_area_and_aspect_within_bounds(size: tuple[int, int]) -> None:
    """Over 500 seeds the integer box lies in the image and some real-valued box within
    half a pixel of it has area fraction in SCALE and aspect in RATIO (rounding only)."""
    width, height = size
    area = width * height
    for seed in range(500):
        left, top, right, bottom = crop_box(np.random.default_rng(seed), width, height)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert (w - 0.5) * (h - 0.5) <= SCALE[1] * area + 1e-9
        assert (w + 0.5) * (h + 0.5) >= SCALE[0] * area - 1e-9
        assert (w - 0.5) / (h + 0.5) <= RATIO[1] and (w + 0.5) / (h - 0.5) >= RATIO[0]


def test_crop_box_areas_fill_the_range_on_64px() -> None:
    """On 64x64 the sampled area fractions span 1-20%: min near 1%, max near 20%."""
    fractions = []
    for seed in range(2000):
        left, top, right, bottom = crop_box(np.random.default_rng(seed), 64, 64)
        fractions.append((right - left) * (bottom - top) / 64**2)
    assert 0.008 <= min(fractions) < 0.015
    assert 0.18 < max(fractions) <= 0.22
    assert 0.09 < float(np.mean(fractions)) < 0.12  # uniform on [0.01, 0.2] has mean 0.105


@pytest.mark.parametrize("size", [(100, 3), (3, 100), (1000, 10), (1, 1), (2, 2)])
def test_crop_box_stays_inside_thin_images(size: tuple[int, int]) -> None:
    """When no sampled box fits (thin images) the fallback box is still inside the image."""
    width, height = size
    for seed in range(200):
        left, top, right, bottom = crop_box(np.random.default_rng(seed), width, height)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height


def _stripes(width: int, height: int) -> Image.Image:
    x = np.arange(width)[None, :, None] * 7 + np.arange(height)[:, None, None] * 3
    return Image.fromarray(((x + np.arange(3) * 50) % 256).astype(np.uint8))


@pytest.mark.parametrize("size", [(64, 64), (63, 65), (17, 31)])
def test_corrupt_image_is_seeded_and_keeps_size(size: tuple[int, int]) -> None:
    """Same generator seed -> identical image; output size == input size; the result is the
    sampled box cropped and resized back."""
    image = _stripes(*size)
    a = corrupt_image(image, np.random.default_rng(11))
    b = corrupt_image(image, np.random.default_rng(11))
    c = corrupt_image(image, np.random.default_rng(12))
    assert a.size == image.size == c.size and a.mode == image.mode
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    box = crop_box(np.random.default_rng(11), *size)
    expected = image.crop(box).resize(image.size, Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(a), np.asarray(expected))


# --- few-shot splits -----------------------------------------------------------------------

def _ids(records: list[PreferenceRecord]) -> list[str]:
    return [r.id for r in records]


def test_few_shot_is_deterministic_prefix_and_without_replacement(
        pool: list[PreferenceRecord]) -> None:
    """Same seed -> same pairs; k=8 is a prefix of k=16 and of k=None; no repeats; another
    seed -> another split."""
    k8, k16, every = (_ids(few_shot(pool, k, seed=5)) for k in (8, 16, None))
    assert k8 == _ids(few_shot(pool, 8, seed=5))
    assert k16[:8] == k8 and every[:16] == k16
    assert sorted(every) == sorted(_ids(pool)) and len(set(k16)) == 16
    assert _ids(few_shot(pool, 16, seed=6)) != k16


@pytest.mark.parametrize("k", [0, 49, 1000])
def test_few_shot_refuses_k_out_of_range(pool: list[PreferenceRecord], k: int) -> None:
    assert len(pool) == 48
    with pytest.raises(ValueError, match=f"k={k} but the pool has 48 pairs"):
        few_shot(pool, k, seed=0)


# --- batch order ---------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "batch_size"), [(10, 4), (12, 4), (5, 8), (7, 1)])
def test_each_epoch_is_a_permutation(n: int, batch_size: int) -> None:
    """Concatenated batches of an epoch are a permutation of range(n); all batches are full
    except a smaller last one when batch_size does not divide n."""
    per_epoch = steps_per_epoch(n, batch_size)
    assert per_epoch == math.ceil(n / batch_size)
    orders = []
    for epoch in range(3):
        batches = [batch_indices(n, batch_size, 4, epoch * per_epoch + j)
                   for j in range(per_epoch)]
        sizes = [len(b) for b in batches]
        assert sizes[:-1] == [batch_size] * (per_epoch - 1)
        assert sizes[-1] == n - batch_size * (per_epoch - 1)
        order = [i for b in batches for i in b]
        assert sorted(order) == list(range(n))
        orders.append(order)
    if n > 3:
        assert orders[0] != orders[1] or orders[1] != orders[2]  # epochs reshuffle


def test_batch_indices_are_stateless() -> None:
    """A step's batch depends only on (n, B, seed, step): any call order gives the same."""
    forward = [batch_indices(10, 4, 3, t) for t in range(9)]
    backward = [batch_indices(10, 4, 3, t) for t in reversed(range(9))][::-1]
    assert forward == backward
    assert batch_indices(10, 4, 3, 7) == forward[7]
    assert batch_indices(10, 4, 4, 0) != forward[0] or batch_indices(10, 4, 4, 1) != forward[1]
