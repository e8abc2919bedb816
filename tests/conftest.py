"""Shared fixtures: a small world and a briefly pretrained tiny VLM, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DPALIGN_NO_PROGRESS", "1")

from dpalign.world.build import build_world
from dpalign.world.config import WorldConfig

TINY_PRETRAIN_KW = {"steps": 40, "batch_size": 16, "warmup_steps": 5, "log_every": 1,
                    "vision_steps": 10, "vision_batch_size": 16}
SMALL_WORLD = WorldConfig(seed=3, n_pretrain_images=240, n_pool_pairs=48, n_heldout_pairs=24,
                          n_pope_images=24, n_caption_images=12)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small world (same generator as the default, fewer images)."""
    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, SMALL_WORLD)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, small_world: Path) -> Path:
    """The tiny preset pretrained for a few steps on the small world (a real model folder)."""
    from dpalign.train.pretrain import PretrainConfig, pretrain

    tiny_pretrain = PretrainConfig(**TINY_PRETRAIN_KW)

    out = tmp_path_factory.mktemp("model") / "tiny"
    pretrain(small_world, out, tiny_pretrain)
    return out
