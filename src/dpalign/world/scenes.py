"""Sample scenes: which objects, where, in what colour. Pure functions of a numpy Generator."""

from __future__ import annotations

import numpy as np

from dpalign.world.config import WorldConfig
from dpalign.world.render import PlacedObject, Scene
from dpalign.world.vocab import CATEGORY_NAMES, COLOUR_NAMES, partner_of, strength_of


def sample_categories(rng: np.random.Generator, cfg: WorldConfig) -> list[str]:
    """1..max_objects distinct categories; a drawn category brings its partner along with
    probability ``cfg.cooccurrence * strength`` (the co-occurrence structure)."""
    n = int(rng.integers(1, min(cfg.max_objects, cfg.grid**2) + 1))
    chosen: list[str] = []
    while len(chosen) < n:
        absent = [c for c in CATEGORY_NAMES if c not in chosen]
        category = absent[int(rng.integers(len(absent)))]
        chosen.append(category)
        partner = partner_of(category)
        bring = rng.random() < cfg.cooccurrence * strength_of(category)
        if len(chosen) < n and partner not in chosen and bring:
            chosen.append(partner)
    return chosen


def absent_partners(categories: list[str] | tuple[str, ...]) -> list[str]:
    """Partners of present objects that are not themselves present, in presence order."""
    present = set(categories)
    out: list[str] = []
    for category in categories:
        partner = partner_of(category)
        if partner not in present and partner not in out:
            out.append(partner)
    return out


def place(rng: np.random.Generator, cfg: WorldConfig, categories: list[str]) -> Scene:
    """Put ``categories`` at distinct random cells with colour and small render jitter."""
    cells = rng.permutation(cfg.grid**2)[: len(categories)]
    jitter = max(1, cfg.image_size // (cfg.grid * 10))
    objects = tuple(
        PlacedObject(
            category=category,
            colour=COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
            cell=int(cell),
            dx=int(rng.integers(-jitter, jitter + 1)),
            dy=int(rng.integers(-jitter, jitter + 1)),
            scale=round(float(rng.uniform(0.8, 1.0)), 3),
            tint=tuple(int(t) for t in rng.integers(-12, 13, size=3)),  # type: ignore[arg-type]
        )
        for category, cell in zip(categories, cells, strict=True)
    )
    return Scene(objects=objects, size=cfg.image_size, grid=cfg.grid)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, *,
                 require_absent_partner: bool = False) -> Scene:
    """A scene from the world's distribution; optionally one where some present object's
    partner is missing (needed for adversarial POPE negatives and hard preference pairs)."""
    while True:
        categories = sample_categories(rng, cfg)
        if not require_absent_partner or absent_partners(categories):
            return place(rng, cfg, categories)
