"""Build a world on disk: JSONL files plus PNG images, written atomically as one folder.

Layout of ``OUT``::

    world.json                    config, vocabulary, pairs, statistics, file index
    synonyms.txt                  CHAIR synonym list (official layout)
    pretrain/data.jsonl           biased supervised examples (caption, existence, colour)
    pretrain/annotations.jsonl    ground-truth objects, colours and grid cells per image
    prefs/pool.jsonl              few-shot preference pool (dpalign preference schema)
    prefs/heldout.jsonl           held-out preference pairs
    pope/{random,popular,adversarial}.jsonl + pope/images/   official POPE layout
    pope/annotations.jsonl        ground-truth objects of each POPE image
    captions/eval.jsonl           caption-eval images with ground-truth objects

The folder is assembled under a temporary name and renamed into place, so an interrupted
build leaves nothing half-written at ``OUT``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dpalign import __version__
from dpalign.io import atomic_directory, atomic_write_json, atomic_write_jsonl, atomic_write_text
from dpalign.progress import progress
from dpalign.world import splits
from dpalign.world.config import WorldConfig
from dpalign.world.render import Scene, png_bytes, render
from dpalign.world.vocab import CATEGORIES, COLOURS, PAIRS, synonyms_file_text

FORMAT = "dpalign-world/1"
POPE_SPLITS = ("random", "popular", "adversarial")


class WorldExistsError(FileExistsError):
    """``OUT`` already holds a different world (or something else)."""


def _write_images(folder: Path, scenes: dict[str, Scene], label: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, scene in progress(scenes.items(), description=f"render {label}", total=len(scenes)):
        (folder / f"{stem}.png").write_bytes(png_bytes(render(scene)))


def _annotations(scenes: dict[str, Scene], suffix: str,
                 prefix: str = "") -> list[dict[str, object]]:
    """Ground truth per image: objects, colours and grid cells in reading order."""
    rows: list[dict[str, object]] = []
    for stem, scene in scenes.items():
        ordered = sorted(scene.objects, key=lambda o: o.cell)
        rows.append({"image": f"{prefix}{stem}{suffix}", "objects": [o.category for o in ordered],
                     "colours": [o.colour for o in ordered], "cells": [o.cell for o in ordered]})
    return rows


def _manifest(cfg: WorldConfig, stats: dict[str, object]) -> dict[str, object]:
    return {
        "format": FORMAT,
        "dpalign_version": __version__,
        "config": cfg.model_dump(mode="json"),
        "categories": [{"name": c.name, "synonyms": list(c.synonyms), "glyph": c.glyph}
                       for c in CATEGORIES],
        "pairs": [{"a": p.a, "b": p.b, "strength": p.strength} for p in PAIRS],
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "stats": stats,
        "files": {
            "pretrain": "pretrain/data.jsonl",
            "pretrain_annotations": "pretrain/annotations.jsonl",
            "pool": "prefs/pool.jsonl",
            "heldout": "prefs/heldout.jsonl",
            "pope": {s: f"pope/{s}.jsonl" for s in POPE_SPLITS},
            "pope_images": "pope/images",
            "pope_annotations": "pope/annotations.jsonl",
            "captions": "captions/eval.jsonl",
            "synonyms": "synonyms.txt",
        },
    }


def _biased_rate(rows: Iterable[dict[str, object]], task: str) -> float:
    """Fraction of pretraining rows of ``task`` that a biased annotator got wrong."""
    flags = [bool(r["hallucinated"]) for r in rows if r["task"] == task]
    return sum(flags) / max(1, len(flags))


def write_world(out: Path, cfg: WorldConfig) -> dict[str, object]:
    """Generate every split from ``cfg`` and write them under ``out`` (must not exist)."""
    seeds = np.random.SeedSequence(cfg.seed).spawn(5)
    rng = {name: np.random.default_rng(s) for name, s in
           zip(("pretrain", "pool", "heldout", "pope", "captions"), seeds, strict=True)}
    pre = splits.pretrain_split(rng["pretrain"], cfg)
    pool = splits.preference_split(rng["pool"], cfg, "pool", cfg.n_pool_pairs)
    held = splits.preference_split(rng["heldout"], cfg, "heldout", cfg.n_heldout_pairs)
    popularity = splits.object_frequencies(pre.scenes)
    pope_rows, pope_scenes = splits.pope_splits(rng["pope"], cfg, popularity)
    caps = splits.caption_split(rng["captions"], cfg)

    atomic_write_jsonl(out / "pretrain/data.jsonl", pre.rows)
    atomic_write_jsonl(out / "pretrain/annotations.jsonl",
                       _annotations(pre.scenes, ".png", prefix="images/"))
    _write_images(out / "pretrain/images", pre.scenes, "pretrain")
    atomic_write_jsonl(out / "prefs/pool.jsonl", pool.rows)
    atomic_write_jsonl(out / "prefs/heldout.jsonl", held.rows)
    _write_images(out / "prefs/images", {**pool.scenes, **held.scenes}, "prefs")
    for split in POPE_SPLITS:
        atomic_write_jsonl(out / f"pope/{split}.jsonl", pope_rows[split])
    atomic_write_jsonl(out / "pope/annotations.jsonl", _annotations(pope_scenes, ".png"))
    _write_images(out / "pope/images", pope_scenes, "pope")
    atomic_write_jsonl(out / "captions/eval.jsonl", caps.rows)
    _write_images(out / "captions/images", caps.scenes, "captions")
    atomic_write_text(out / "synonyms.txt", synonyms_file_text())

    stats: dict[str, object] = {
        "n_pretrain_examples": len(pre.rows),
        "n_pretrain_images": len(pre.scenes),
        "pretrain_caption_hallucination_rate": round(_biased_rate(pre.rows, "caption"), 4),
        "pretrain_existence_false_yes_rate": round(_biased_rate(pre.rows, "existence"), 4),
        "object_frequency": dict(sorted(popularity.items())),
        "n_pool_pairs": len(pool.rows),
        "n_heldout_pairs": len(held.rows),
        "n_pope_questions": {s: len(pope_rows[s]) for s in POPE_SPLITS},
        "n_caption_images": len(caps.rows),
    }
    manifest = _manifest(cfg, stats)
    atomic_write_json(out / "world.json", manifest)
    return manifest


def build_world(out: str | Path, cfg: WorldConfig, *, force: bool = False) -> tuple[Path, bool]:
    """Build the world at ``out``; returns (path, built). An existing world with the same
    config is kept as is (built=False); a different one needs ``force``."""
    out = Path(out)
    manifest_path = out / "world.json"
    if out.exists() and not force:
        if manifest_path.is_file():
            existing = json.loads(manifest_path.read_text())
            if existing.get("config") == cfg.model_dump(mode="json"):
                return out, False
            raise WorldExistsError(f"{out}: holds a world built with another config; "
                                   "pass --force to replace it")
        if any(out.iterdir()):
            raise WorldExistsError(f"{out}: exists and is not a dpalign world; "
                                   "choose another --out")
    with atomic_directory(out) as staging:
        write_world(staging, cfg)
    return out, True
