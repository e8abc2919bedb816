"""The registry of sinks: ``log.to`` names are its keys. Importing it imports no tracking
package (each sink imports its own when it opens)."""

from __future__ import annotations

from dpalign.track.base import Sink
from dpalign.track.mlflow_sink import MLflowSink
from dpalign.track.tensorboard_sink import TensorBoardSink

SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "mlflow": MLflowSink}
"""Sink name -> class; a sink's settings are the ``log`` section of the same name."""
