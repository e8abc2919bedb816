"""The ``privacy`` section of a training config: DP-SGD's unit, noise, clipping, sampling
and accounting, checked when the config is read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dpalign.config import Section, one_of
from dpalign.privacy.per_pair import ENGINES


class PrivacyConfig(Section):
    """DP-SGD with the preference pair (or the user) as the privacy unit (DESIGN §2).

    Give ``noise_multiplier`` (sigma) or ``target_epsilon``; with a target, sigma is
    calibrated for the planned steps and sample rate before training, and training stops
    before the accountant's epsilon would exceed it. The expected batch is
    ``train.batch_size`` units, so the sample rate is batch_size / units.
    """

    enabled: bool = False
    unit: Literal["example", "user"] = "example"
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="per-unit clipping norm C")
    sampling: Literal["poisson", "shuffle"] = "poisson"
    accountant: Literal["pld", "rdp"] = "pld"
    engine: str = Field("hooks", description="per-pair gradients: hooks (Linear layers, "
                                             "one backward) or loop (any parameter)")
    secure_noise: bool = Field(False, description="noise seeded from OS entropy "
                                                  "(not reproducible: for deployment)")
    noise_seed: int = 0
    account_every: int = Field(10, ge=1, description="log epsilon every N steps")
    label_epsilon: float | None = Field(
        None, gt=0, description="randomized response on each pair's label (label-level DP, "
                                "applied once with data.seed); pair it with loss robust")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, name: str) -> str:
        return one_of("engine", name, ENGINES)

    @model_validator(mode="after")
    def _one_noise(self) -> PrivacyConfig:
        if not self.enabled and self.noise_multiplier is not None:
            raise ValueError("privacy.noise_multiplier is set but privacy.enabled is false")
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give privacy.noise_multiplier (a fixed sigma), "
                             "privacy.target_epsilon (sigma calibrated to it), or both (a "
                             "fixed sigma, training stopped before the target is exceeded)")
        return self
