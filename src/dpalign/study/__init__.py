"""Studies: a grid of training runs over mechanism, epsilon, shots K, seeds, loss, alignment
method and lr, run in parallel and resumably, summarised into Parquet tables (see
``run.py``)."""

from dpalign.study.config import PRESETS, GridConfig, StudyConfig, load_study, preset_path
from dpalign.study.grid import Point, expand, train_config
from dpalign.study.run import StudyResult, collect, run_study

__all__ = ["PRESETS", "GridConfig", "Point", "StudyConfig", "StudyResult", "collect", "expand",
           "load_study", "preset_path", "run_study", "train_config"]
