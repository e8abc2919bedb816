"""A study: one base training config, a grid over what the question varies, and settings
for running it. Validated up front (every grid point's ``TrainConfig`` is built before the
first run starts), frozen, read from YAML or from a packaged preset by name.

```yaml
name: quickstart
model: runs/demo/base        # base VLM folder
world: runs/demo/world       # world: preference pool, held-out pairs, POPE/CHAIR
base: {...}                  # a TrainConfig without model/world/data.train/data.heldout
grid:
  mechanism: [dp_sgd]        # none | dp_sgd | label_dp
  epsilon: [.inf, 8, 2, 0.5] # .inf = no noise (the run is non-private, mechanism "none")
  k: [32, 128]
  seed: [0, 1, 2]
  loss: [dpo]
  method: [offline]          # offline | online | mixed | bdhs (dpalign.online): compared,
                             # never tuned over; non-offline runs are named ...-dpo-online-s0
  lr: [null]                 # null = base optim.lr (or the mechanism's override)
  privacy.max_grad_norm: [0.3, 1.0]   # any dotted TrainConfig key is an axis too
  sample_rate: [0.25, 1.0]   # expected batch as a fraction of K (train.batch_size = q K)
overrides:                   # dotted keys applied per mechanism (e.g. DP wants a larger lr)
  dp_sgd: {optim.lr: 2.0e-3}
audit: {kind: gradient}      # optional: train every run with canaries (dpalign.audit) and
                             # bound its epsilon from below (audit.json per run)
```
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dpalign.audit.config import AuditConfig
from dpalign.config import ConfigError, load_yaml_config
from dpalign.rl.config import METHODS

Mechanism = Literal["none", "dp_sgd", "label_dp"]
PRESETS = ("quickstart", "full", "answer", "online", "rl", "reward")
SAMPLE_RATE = "sample_rate"
"""The one axis that is not a dotted key: the expected batch as a fraction q of K, so that
``train.batch_size = max(1, round(q K))`` (the DP sample rate is then q)."""
RESERVED = {"data.k": "k", "train.seed": "seed", "privacy.noise_seed": "seed",
            "privacy.target_epsilon": "epsilon", "privacy.enabled": "mechanism",
            "loss.name": "loss"}
"""Dotted keys the grid sets itself: an axis over them is refused (name the grid field)."""


class GridConfig(BaseModel):
    """The axes of the grid; every combination is one run (after normalisation).

    Besides the named fields, any dotted ``TrainConfig`` key (``privacy.max_grad_norm``,
    ``optim.lr``, ``optim.name``, ``train.steps``, ``lora.r``, ``privacy.clipping``, ...) and
    ``sample_rate`` are axes: a list of values each. They are checked against
    ``TrainConfig`` when the grid is expanded (every run's config is built before any run).
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    mechanism: list[Mechanism] = Field(
        default_factory=lambda: ["dp_sgd"], min_length=1,
        description="none | dp_sgd (DP-SGD to each epsilon) | label_dp (randomized response "
                    "on the labels; dpo trains as robust)")
    epsilon: list[float] = Field(
        default_factory=lambda: [math.inf], min_length=1,
        description="target epsilons of dp_sgd / label_dp; .inf = no noise (mechanism none)")
    k: list[int] = Field(default_factory=lambda: [64], min_length=1,
                         description="few-shot sizes (data.k) drawn from the world's pool")
    seed: list[int] = Field(default_factory=lambda: [0], min_length=1,
                            description="run seeds (train.seed, privacy.noise_seed): batch "
                                        "order, LoRA init, DP noise")
    loss: list[str] = Field(default_factory=lambda: ["dpo"], min_length=1,
                            description="loss names (loss.name)")
    lr: list[float | None] = Field(
        default_factory=lambda: [None], min_length=1,
        description="learning rates (optim.lr); null = base optim.lr or the mechanism's "
                    "override")
    method: list[str] = Field(
        default_factory=lambda: ["offline"], min_length=1,
        description="offline | online | mixed | bdhs | rloo | grpo, each once: compared, "
                    "never tuned over")

    @field_validator("method")
    @classmethod
    def _methods(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if v not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
        if len(set(values)) != len(values):
            raise ValueError(f"method: each method once, got {values}")
        return values

    @field_validator("epsilon")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not v > 0]
        if bad:
            raise ValueError(f"epsilon must be > 0 (.inf for no noise), got {bad}")
        return values

    @field_validator("k")
    @classmethod
    def _shots(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"k must be >= 1, got {values}")
        return values

    @model_validator(mode="after")
    def _setting_axes(self) -> GridConfig:
        for key, values in (self.model_extra or {}).items():
            if key != SAMPLE_RATE and "." not in key:
                raise ValueError(f"grid.{key}: not an axis; axes are mechanism, epsilon, k, "
                                 "seed, loss, lr, method, sample_rate and dotted TrainConfig keys "
                                 "(e.g. privacy.max_grad_norm)")
            if key in RESERVED:
                raise ValueError(f"grid.{key}: set by the grid itself; use grid.{RESERVED[key]}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{key}: give a non-empty list of values")
            if key == SAMPLE_RATE and not all(isinstance(v, (int, float)) and 0 < v <= 1
                                              for v in values):
                raise ValueError(f"grid.sample_rate: fractions of K in (0, 1], got {values}")
        return self

    @property
    def settings(self) -> dict[str, list[Any]]:
        """The extra axes, ``{dotted key or "sample_rate": values}``, in the order given."""
        return dict(self.model_extra or {})


class TuneConfig(BaseModel):
    """How the study picks a configuration per (mechanism, epsilon, K, loss, method): the
    method (offline / online / mixed / bdhs) is compared, never tuned over.

    ``metric``: a runs-table column (higher is better) averaged over seeds; by default the
    validation part of the held-out pairs. ``split``: ``private`` (the validation pairs come
    from the same private held-out data: choosing on them is itself a release that epsilon
    does not count, Papernot & Steinke 2022) or ``public`` (``eval.validation`` names a
    public file). ``fixed``: the settings, ``{axis: value}``, whose figures are shown "at
    fixed settings" beside the tuned ones; axes not named take their first value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field("final_val_reward_accuracy",
                        description="runs-table column tuned on, mean over seeds (higher is "
                                    "better; lower for CHAIR-type)")
    split: Literal["private", "public"] = Field(
        "private", description="private (validation pairs from the private held-out data; "
                               "uncounted by epsilon) | public (base.eval.validation)")
    fixed: dict[str, Any] = Field(default_factory=dict,
                                  description="{axis: value} shown 'at fixed settings' beside "
                                              "the tuned; unnamed axes take their first value")


class HalvingConfig(BaseModel):
    """Successive halving over each tuning group's configurations (same mechanism, epsilon,
    K, loss and method: one method is never pruned in favour of another): every
    configuration first runs with the first ``seeds`` seeds of ``grid.seed``; then only the
    best ``ceil(keep x n)`` by ``tune.metric`` (mean over those seeds) run the remaining
    seeds. The others are recorded as ``pruned``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seeds: int = Field(2, ge=1, description="the first N seeds of grid.seed run by every "
                                            "configuration")
    keep: float = Field(1 / 3, gt=0, le=1, description="fraction of each group's "
                                                        "configurations (ceil(keep x n)) "
                                                        "that run the other seeds")


