"""The ``loss`` section of a training config: a loss from the registry and its parameters,
checked when the config is read (an unknown name or a bad parameter never reaches a run)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from dpalign.config import Section
from dpalign.losses import get_loss


class LossConfig(Section):
    """The loss: a registered ``name`` (``dpalign.losses.LOSSES``), its ``beta`` and its own
    ``params``."""

    name: str = Field("dpo", description="a registered loss (dpalign.losses.LOSSES: dpo, ipo, "
                                         "robust, mdpo, dama, simpo, orpo, ...); "
                                         "bradley_terry trains reward models")
    beta: float = Field(0.1, gt=0, description="the loss's beta (DPO: scale of the implicit "
                                               "reward beta log pi/pi_ref); held-out rewards "
                                               "use it too")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the loss's own keyword parameters (e.g. robust "
                                               "flip_rate); unknown keys are refused")
    sft_weight: float = Field(0.0, ge=0, description="weight of an SFT term (per-token NLL of "
                                                     "the chosen response) added to each "
                                                     "pair's loss; 0 = none")
    length_normalize: bool = Field(
        False, description="use per-token mean log-probs (TRL does this for IPO)")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        get_loss(name)
        return name

    @model_validator(mode="after")
    def _params(self) -> LossConfig:
        spec = get_loss(self.name)
        spec.make_params(self.params)
        if self.length_normalize and spec.averages_tokens:
            raise ValueError(f"loss {self.name!r} takes per-token mean log-probs itself; "
                             "length_normalize would divide by the token counts twice")
        return self
