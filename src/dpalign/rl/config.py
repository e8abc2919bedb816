"""Settings of reward-model training (``reward:``) and of RL against a reward model
(``rl:``, with ``method: rloo | grpo``) in a training config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from dpalign.config import Section
from dpalign.online.config import METHODS as PAIR_METHODS

RL_METHODS = ("rloo", "grpo")
"""Policy-gradient methods against a reward model: ``rloo`` (leave-one-out baseline, the
sequence's summed log-prob) and ``grpo`` (group-normalised advantages, per-token mean)."""

METHODS = (*PAIR_METHODS, *RL_METHODS)
"""Every ``method`` of a training run: the preference-pair methods
(``dpalign.online.config.METHODS``) and the RL methods."""

FACTS = ("none", "objects", "field")
"""What the reward model is shown besides the prompt (factual augmentation): nothing, the
record's ``metadata.objects`` (the world's ground truth), or the metadata field
``reward.facts_field`` (a caption in real data)."""


class RewardConfig(Section):
    """``reward.enabled``: the run trains a reward model (``dpalign reward train``)."""

    enabled: bool = Field(False, description="train a reward model (a scalar head on the last "
                                             "response token) with the Bradley-Terry loss "
                                             "instead of a policy")
    facts: Literal[FACTS] = Field(  # type: ignore[valid-type]
        "none", description="factual augmentation: none | objects (metadata.objects) | "
                            "field (metadata.<facts_field>), appended to the reward model's "
                            "prompt only")
    facts_field: str = Field("caption", description="the metadata key read when facts: field")


class RLConfig(Section):
    """RL against a reward model (``method: rloo | grpo``); the samples per prompt and their
    sampling are ``online.samples`` / ``online.sampling``; ``online.judge`` scores them too
    (the uncheatable counterpart of the reward model's score)."""

    reward_model: Path | None = Field(None, description="a reward run directory (dpalign "
                                                        "reward train) or its final/ folder")
    kl_beta: float = Field(0.05, ge=0, description="KL penalty: each sample's reward minus "
                                                   "kl_beta * (log pi - log ref) of the sample")
    composition: Literal["sequential", "parallel"] = Field(
        "sequential", description="how the reward model's privacy cost composes with the "
                                  "policy's: sequential (same people's data; always valid) or "
                                  "parallel (disjoint data: checked on ids and images)")
    advantage_eps: float = Field(1e-4, gt=0, description="GRPO: added to the group's reward "
                                                         "std before dividing")
