"""Grid expansion: a study's axes -> named runs, each with its own ``TrainConfig``.

Normalisation, so that no two runs do the same thing:
- epsilon = inf means no noise: the run's mechanism becomes ``none``;
- mechanism ``none`` has epsilon inf, whatever the grid says;
- label-DP with DPO trains the robust DPO loss (``robust``, flip rate from epsilon);
  other losses train as they are on the flipped labels.
Seeds vary the batch order, LoRA initialisation and DP noise (``train.seed`` and
``privacy.noise_seed``); the few-shot subset (``data.seed``) is the study's, so K=32 is a
prefix of K=128 and seeds isolate the training randomness.

Setting axes (dotted ``TrainConfig`` keys and ``sample_rate``) apply last, over the base and
the mechanism's overrides. ``privacy.*`` settings mean nothing without DP-SGD: runs of the
other mechanisms drop them, so the no-noise run is not repeated once per clipping norm.

Run names read ``{mechanism}-eps{eps}-k{k}-{loss}[-{method}][-lr{lr}][-{setting}...]-s{seed}``,
each setting written short (``SHORT``: ``C0.3``, ``q0.25``, ``T60``, ``adaptive``,
``dpadam_bc``); the method (``grid.method``) only when it is not ``offline``, so studies
without a method axis keep their names; the grid point is the name without the seed.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpalign.config import ConfigError, deep_merge, nest_dotted
from dpalign.data.records import read_preference_jsonl, write_preference_jsonl
from dpalign.data.text_pairs import text_pair
from dpalign.study.config import SAMPLE_RATE, StudyConfig
from dpalign.track.mlflow_sink import STORE, sqlite_uri
from dpalign.train.config import TrainConfig
from dpalign.world.load import World

TEXT_DIR = "text"  # a text study's pairs, in the study folder

LABEL_DP_LOSS = {"dpo": "robust"}
OFFLINE = "offline"
"""The method of runs trained on the recorded pairs (``TrainConfig.method``'s default)."""
SHORT = {"optim.lr": "lr", "privacy.max_grad_norm": "C", SAMPLE_RATE: "q", "train.steps": "T",
         "train.batch_size": "b", "lora.r": "r", "loss.beta": "beta", "optim.name": "",
         "privacy.clipping": "", "optim.weight_decay": "wd", "optim.schedule": ""}
"""How a setting appears in run names (prefix before its value); others: the key's last part."""

Settings = tuple[tuple[str, Any], ...]


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_label(key: str, value: Any) -> str:
    """``privacy.max_grad_norm``, 0.3 -> ``C0.3``; ``privacy.clipping``, adaptive ->
    ``adaptive``."""
    return f"{SHORT.get(key, key.rsplit('.', 1)[-1])}{_text(value)}"


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    mechanism: str
    epsilon: float
    k: int
    loss: str
    lr: float | None
    seed: int
    settings: Settings = ()
    method: str = OFFLINE

    @property
    def point(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        method = "" if self.method == OFFLINE else f"-{self.method}"
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        extra = "".join(f"-{setting_label(k, v)}" for k, v in self.settings)
        return f"{self.mechanism}-eps{eps}-k{self.k}-{self.loss}{method}{lr}{extra}"

    @property
    def name(self) -> str:
        return f"{self.point}-s{self.seed}"

    def columns(self) -> dict[str, Any]:
        """The grid's columns of this run in the results table."""
        lr = {} if self.lr is None else {"optim.lr": self.lr}  # the grid's lr axis
        return {"run": self.name, "point": self.point, "mechanism": self.mechanism,
                "epsilon_target": self.epsilon, "k": self.k, "loss": self.loss,
                "method": self.method, "seed": self.seed, **lr, **dict(self.settings)}


def normalise(mechanism: str, epsilon: float) -> tuple[str, float]:
    """(none, inf) for every run without noise; otherwise unchanged."""
    if mechanism == "none" or math.isinf(epsilon):
        return "none", math.inf
    return mechanism, epsilon


def _settings(mechanism: str, keys: list[str], values: tuple[Any, ...]) -> Settings:
    """The point's settings; ``privacy.*`` ones only for DP-SGD (they do nothing otherwise)."""
    return tuple((k, v) for k, v in zip(keys, values, strict=True)
                 if mechanism == "dp_sgd" or not k.startswith("privacy."))


def expand(study: StudyConfig) -> list[Point]:
    """Every distinct run of the grid, sorted (mechanism, epsilon, k, loss, method in grid
    order, lr, settings in grid order, seed)."""
    g = study.grid
    keys = list(g.settings)
    points = set()
    for m, e, k, loss, method, lr, s, *values in itertools.product(
            g.mechanism, g.epsilon, g.k, g.loss, g.method, g.lr, g.seed, *g.settings.values()):
        mechanism, epsilon = normalise(m, e)
        points.add(Point(mechanism, epsilon, k, loss, lr, s,
                         _settings(mechanism, keys, tuple(values)), method))
    order = {key: {_text(v): i for i, v in enumerate(vals)} for key, vals in g.settings.items()}
    return sorted(points, key=lambda p: (
        p.mechanism, p.epsilon, p.k, p.loss, g.method.index(p.method),
        -1.0 if p.lr is None else p.lr, [order[k][_text(v)] for k, v in p.settings], p.seed))


def _mechanism(point: Point) -> dict[str, Any]:
    """The privacy section and loss name a mechanism implies, and the point's method."""
    privacy = {
        "none": {"enabled": False},
        "dp_sgd": {"enabled": True, "target_epsilon": point.epsilon, "noise_multiplier": None,
                   "noise_seed": point.seed},
        "label_dp": {"enabled": False, "label_epsilon": point.epsilon},
    }[point.mechanism]
    loss = (LABEL_DP_LOSS.get(point.loss, point.loss) if point.mechanism == "label_dp"
            else point.loss)
    return {"privacy": privacy, "loss": {"name": loss}, "method": point.method}


def _data_files(study: StudyConfig, text_dir: Path | None) -> tuple[Path, Path]:
    """The world's pool and held-out files, or (``study.text``) their text-only versions,
    written once into ``text_dir`` (the study's ``text/``; atomically, the same bytes every
    time). The world folder itself is never written."""
    world = World.load(study.world)
    if not study.text:
        return world.pool_file, world.heldout_file
    if text_dir is None:
        raise ConfigError(f"study {study.name!r} is a text study: its run configs need the "
                          "folder for the text pairs (run_study gives OUT/text)")
    files = []
    for source in (world.pool_file, world.heldout_file):
        target = Path(text_dir) / source.name
        if not target.is_file():
            write_preference_jsonl(target, [text_pair(r) for r in read_preference_jsonl(source)])
        files.append(target)
    return files[0], files[1]


def train_config(study: StudyConfig, point: Point, text_dir: Path | None = None
                 ) -> TrainConfig:
    """The run's ``TrainConfig``: base, then the mechanism's overrides, then the point. A
    text study's runs read the text-only pairs (kept in ``text_dir``) and name no world
    (no POPE/CHAIR)."""
    pool, heldout = _data_files(study, text_dir)
    data: dict[str, Any] = deep_merge(study.base, {
        "model": str(study.model), "world": None if study.text else str(study.world),
        "data": {"train": str(pool), "heldout": str(heldout), "k": point.k},
        "train": {"seed": point.seed}})
    data = deep_merge(data, nest_dotted(study.overrides.get(point.mechanism, {})))  # type: ignore[call-overload]
    data = deep_merge(data, _mechanism(point))
    if point.lr is not None:
        data = deep_merge(data, {"optim": {"lr": point.lr}})
    settings = dict(point.settings)
    if SAMPLE_RATE in settings:
        settings["train.batch_size"] = max(1, round(settings.pop(SAMPLE_RATE) * point.k))
    data = deep_merge(data, nest_dotted(settings))
    try:
        return TrainConfig.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"study {study.name!r}, run {point.name}: {exc}") from exc


def with_tracking(cfg: TrainConfig, study: StudyConfig, point: Point, out: Path
                  ) -> TrainConfig:
    """``cfg`` with its ``log`` settings (the study's ``base.log``) made the study's: one
    MLflow experiment for the study (``log.mlflow.experiment``, default the study's name) in
    one store (``log.mlflow.tracking_uri``, default ``$MLFLOW_TRACKING_URI``, else
    ``OUT/mlflow.db``), one MLflow run per grid run named like it and tagged with its grid
    values (``grid.<column>``); TensorBoard files in each run's folder (``log.tensorboard.dir``
    set: ``DIR/<run name>``). Unchanged without tracking."""
    log = cfg.log
    if not log.to:
        return cfg
    tags = {"dpalign.study": study.name, "dpalign.point": point.point,
            **{f"grid.{k}": _text(v) for k, v in point.columns().items()
               if k not in ("run", "point")}, **log.mlflow.tags}
    uri = (log.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
           or sqlite_uri(Path(out) / STORE))
    mlflow = {"tracking_uri": uri, "experiment": log.mlflow.experiment or study.name,
              "run_name": point.name, "tags": tags}
    board = {"dir": None if log.tensorboard.dir is None
             else str(log.tensorboard.dir / point.name)}
    data = deep_merge(cfg.model_dump(mode="json"),
                      {"log": {"mlflow": mlflow, "tensorboard": board}})
    return TrainConfig.model_validate(data)


EFFECTIVE = ("lr", "optimizer", "batch_size", "sample_rate", "steps", "max_grad_norm",
             "clipping", "lora_r")
"""The runs table's columns of each run's effective settings (what it trained with, after the
base, the mechanism's overrides and the grid)."""


def effective_settings(cfg: TrainConfig) -> dict[str, Any]:
    """``EFFECTIVE`` of one run's config; DP-only settings are NaN / "none" without DP-SGD."""
    dp = cfg.privacy.enabled
    k = cfg.data.k
    return {"lr": cfg.optim.lr, "optimizer": cfg.optim.name,
            "batch_size": cfg.train.batch_size,
            "sample_rate": cfg.train.batch_size / k if k else math.nan,
            "steps": cfg.train.steps if cfg.train.steps is not None else math.nan,
            "max_grad_norm": cfg.privacy.max_grad_norm if dp else math.nan,
            "clipping": getattr(cfg.privacy, "clipping", "fixed") if dp else "none",
            "lora_r": cfg.lora.r if cfg.lora.enabled else math.nan}
