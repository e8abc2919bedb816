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
  lr: [null]                 # null = base optim.lr (or the mechanism's override)
overrides:                   # dotted keys applied per mechanism (e.g. DP wants a larger lr)
  dp_sgd: {optim.lr: 2.0e-3}
```
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpalign.config import ConfigError, load_yaml_config

Mechanism = Literal["none", "dp_sgd", "label_dp"]
PRESETS = ("quickstart", "full")


class GridConfig(BaseModel):
    """The axes of the grid; every combination is one run (after normalisation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mechanism: list[Mechanism] = Field(default_factory=lambda: ["dp_sgd"], min_length=1)
    epsilon: list[float] = Field(default_factory=lambda: [math.inf], min_length=1)
    k: list[int] = Field(default_factory=lambda: [64], min_length=1)
    seed: list[int] = Field(default_factory=lambda: [0], min_length=1)
    loss: list[str] = Field(default_factory=lambda: ["dpo"], min_length=1)
    lr: list[float | None] = Field(default_factory=lambda: [None], min_length=1)

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


class StudyConfig(BaseModel):
    """What to run; ``base`` is a ``TrainConfig`` as a dict (model, world and data files are
    filled in from ``model`` and ``world``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: Path
    world: Path
    base: dict[str, Any] = Field(default_factory=dict)
    grid: GridConfig = Field(default_factory=GridConfig)
    overrides: dict[Mechanism, dict[str, Any]] = Field(default_factory=dict)
    workers: int = Field(2, ge=1, description="runs at the same time (local backend)")


def preset_path(name: str) -> Path:
    """The packaged YAML of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown study preset {name!r}; known: {', '.join(PRESETS)}")
    return Path(str(resources.files("dpalign.study") / "presets" / f"{name}.yaml"))


def load_study(path: Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read and validate a study YAML (``ConfigError`` names the file and the field)."""
    return load_yaml_config(StudyConfig, path, overrides or [])
