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
    ``train.batch_size`` units, so the sample rate is batch_size / units. ``clipping``
    chooses the rule (``dpalign.privacy.clipping``): fixed C, adaptive C_t (its noisy count
    shares sigma with the gradient, so the accounting is unchanged) or automatic.
    """

    enabled: bool = Field(False, description="train with DP-SGD (per-unit clipping, Gaussian "
                                             "noise, accounting); off = no DP-SGD")
    unit: Literal["example", "user"] = Field(
        "example", description="the privacy unit: example (one pair) or user (all pairs of "
                               "one metadata.user_id)")
    noise_multiplier: float | None = Field(
        None, ge=0, description="sigma (noise std / C); None = calibrated to target_epsilon; "
                                "with both, training stops before the target is exceeded")
    target_epsilon: float | None = Field(
        None, gt=0, description="epsilon budget at delta: sigma is calibrated to it for the "
                                "planned steps and sample rate unless noise_multiplier is set")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) "
                                                       "guarantee")
    max_grad_norm: float = Field(1.0, gt=0, description="per-unit clipping norm C")
    sampling: Literal["poisson", "shuffle"] = Field(
        "poisson", description="poisson (each unit joins a batch with rate batch_size / "
                               "units) or shuffle (exactly batch_size units drawn afresh each "
                               "step; accounted with rdp)")
    accountant: Literal["pld", "rdp"] = Field("pld", description="dp_accounting's PLD or RDP "
                                                                 "accountant")
    engine: str = Field("hooks", description="per-pair gradients: hooks (Linear layers, "
                                             "one backward) or loop (any parameter)")
    secure_noise: bool = Field(False, description="noise seeded from OS entropy "
                                                  "(not reproducible: for deployment)")
    noise_seed: int = Field(0, description="seed of each step's noise generator (noise_seed, "
                                           "step); unused with secure_noise")
    account_every: int = Field(10, ge=1, description="log epsilon every N steps")
    clipping: Literal["fixed", "adaptive", "automatic"] = Field(
        "fixed", description="fixed C; adaptive C_t tracking a norm quantile (Andrew et al. "
                             "2021); automatic g C / (||g|| + auto_gamma) (Bu et al. 2023)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: the quantile "
                                                                "gamma of unit norms C tracks")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: eta_C of the geometric update")
    count_noise: float | None = Field(
        None, gt=0, description="adaptive: sigma_b of the unclipped count (None: max(expected "
                                "batch / 20, 1.2 sigma)); needs 2 sigma_b > sigma")
    auto_gamma: float = Field(0.01, gt=0, description="automatic: gamma in C / (||g|| + gamma)")
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
        if self.clipping != "fixed" and self.max_grad_norm == float("inf"):
            raise ValueError(f"privacy.clipping={self.clipping} needs a finite "
                             "privacy.max_grad_norm")
        sigma, count = self.noise_multiplier, self.count_noise
        if (self.clipping == "adaptive" and sigma and count is not None
                and not 2 * count > sigma):
            raise ValueError(f"privacy.clipping=adaptive needs 2 * privacy.count_noise "
                             f"({2 * count:g}) > privacy.noise_multiplier ({sigma:g}): the "
                             "gradient's noise multiplier (sigma^-2 - (2 count_noise)^-2)^-1/2 "
                             "does not exist otherwise")
        return self
