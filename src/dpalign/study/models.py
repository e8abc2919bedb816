"""Which base model a study aligns: a model folder, or a pretrain preset's name.

``dpalign study --model smol`` means "the ``smol`` preset pretrained (with its default
settings) on the study's world": it is built at ``<study dir>/base-smol`` the first time
and reused afterwards (``pretrain`` reuses a finished folder with the same fingerprint).
The world is built too (default settings, seed 0) when the study's world folder has none.

A preset's model may need training settings to fit in memory (``Preset.align``, e.g. smol's
``train.micro_batch_size``): they go into the study's base config, for a preset name and for
a folder that ``dpalign pretrain`` wrote from a preset, unless the study sets them itself.
"""

from __future__ import annotations

from pathlib import Path

from dpalign.config import ConfigError, deep_merge, nest_dotted
from dpalign.pretrain import PRESETS, default_config, pretrain, read_record
from dpalign.study.config import StudyConfig
from dpalign.world.build import build_world
from dpalign.world.config import WorldConfig


def preset_model_dir(out: Path, preset: str) -> Path:
    """Where a study at ``out`` keeps the base model it pretrains with ``preset``."""
    return Path(out) / f"base-{preset}"


def resolve_model(spec: str | Path, world: Path, out: Path) -> Path:
    """The model folder ``spec`` names: a folder with ``config.json`` as it is; a pretrain
    preset name (``PRESETS``) as that preset pretrained on ``world`` under ``out`` (built
    when missing, world included). A folder of that name wins over a preset."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {spec}: a folder without config.json, not a model "
                              "saved with `save_pretrained`")
        return path
    name = str(spec)
    if name not in PRESETS:
        raise ConfigError(f"--model {spec}: neither a model folder nor a pretrain preset "
                          f"({', '.join(sorted(PRESETS))})")
    world = Path(world)
    if not (world / "world.json").is_file():
        build_world(world, WorldConfig(seed=0))
    return pretrain(world, preset_model_dir(out, name), default_config(name)).out


def with_model(study: StudyConfig, spec: str | Path, out: Path) -> StudyConfig:
    """``study`` aligning the model ``spec`` resolves to (see ``resolve_model``), with its
    preset's ``Preset.align`` settings under the study's own."""
    model = resolve_model(spec, study.world, out)
    record = read_record(model) or {}
    preset = PRESETS.get(record.get("config", {}).get("preset", ""))
    align = nest_dotted(dict(preset.align)) if preset else {}
    return study.model_copy(update={"model": model, "base": deep_merge(align, study.base)})
