"""dpalign's public Python API: everything ``import dpalign`` offers, in one place.

    import dpalign
    result = dpalign.train({"model": "runs/demo/base", "data": {"train": dataset, "k": 64},
                            "train": {"steps": 100, "batch_size": 8},
                            "privacy": {"enabled": True, "target_epsilon": 8}},
                           out="runs/dp-dpo")
    dpalign.load_run(result.out).metrics          # the step log as a pandas DataFrame

- configs: ``TrainConfig`` (with its sections ``PrivacyConfig``, ``LossConfig``,
  ``LoraConfig``) and ``StudyConfig``; ``train_config`` / ``study_config`` read them from a
  dict, a YAML file or a packaged preset, with dotted overrides;
- runs: ``train`` (one run; a ``datasets.Dataset`` may stand wherever a JSONL path does),
  ``run_study`` (a grid), ``load_run`` / ``load_study`` (their results as pandas frames),
  ``report`` (the HTML report of either);
- your own loop: ``make_private`` (the DP step: per-pair gradients, clipping, noise,
  ledger), ``load_model`` (a VLM or a causal LM folder with its processor),
  ``prepare_trainable`` (LoRA), ``read_records`` / ``PreferenceRecord``;
- privacy accounting: ``epsilon`` (of a ledger or (sigma, q, steps)), ``calibrate_sigma``,
  ``Ledger``;
- losses: ``LOSSES``, the registry of loss names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpalign.config import apply_overrides, load_yaml_config
from dpalign.data.hf import materialize_config_data, read_records
from dpalign.data.schema import PreferenceRecord
from dpalign.losses import LOSSES
from dpalign.losses.config import LossConfig
from dpalign.models.load import load_model
from dpalign.models.lora import LoraConfig, prepare_trainable
from dpalign.privacy.accounting import Ledger, calibrate_sigma, epsilon
from dpalign.privacy.config import PrivacyConfig
from dpalign.report import write_report
from dpalign.report.load import RunInput, StudyInput
from dpalign.report.load import load_run as _load_run
from dpalign.report.load import load_study as _load_results
from dpalign.study import StudyConfig, StudyResult, preset_path, run_study
from dpalign.study import load_study as _load_study_config
from dpalign.train.config import TrainConfig
from dpalign.train.loop import TrainResult
from dpalign.train.loop import train as _train
from dpalign.train.private import PrivateStep, make_private

ConfigLike = TrainConfig | Mapping[str, Any] | str | Path


def train_config(config: ConfigLike, overrides: Sequence[str] = (), *,
                 data_dir: str | Path | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from a config, a dict of its sections or a YAML file,
    with dotted ``overrides`` (``"privacy.target_epsilon=4"``). ``datasets.Dataset``
    objects in ``data.train`` / ``data.heldout`` / ``eval.validation`` of a dict are written
    as dpalign JSONL into ``data_dir/data/`` (``data_dir``: the run directory; required
    then) and the config points at them."""
    if isinstance(config, TrainConfig):
        return apply_overrides(config, overrides)
    if isinstance(config, (str, Path)):
        return load_yaml_config(TrainConfig, config, overrides)
    raw = dict(config)
    if data_dir is not None:
        raw = materialize_config_data(raw, Path(data_dir))
    return apply_overrides(TrainConfig.model_validate(raw), overrides)


def train(config: ConfigLike, out: str | Path, *, overrides: Sequence[str] = (),
          resume: bool = False) -> TrainResult:
    """Run one alignment run into ``out`` (see ``dpalign train``); ``config`` as
    ``train_config`` takes it. Datasets given in the config are written to ``out/data/``
    first, so the run directory's resolved config names files and the run can resume."""
    cfg = train_config(config, overrides, data_dir=out)
    return _train(cfg, out, resume=resume)


def study_config(source: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """A study's settings from a packaged preset name (``quickstart``, ``full``, ...) or a
    study YAML file, with dotted overrides (``"model=runs/demo/base"``)."""
    path = Path(source)
    return _load_study_config(path if path.suffix in {".yaml", ".yml"} or path.is_file()
                              else preset_path(str(source)), list(overrides))


def load_run(path: str | Path) -> RunInput:
    """A run directory's results: ``.metrics`` (the step log, a DataFrame), ``.evals``,
    ``.privacy``, ``.result``, ``.config_text``."""
    return _load_run(Path(path))


def load_study(path: str | Path) -> StudyInput:
    """A study directory's results: ``.runs`` (one row per run) and ``.points`` (one row
    per setting, seeds aggregated) as DataFrames, ``.logs`` (each run's step log)."""
    return _load_results(Path(path))


def report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a study or run directory; returns the HTML file."""
    return write_report(path, out=out).html


__all__ = [
    "LOSSES",
    "Ledger",
    "LoraConfig",
    "LossConfig",
    "PreferenceRecord",
    "PrivacyConfig",
    "PrivateStep",
    "RunInput",
    "StudyConfig",
    "StudyInput",
    "StudyResult",
    "TrainConfig",
    "TrainResult",
    "calibrate_sigma",
    "epsilon",
    "load_model",
    "load_run",
    "load_study",
    "make_private",
    "prepare_trainable",
    "read_records",
    "report",
    "run_study",
    "study_config",
    "train",
    "train_config",
]
