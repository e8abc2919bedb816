"""Progress bars for anything long (rich). Set DPALIGN_NO_PROGRESS=1 to silence them.

These are the only bars the command line shows: ``quiet_other_bars`` turns off the tqdm
bars of transformers, huggingface_hub and datasets ("Loading weights", "Map", ...).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def enabled() -> bool:
    """Whether progress bars are shown (off when DPALIGN_NO_PROGRESS is set)."""
    return not os.environ.get("DPALIGN_NO_PROGRESS")


OTHER_BARS_OFF = {"HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, transformers
                  "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets
                  "TQDM_DISABLE": "1"}  # any other tqdm bar (tqdm reads TQDM_* defaults)
"""The environment that turns the other libraries' tqdm bars off (read when they are
imported; child processes, e.g. a study's workers, inherit it)."""


def quiet_other_bars() -> None:
    """Turn off the tqdm progress bars of transformers, huggingface_hub and datasets, so that
    only dpalign's rich bars remain: by environment for modules not imported yet (nothing is
    imported here), by their switches for those already imported."""
    os.environ.update(OTHER_BARS_OFF)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def make_progress() -> Progress:
    """A rich Progress with a bar, n/total, elapsed and remaining time, and a free text field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled(),
        transient=False,
    )


def progress(items: Iterable[T], *, description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar."""
    with make_progress() as bar:
        task = bar.add_task(description, total=total, info="")
        for item in items:
            yield item
            bar.advance(task)
