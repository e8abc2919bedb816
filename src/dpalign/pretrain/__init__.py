"""Pretraining: a fresh base VLM per model preset, trained on a world's biased split.

``PRESETS`` (``presets``) maps each preset's name to its model builder and its recipe
(settings class, data loader, stages); ``pretrain`` (``run``) builds and trains one.
Recipes: ``tiny`` (from scratch: ``vision_warmup`` then ``tiny``'s fine-tuning) and ``smol``
(frozen pretrained tower: ``projector``). ``loop`` holds what the stages share.
"""

from dpalign.pretrain.presets import PRESETS, AnyPretrainConfig, Preset, default_config
from dpalign.pretrain.projector import ProjectorPretrainConfig
from dpalign.pretrain.run import PretrainResult, pretrain, read_record
from dpalign.pretrain.tiny import PretrainConfig

__all__ = ["PRESETS", "AnyPretrainConfig", "Preset", "PretrainConfig", "PretrainResult",
           "ProjectorPretrainConfig", "default_config", "pretrain", "read_record"]
