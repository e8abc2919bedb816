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

    seed: int = Field(0, description="seed of every random choice (also --seed)")
    image_size: int = Field(64, ge=32, le=512, description="image side in pixels")
    grid: int = Field(2, ge=2, le=4, description="objects sit in a grid x grid layout")
    max_objects: int = Field(4, ge=1, le=16, description="most objects in one scene")
    cooccurrence: float = Field(0.9, ge=0.0, le=1.0,
                                description="scales each partner pair's co-occurrence")
    hallucination_rate: float = Field(0.85, ge=0.0, le=1.0,
                                      description="scales the caption bias: an absent "
                                                  "partner mentioned anyway")
    synonym_rate: float = Field(0.2, ge=0.0, le=1.0,
                                description="chance an object is named by a synonym")
    n_pretrain_images: int = Field(4000, ge=1, description="images of the (biased) "
                                                           "pretraining split")
    n_pool_pairs: int = Field(512, ge=1, description="preference pairs in the pool")
    n_heldout_pairs: int = Field(256, ge=1, description="held-out preference pairs")
    n_pope_images: int = Field(200, ge=1, description="images of the POPE questions")
    n_caption_images: int = Field(150, ge=1, description="images captioned for CHAIR")
    pairs_per_user: tuple[int, int] = Field((2, 8), description="fewest and most pairs of "
                                                                "one user (inclusive)")
