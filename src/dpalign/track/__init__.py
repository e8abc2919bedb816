"""Experiment tracking: TensorBoard and MLflow mirrors of a run's logs (``log.to``).

``metrics.jsonl`` and ``eval.jsonl`` stay the record; a tracker only mirrors them. Every
numeric field of every metrics row is a scalar at its ``step`` under its own name (``loss``,
``epsilon``: the privacy spent so far, on the steps the accountant ran), every numeric field
of an evaluation row one under ``eval/``. MLflow also gets the flattened resolved config as
params and tags (run directory, method, loss, model; a study's grid values). Only rank 0 of
a distributed run logs. The packages are imported when a sink opens (``pip install
'dpalign[track]'``), never by ``import dpalign``.

Where it goes (``OUT`` the run directory)::

    OUT/tensorboard/      event files        (log.tensorboard.dir)
    OUT/mlflow.db         local MLflow store  (log.mlflow.tracking_uri unset and no
                                               $MLFLOW_TRACKING_URI)
    OUT/mlflow_run.json   the MLflow run of this directory: store, experiment, run id

A study shares one MLflow store and experiment (``STUDY/mlflow.db``, the study's name), one
MLflow run per grid run; TensorBoard files stay in each run's folder.

Resume: each backend is its own ledger. When a run opens, its sinks read back what their
backend holds and compare it with the rows the JSONL logs kept (those up to the checkpoint
resumed from), then make the backend hold exactly those: TensorBoard purges from the first
step that differs (``purge_step``) and logs the kept points from there; MLflow reuses its
run when the store holds only kept points (logging the missing ones) and otherwise, since
MLflow cannot delete metric points, moves to a replacement run holding every kept point
(see :mod:`dpalign.track.tensorboard_sink`, :mod:`dpalign.track.mlflow_sink`). The steps
after the checkpoint are then logged as they are recomputed: one point per step, equal to
the final JSONL logs. A resume of a finished run only brings its trackers up to date.
"""

from dpalign.track.base import RunInfo, Sink, TrackerNotInstalledError, flatten, points, scalars
from dpalign.track.config import LogConfig
from dpalign.track.sinks import SINKS
from dpalign.track.tracker import (
    Tracker,
    TrackingWarning,
    check_installed,
    open_tracker,
    run_info,
    setup_shared,
)

__all__ = ["SINKS", "LogConfig", "RunInfo", "Sink", "Tracker", "TrackerNotInstalledError",
           "TrackingWarning", "check_installed", "flatten", "open_tracker", "points",
           "run_info", "scalars", "setup_shared"]
