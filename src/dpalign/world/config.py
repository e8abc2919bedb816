"""World configuration: sizes of the splits and the strength of the caption bias."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WorldConfig(BaseModel):
    """Everything that determines a world; the same config and seed give identical files.

    ``cooccurrence`` scales every pair's strength: the probability that a scene that holds
    one partner also holds the other is ``cooccurrence * pair.strength``.
    ``hallucination_rate`` scales the caption bias: when a present object's partner is
    absent, a pretraining caption (or an existence answer about that partner) mentions it
    anyway with probability ``hallucination_rate * pair.strength``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    image_size: int = Field(64, ge=32, le=512)
    grid: int = Field(2, ge=2, le=4)
    max_objects: int = Field(4, ge=1, le=16)
    cooccurrence: float = Field(0.9, ge=0.0, le=1.0)
    hallucination_rate: float = Field(0.85, ge=0.0, le=1.0)
    synonym_rate: float = Field(0.2, ge=0.0, le=1.0)
    n_pretrain_images: int = Field(4000, ge=1)
    n_pool_pairs: int = Field(512, ge=1)
    n_heldout_pairs: int = Field(256, ge=1)
    n_pope_images: int = Field(200, ge=1)
    n_caption_images: int = Field(150, ge=1)
    pairs_per_user: tuple[int, int] = (2, 8)
