"""Which base model a study aligns: a model folder, or a pretrain preset's name.

``dpalign study --model smol`` means "the ``smol`` preset pretrained (with its default
settings) on the study's world": it is built at ``<study dir>/base-smol`` the first time
and reused afterwards (``pretrain`` reuses a finished folder with the same fingerprint).
The world is built too (default settings, seed 0) when the study's world folder has none.
"""

from __future__ import annotations

from pathlib import Path

from dpalign.config import ConfigError
from dpalign.study.config import StudyConfig
from dpalign.train.pretrain import RECIPES, default_config, pretrain
from dpalign.world.build import build_world
from dpalign.world.config import WorldConfig


def preset_model_dir(out: Path, preset: str) -> Path:
    """Where a study at ``out`` keeps the base model it pretrains with ``preset``."""
    return Path(out) / f"base-{preset}"


def resolve_model(spec: str | Path, world: Path, out: Path) -> Path:
    """The model folder ``spec`` names: a folder with ``config.json`` as it is; a pretrain
    preset name (``RECIPES``) as that preset pretrained on ``world`` under ``out`` (built
    when missing, world included). A folder of that name wins over a preset."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {spec}: a folder without config.json, not a model "
                              "saved with `save_pretrained`")
        return path
    name = str(spec)
    if name not in RECIPES:
        raise ConfigError(f"--model {spec}: neither a model folder nor a pretrain preset "
                          f"({', '.join(sorted(RECIPES))})")
    world = Path(world)
    if not (world / "world.json").is_file():
        build_world(world, WorldConfig(seed=0))
    return pretrain(world, preset_model_dir(out, name), default_config(name)).out


def with_model(study: StudyConfig, spec: str | Path, out: Path) -> StudyConfig:
    """``study`` aligning the model ``spec`` resolves to (see ``resolve_model``)."""
    return study.model_copy(update={"model": resolve_model(spec, study.world, out)})
