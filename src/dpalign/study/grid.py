"""Grid expansion: a study's axes -> named runs, each with its own ``TrainConfig``.

Normalisation, so that no two runs do the same thing:
- epsilon = inf means no noise: the run's mechanism becomes ``none``;
- mechanism ``none`` has epsilon inf, whatever the grid says;
- label-DP with DPO trains the robust DPO loss (``robust``, flip rate from epsilon);
  other losses train as they are on the flipped labels.
Seeds vary the batch order, LoRA initialisation and DP noise (``train.seed`` and
``privacy.noise_seed``); the few-shot subset (``data.seed``) is the study's, so K=32 is a
prefix of K=128 and seeds isolate the training randomness.

Run names read ``{mechanism}-eps{eps}-k{k}-{loss}[-lr{lr}]-s{seed}``; the grid point is the
name without the seed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from dpalign.config import ConfigError, deep_merge, nest_dotted
from dpalign.study.config import StudyConfig
from dpalign.train.config import TrainConfig
from dpalign.world.load import World

LABEL_DP_LOSS = {"dpo": "robust"}


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    mechanism: str
    epsilon: float
    k: int
    loss: str
    lr: float | None
    seed: int

    @property
    def point(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.mechanism}-eps{eps}-k{self.k}-{self.loss}{lr}"

    @property
    def name(self) -> str:
        return f"{self.point}-s{self.seed}"

    def columns(self) -> dict[str, Any]:
        """The grid's columns of this run in the results table."""
        return {"run": self.name, "point": self.point, "mechanism": self.mechanism,
                "epsilon_target": self.epsilon, "k": self.k, "loss": self.loss,
                "lr": self.lr, "seed": self.seed}


def normalise(mechanism: str, epsilon: float) -> tuple[str, float]:
    """(none, inf) for every run without noise; otherwise unchanged."""
    if mechanism == "none" or math.isinf(epsilon):
        return "none", math.inf
    return mechanism, epsilon


def expand(study: StudyConfig) -> list[Point]:
    """Every distinct run of the grid, sorted (mechanism, epsilon, k, loss, lr, seed)."""
    g = study.grid
    points = {Point(*normalise(m, e), k, loss, lr, s)
              for m, e, k, loss, lr, s in itertools.product(
                  g.mechanism, g.epsilon, g.k, g.loss, g.lr, g.seed)}
    return sorted(points, key=lambda p: (p.mechanism, p.epsilon, p.k, p.loss,
                                         -1.0 if p.lr is None else p.lr, p.seed))


def _mechanism(point: Point) -> dict[str, Any]:
    """The privacy section and loss name a mechanism implies."""
    privacy = {
        "none": {"enabled": False},
        "dp_sgd": {"enabled": True, "target_epsilon": point.epsilon, "noise_multiplier": None,
                   "noise_seed": point.seed},
        "label_dp": {"enabled": False, "label_epsilon": point.epsilon},
    }[point.mechanism]
    loss = (LABEL_DP_LOSS.get(point.loss, point.loss) if point.mechanism == "label_dp"
            else point.loss)
    return {"privacy": privacy, "loss": {"name": loss}}


def train_config(study: StudyConfig, point: Point) -> TrainConfig:
    """The run's ``TrainConfig``: base, then the mechanism's overrides, then the point."""
    world = World.load(study.world)
    data: dict[str, Any] = deep_merge(study.base, {
        "model": str(study.model), "world": str(study.world),
        "data": {"train": str(world.pool_file), "heldout": str(world.heldout_file),
                 "k": point.k},
        "train": {"seed": point.seed}})
    data = deep_merge(data, nest_dotted(study.overrides.get(point.mechanism, {})))  # type: ignore[call-overload]
    data = deep_merge(data, _mechanism(point))
    if point.lr is not None:
        data = deep_merge(data, {"optim": {"lr": point.lr}})
    try:
        return TrainConfig.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"study {study.name!r}, run {point.name}: {exc}") from exc
