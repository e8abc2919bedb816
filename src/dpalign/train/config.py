"""The training configuration: frozen pydantic models, validated completely before a run.

Unknown keys, an unknown loss, optimizer or schedule name, loss parameters out of range and
inputs a loss needs but the data cannot give all fail here, never mid-training. Paths are
taken as given (relative to the working directory) and resolved when the run starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers.trainer_utils import SchedulerType

from dpalign.losses import get_loss


def _one_of(kind: str, name: str, known: Iterable[str]) -> str:
    """``name`` if it is among ``known``, else a ValueError listing them."""
    known = list(known)
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")
    return name


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(Section):
    train: Path
    heldout: Path | None = None
    k: int | None = Field(None, ge=1, description="few-shot size; None = the whole file")
    seed: int = 0
    hardness_field: str = "hardness_score"
    max_length: int | None = Field(
        None, ge=1, description="most tokens in a row (templated prompt with its image "
                                "tokens + the longer response); a longer pair is refused "
                                "before training, never cut. None = the model's maximum "
                                "positions (text config max_position_embeddings)")


class LossConfig(Section):
    name: str = "dpo"
    beta: float = Field(0.1, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)
    sft_weight: float = Field(0.0, ge=0)
    length_normalize: bool = Field(
        False, description="use per-token mean log-probs (TRL does this for IPO)")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        get_loss(name)
        return name

    @model_validator(mode="after")
    def _params(self) -> LossConfig:
        get_loss(self.name).make_params(self.params)
        return self


class LoraConfig(Section):
    enabled: bool = True
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                              "o_proj"])
    scope: str | None = Field(
        None, description="only modules whose path contains this; '' = anywhere; unset = "
                          "the model family's language model (language_model, text_model)")


class OptimConfig(Section):
    name: str = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        from dpalign.train.optim import OPTIMIZERS

        return _one_of("optimizer", name, OPTIMIZERS)

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        return _one_of("schedule", name, [s.value for s in SchedulerType])


class LoopConfig(Section):
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int | None = Field(
        None, ge=1, description="pairs per forward/backward: a batch (a Poisson-sampled one "
                                "too) is run in chunks of this many pairs and their gradients "
                                "summed; the same update in less memory. None = whole batch")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    device: str = Field("auto", description="auto (a CUDA GPU if visible, else cpu) | cpu | "
                                            "cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model weights: auto = bfloat16 on a GPU that has it, else "
                            "float32; LoRA adapters stay float32 (peft)")

    @model_validator(mode="after")
    def _one_length(self) -> LoopConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.steps and train.epochs")
        return self


class EvalConfig(Section):
    every: int | None = Field(None, ge=1, description="held-out evaluation every N steps")
    batch_size: int = Field(32, ge=1)
    world: bool | Literal["end"] = Field(
        True, description="POPE and CHAIR when the run names a world: at every evaluation "
                          "(true), never (false) or only at the last step (end)")
    limit: int | None = Field(100, ge=1, description="images per POPE/CHAIR part")
    heldout_pairs: int | None = Field(
        None, ge=1, description="held-out pairs evaluated: the file's first N; None = all")


class CheckpointConfig(Section):
    every: int | None = Field(None, ge=1)
    keep: int = Field(2, ge=1)


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
        from dpalign.privacy.per_pair import ENGINES

        return _one_of("engine", name, ENGINES)

    @model_validator(mode="after")
    def _one_noise(self) -> PrivacyConfig:
        if not self.enabled and self.noise_multiplier is not None:
            raise ValueError("privacy.noise_multiplier is set but privacy.enabled is false")
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give privacy.noise_multiplier (a fixed sigma), "
                             "privacy.target_epsilon (sigma calibrated to it), or both (a "
                             "fixed sigma, training stopped before the target is exceeded)")
        return self


class TrainConfig(Section):
    """Everything ``dpalign train`` needs; ``model`` is a local model folder."""

    model: Path
    trust_remote_code: bool = Field(
        False, description="run Python code shipped in the model folder (only for folders "
                           "you trust); off, only transformers' own classes load")
    data: DataConfig
    world: Path | None = None
    loss: LossConfig = LossConfig()
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig(steps=50)
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="before")
    @classmethod
    def _robust_flip_rate(cls, data: Any) -> Any:
        """With label-DP and the robust loss, the loss's known flip rate defaults to the
        randomized-response rate 1 / (1 + e^eps)."""
        if not isinstance(data, dict):
            return data
        privacy, loss = data.get("privacy") or {}, data.get("loss") or {}
        eps = privacy.get("label_epsilon") if isinstance(privacy, dict) else None
        if eps is None or not isinstance(loss, dict) or loss.get("name") != "robust":
            return data
        params = dict(loss.get("params") or {})
        if "flip_rate" not in params and isinstance(eps, (int, float)) and eps > 0:
            from dpalign.privacy.label_dp import flip_probability

            params["flip_rate"] = flip_probability(float(eps))
        return {**data, "loss": {**loss, "params": params}}
