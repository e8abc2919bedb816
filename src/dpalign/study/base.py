"""The base model's figures, evaluated once per study with the runs' own evaluation
settings (``base.json``): the reference every run is compared with. Held-out reward
accuracy needs no evaluation: the base model is every run's reference, so its implicit
reward is 0 on every pair (a tie), i.e. accuracy 0 under the strict rule, chance (0.5)
under a coin flip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpalign.io import atomic_write_json
from dpalign.train.config import TrainConfig


def evaluate_base(config: TrainConfig, path: Path, weights_sha256: str | None
                  ) -> dict[str, Any] | None:
    """POPE/CHAIR figures of ``config.model`` (keys as in a run's eval row) written to
    ``path``; reused when ``path`` holds the figures of the same weights (``weights_sha256``,
    ``study.provenance.weights_hash``) and settings. None when the runs have no world to
    evaluate on."""
    if config.world is None or config.eval.world is False:
        return None
    key = {"weights_sha256": weights_sha256,
           "eval": config.eval.model_dump(mode="json", exclude={"every"}),
           "world": str(config.world)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
    from dpalign.models.load import load_model
    from dpalign.train.loop import world_figures

    loaded = load_model(config.model)
    figures = world_figures(loaded.model, loaded.processor, config)
    result = {"key": key, "model": str(config.model), **figures}
    atomic_write_json(path, result)
    return result


def read_base(path: Path) -> dict[str, float] | None:
    """The numeric figures of a ``base.json`` (None when there is none)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return {k: float(v) for k, v in saved.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
