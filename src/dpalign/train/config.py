"""The training configuration: frozen pydantic models, validated completely before a run.

The sections of the losses, LoRA, privacy and the optimizer live beside the code they
configure (``LossConfig``, ``LoraConfig``, ``PrivacyConfig``, ``OptimConfig``); this module
adds the run's own sections and composes them into ``TrainConfig``.

Unknown keys, an unknown loss, optimizer or schedule name, loss parameters out of range and
inputs a loss needs but the data cannot give all fail here, never mid-training. Paths are
taken as given (relative to the working directory) and resolved when the run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from dpalign.config import Section
from dpalign.losses import LOSSES, REWARD_LOSSES
from dpalign.losses.config import LossConfig
from dpalign.models.lora import LoraConfig
from dpalign.online.config import BDHSConfig, OnlineConfig
from dpalign.privacy.config import PrivacyConfig
from dpalign.rl.config import METHODS, RL_METHODS, RewardConfig, RLConfig
from dpalign.track.config import LogConfig
from dpalign.train.optim import OptimConfig


class DataConfig(Section):
    train: Path = Field(description="the preference pairs: a JSONL file or a saved dataset "
                                    "folder; data.k of them are drawn for training")
    heldout: Path | None = Field(
        None, description="held-out pairs, logged as heldout_* (eval.validation_fraction may "
                          "split off val_*); None = no held-out evaluation")
    k: int | None = Field(None, ge=1, description="few-shot size; None = the whole file")
    seed: int = Field(0, description="seed of the few-shot draw (data.k), of label-DP's "
                                     "randomized response and of mdpo's corrupted images")
    hardness_field: str = Field("hardness_score", description="metadata field read as each "
                                                              "pair's hardness (loss dama)")
    max_length: int | None = Field(
        None, ge=1, description="most tokens in a row (templated prompt with its image "
                                "tokens + the longer response); a longer pair is refused "
                                "before training, never cut. None = the model's maximum "
                                "positions (text config max_position_embeddings)")


class LoopConfig(Section):
    steps: int | None = Field(None, ge=1, description="optimizer steps; give exactly one of "
                                                      "steps and epochs")
    epochs: int | None = Field(None, ge=1, description="passes over the training pairs: steps "
                                                       "= epochs x ceil(pairs / batch_size)")
    batch_size: int = Field(8, ge=1, description="pairs per step (rloo/grpo: prompts); under "
                                                 "DP-SGD the expected batch: sample rate = "
                                                 "batch_size / privacy units")
    micro_batch_size: int | None = Field(
        None, ge=1, description="pairs per forward/backward: a batch (a Poisson-sampled one "
                                "too) is run in chunks of this many pairs and their gradients "
                                "summed; the same update in less memory. None = whole batch")
    seed: int = Field(0, description="seed of batch sampling, torch (LoRA init, dropout) and "
                                     "online generation")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's "
                                                        "default")
    log_every: int = Field(1, ge=1, description="unused by dpalign train: every step is "
                                                "written to metrics.jsonl")
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
    batch_size: int = Field(32, ge=1, description="pairs per forward pass for held-out "
                                                  "log-probs; prompts per POPE/CHAIR batch")
    world: bool | Literal["end"] = Field(
        True, description="POPE and CHAIR when the run names a world: at every evaluation "
                          "(true), never (false) or only at the last step (end)")
    limit: int | None = Field(100, ge=1, description="images per POPE/CHAIR part")
    pope_splits: list[Literal["random", "popular", "adversarial"]] = Field(
        default_factory=lambda: ["random", "popular", "adversarial"], min_length=1,
        description="POPE splits answered (they share their positive questions)")
    heldout_pairs: int | None = Field(
        None, ge=1, description="held-out pairs evaluated: the file's first N; None = all")
    validation_fraction: float | None = Field(
        None, gt=0, lt=1, description="split the held-out pairs into a validation part (this "
                                      "fraction, by id hash) logged as val_*, and a test part "
                                      "logged as heldout_*; for tuning without touching test")
    validation: Path | None = Field(
        None, description="a separate (e.g. public) file of validation pairs, logged as "
                          "val_*; the held-out file stays the test set")

    @model_validator(mode="after")
    def _one_validation(self) -> EvalConfig:
        if self.validation_fraction is not None and self.validation is not None:
            raise ValueError("give eval.validation_fraction (a part of the held-out pairs) or "
                             "eval.validation (a file), not both")
        return self


class CheckpointConfig(Section):
    every: int | None = Field(None, ge=1, description="save a checkpoint every N steps; the "
                                                      "last step is always saved")
    keep: int = Field(2, ge=1, description="newest checkpoints kept; older ones are deleted")


class TrainConfig(Section):
    """Everything ``dpalign train`` needs; ``model`` is a local model folder."""

    model: Path = Field(description="local model folder (transformers format) to train")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped in the model folder (only for folders "
                           "you trust); off, only transformers' own classes load")
    data: DataConfig
    world: Path | None = Field(None, description="a world folder (dpalign world) for POPE and "
                                                 "CHAIR (eval.world); None = none")
    loss: LossConfig = LossConfig()
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig(steps=50)
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "offline", description="where pairs come from: offline (the file's chosen/rejected), "
                               "online (sampled from the policy each step, ranked by "
                               "online.judge), mixed (online.offline_fraction of them "
                               "offline), bdhs (the file's chosen vs a BDHS rejection made "
                               "by the base model before training), rloo | grpo (RL against "
                               "the reward model rl.reward_model, online.samples answers per "
                               "prompt)")
    online: OnlineConfig = OnlineConfig()
    bdhs: BDHSConfig = BDHSConfig()
    reward: RewardConfig = RewardConfig()
    rl: RLConfig = RLConfig()
    log: LogConfig = Field(
        default_factory=LogConfig, exclude_if=lambda log: log == LogConfig(),
        description="experiment tracking: TensorBoard / MLflow mirrors of metrics.jsonl and "
                    "eval.jsonl (left out of the saved config while it is the default)")

    @model_validator(mode="after")
    def _reward_model(self) -> TrainConfig:
        """A reward run trains with the Bradley-Terry loss on the recorded pairs; that loss
        trains nothing else."""
        if not self.reward.enabled:
            if self.loss.name in REWARD_LOSSES:
                raise ValueError(f"loss {self.loss.name!r} trains reward models: use "
                                 "`dpalign reward train` (reward.enabled: true)")
            return self
        if self.loss.name not in REWARD_LOSSES:
            raise ValueError(f"reward.enabled trains with a reward-model loss "
                             f"({', '.join(sorted(REWARD_LOSSES))}), not {self.loss.name!r}")
        if self.method != "offline":
            raise ValueError(f"a reward model trains on the recorded pairs (method: offline), "
                             f"not method {self.method!r}")
        if self.loss.sft_weight or self.loss.length_normalize:
            raise ValueError("a reward model has no log-probs: loss.sft_weight must be 0 and "
                             "loss.length_normalize false")
        return self

    @model_validator(mode="after")
    def _rl(self) -> TrainConfig:
        """RL needs a reward model and LoRA (the reference is the policy with its adapters
        off)."""
        if self.method not in RL_METHODS:
            return self
        if self.rl.reward_model is None:
            raise ValueError(f"method {self.method!r} needs rl.reward_model (a reward run "
                             "directory from `dpalign reward train`, or its final/ folder)")
        if not self.lora.enabled:
            raise ValueError(f"method {self.method!r} needs lora.enabled: true (the KL "
                             "reference is the policy with its adapters turned off)")
        return self

    @model_validator(mode="after")
    def _generated_pairs(self) -> TrainConfig:
        """Online and mixed DPO take the reference from the policy with its adapters off
        and make pairs without a hardness score or a batch context (DAMA)."""
        if self.method not in ("online", "mixed"):
            return self
        if not self.lora.enabled:
            raise ValueError(f"method {self.method!r} needs lora.enabled: true (the reference "
                             "log-probs of new pairs come from the policy with its adapters "
                             "turned off)")
        spec = LOSSES[self.loss.name]
        if spec.needs_hardness or spec.batch_context is not None:
            raise ValueError(f"loss {self.loss.name!r} needs a hardness score and a batch "
                             f"context, which pairs made online do not have; method "
                             f"{self.method!r} takes any other loss")
        return self

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
