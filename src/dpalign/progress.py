"""Progress bars for anything long (rich). Set DPALIGN_NO_PROGRESS=1 to silence them."""

from __future__ import annotations

import os
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