class StudyConfig(BaseModel):
    """What to run; ``base`` is a ``TrainConfig`` as a dict (model, world and data files are
    filled in from ``model`` and ``world``). ``audit``: when set, every run is trained with
    these canaries (``dpalign.audit.run.run_audit``) and writes ``audit.json`` besides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$",
                      description="the study's name (letters, digits, _ . -); the default "
                                  "MLflow experiment")
    model: Path = Field(description="base model folder every run trains")
    world: Path = Field(description="world folder: its pool (data.train), held-out pairs "
                                    "(data.heldout) and POPE/CHAIR")
    base: dict[str, Any] = Field(default_factory=dict,
                                 description="a TrainConfig as a dict, without model, world, "
                                             "data.train and data.heldout (filled in)")
    grid: GridConfig = Field(default_factory=GridConfig)
    overrides: dict[Mechanism, dict[str, Any]] = Field(
        default_factory=dict, description="{mechanism: {dotted TrainConfig key: value}} over "
                                          "base; the grid's values apply last")
    tune: TuneConfig = Field(default_factory=TuneConfig)
    halving: HalvingConfig | None = None
    workers: int = Field(2, ge=1, description="runs at the same time (local backend)")
    audit: AuditConfig | None = None
    text: bool = Field(False, description="text-only runs: the world's pairs as text (each "
                                          "image stated in words, dpalign world text), no "
                                          "POPE/CHAIR; for a causal LM model")

    @model_validator(mode="after")
    def _method_from_grid(self) -> StudyConfig:
        """A run's method is its grid point's (``grid.method``), never the base's."""
        if "method" in self.base or any("method" in o for o in self.overrides.values()):
            raise ValueError("the method is set by grid.method (a list: offline, online, "
                             "mixed, bdhs), not by base or overrides")
        return self


def preset_path(name: str) -> Path:
    """The packaged YAML of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown study preset {name!r}; known: {', '.join(PRESETS)}")
    return Path(str(resources.files("dpalign.study") / "presets" / f"{name}.yaml"))


def load_study(path: Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read and validate a study YAML (``ConfigError`` names the file and the field)."""
    return load_yaml_config(StudyConfig, path, overrides or [])
