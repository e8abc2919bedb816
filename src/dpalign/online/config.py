"""Settings of online and mixed DPO (``online:`` in a training config)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from dpalign.config import Section
from dpalign.online.generate import SamplingConfig

METHODS = ("offline", "online", "mixed", "bdhs")
"""How a run gets its pairs: ``offline`` the file's chosen/rejected; ``online`` answers
sampled from the current policy each step, best vs worst by the judge; ``mixed`` each
sampled pair offline with probability ``online.offline_fraction``, else online; ``bdhs``
the file's chosen against a BDHS rejection made by the base model before training."""


class OnlineConfig(Section):
    samples: int = Field(4, ge=2, description="answers sampled per prompt each step; the "
                                              "judge's best and worst make the pair")
    sampling: SamplingConfig = SamplingConfig()
    judge: str = Field("world", description="a judge name (world: hallucinated objects and "
                                            "wrong colours against metadata.objects/colours) "
                                            "or 'package.module:function'")
    offline_fraction: float = Field(0.5, ge=0, le=1, description="method mixed: probability "
                                                                 "that a sampled pair is used "
                                                                 "as recorded (offline)")
    batch_size: int = Field(16, ge=1, description="prompts per generate() call")

    @field_validator("judge")
    @classmethod
    def _judge_form(cls, value: str) -> str:
        from dpalign.online.judge import JUDGES

        if value in JUDGES or re.fullmatch(r"[\w.]+:[\w.]+", value):
            return value
        raise ValueError(f"unknown judge {value!r}: use one of {sorted(JUDGES)} or "
                         "'package.module:function'")


class BDHSConfig(Section):
    """BDHS rejections for ``method: bdhs`` (the ``dpalign data bdhs`` settings)."""

    mask_rate: float = Field(0.99, ge=0, le=1, description="probability that each image "
                                                           "token is masked in attention")
    max_tries: int = Field(5, ge=1, description="most tries per sentence; the last try is "
                                                "kept")
    threshold: float = Field(0.97, gt=0, le=1, description="resample while the sentence-"
                                                           "embedding cosine to the original "
                                                           "is above this")
    sampling: SamplingConfig = SamplingConfig()
    seed: int = Field(0, description="seed of the yes/no swaps, split points and generation")
