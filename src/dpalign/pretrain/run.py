"""``pretrain``: build a fresh model of a preset and run the preset's stages on a world's
biased pretraining split (supervised, response tokens).

The result is a model folder loadable with ``AutoModelForImageTextToText`` /
``AutoProcessor``, plus ``pretrain.json`` (config, world fingerprint, wall time, per-stage
summary) and ``metrics.jsonl`` (one line per logged step). The folder is written under a
temporary name and renamed into place; an existing folder built from the same config and
world is reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from dpalign.io import atomic_directory, atomic_write_json, atomic_write_jsonl
from dpalign.pretrain.loop import Log, PretrainRun
from dpalign.pretrain.presets import AnyPretrainConfig, preset_for
from dpalign.world.load import World

FORMAT = "dpalign-pretrain/1"


@dataclass(frozen=True)
class PretrainResult:
    out: Path
    built: bool
    first_loss: float | None  # None for a preset used as built (no stages, no loss)
    last_loss: float | None
    wall_seconds: float


def _fingerprint(cfg: BaseModel, world: World) -> dict[str, object]:
    return {"format": FORMAT, "config": cfg.model_dump(mode="json"),
            "world_config": world.manifest["config"]}


def read_record(out: Path) -> dict[str, Any] | None:
    """The ``pretrain.json`` of a folder ``pretrain`` wrote (config with its ``preset``,
    fingerprint, losses, timings), or None where there is none."""
    meta = Path(out) / "pretrain.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def _is_complete(saved: dict[str, Any] | None, fingerprint: dict[str, object]) -> bool:
    return saved is not None and {k: saved.get(k) for k in fingerprint} == fingerprint


def pretrain(world_dir: str | Path, out: str | Path, cfg: AnyPretrainConfig, *,
             force: bool = False, on_log: Log | None = None) -> PretrainResult:
    """Build a fresh ``cfg.preset`` model and run its stages on the world's pretraining split."""
    out = Path(out)
    preset = preset_for(cfg)
    world = World.load(world_dir)
    fingerprint = _fingerprint(cfg, world)
    if out.exists() and not force:
        meta = read_record(out)
        if _is_complete(meta, fingerprint):
            return PretrainResult(out, False, meta["first_loss"], meta["last_loss"],
                                  meta["wall_seconds"])
        if any(out.iterdir()):
            raise FileExistsError(f"{out}: exists and holds another model; pass --force "
                                  "to replace it or choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    texts = [t for r in world.pretrain_rows() for t in (r["prompt"], r["response"])]
    built = preset.build(texts, cfg.seed)
    data = preset.load(world, built.model, built.processor, cfg)
    run = PretrainRun(built.model, built.processor, world, cfg, data,
                      torch.Generator().manual_seed(cfg.seed), start, on_log)
    for stage in preset.stages:
        stage(run)
    wall = time.perf_counter() - start
    model = run.model.eval()
    losses = [r for r in run.log if "loss_ema" in r] or run.log  # language-model stages
    first, last = ((losses[0]["loss"], losses[-1].get("loss_ema", losses[-1]["loss"]))
                   if losses else (None, None))

    with atomic_directory(out) as staging:
        model.save_pretrained(staging)
        run.processor.save_pretrained(staging)
        atomic_write_jsonl(staging / "metrics.jsonl", run.log)
        atomic_write_json(staging / "pretrain.json", {
            **fingerprint, "first_loss": first, "last_loss": last,
            "wall_seconds": round(wall, 2),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), **run.summary,
            **({"provenance": built.provenance} if built.provenance else {}),
        })
    return PretrainResult(out, True, first, last, wall)
