"""TensorBoard: event files (``torch.utils.tensorboard.SummaryWriter``) in the run's
``tensorboard/`` folder, one scalar per numeric field per row, flushed after every row.

TensorBoard stores a scalar as a float32 (``simple_value``), so it shows each value
rounded to float32; the JSONL logs keep the float64.

Resume: the event files themselves are the ledger. ``open`` reads them back (TensorBoard's
own loader, which applies earlier purges) and compares them with the points the JSONL logs
kept. When they differ first at step ``s`` (normally the first step after the checkpoint:
the crashed attempt logged steps the resumed run recomputes), the new writer starts with
``purge_step=s`` and the kept points from ``s`` on are logged again: TensorBoard drops every
older point at a step >= ``s`` (the Python loader on the writer's restart event, the data
server when a tag's step goes back), so each step shows once, with the resumed run's value.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import Field

from dpalign.config import Section
from dpalign.track.base import RunInfo, Scalars, Sink, first_difference

DIR = "tensorboard"
"""The event files' folder in the run directory (``log.tensorboard.dir`` unset)."""


class TensorBoardConfig(Section):
    dir: Path | None = Field(
        None, description="folder of the run's event files (one folder per run: a resumed "
                          "run's restart purges later steps in it); None = OUT/tensorboard; "
                          "in a study, each run gets DIR/<run name>")


def logdir(settings: TensorBoardConfig, out: Path) -> Path:
    """Where a run's event files go."""
    return settings.dir if settings.dir is not None else out / DIR


def read_scalars(folder: Path) -> dict[str, dict[int, list[float]]]:
    """``{tag: {step: [values]}}`` of the scalars in ``folder``'s event files, as TensorBoard
    loads them (all points kept, purges applied)."""
    if not any(folder.glob("*tfevents*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    held: dict[str, dict[int, list[float]]] = {}
    for tag in acc.Tags()[SCALARS]:
        steps: dict[int, list[float]] = defaultdict(list)
        for event in acc.Scalars(tag):
            steps[event.step].append(event.value)
        held[tag] = dict(steps)
    return held


def float32(value: float) -> float:
    import numpy as np

    return float(np.float32(value))


class TensorBoardSink(Sink):
    extra_module = "tensorboard"
    extra_package = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, settings: TensorBoardConfig, run: RunInfo) -> TensorBoardSink:
        from torch.utils.tensorboard import SummaryWriter

        folder = logdir(settings, run.out)
        purge = first_difference(read_scalars(folder), run.logged, float32)
        sink = cls(SummaryWriter(str(folder), purge_step=purge))
        if purge is not None:
            for step, values in run.logged:
                if step >= purge:
                    sink.log(step, values)
        return sink

    def log(self, step: int, values: Scalars) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()
