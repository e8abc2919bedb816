"""Errors for bad data files: every problem names the file, the 1-based line and what is wrong.

Readers collect all problems in a file before raising, so a user fixes a file in one pass
instead of one error per run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAX_LISTED_ISSUES = 20


@dataclass(frozen=True)
class DataIssue:
    """One problem in a data file; ``line`` is 1-based, 0 means the whole file."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line > 0 else f"{self.path}"
        return f"{where}: {self.message}"


class DataValidationError(ValueError):
    """All problems found in one data file, raised together.

    ``str(error)`` lists at most ``MAX_LISTED_ISSUES`` of them; ``error.issues`` has them all.
    """

    def __init__(self, issues: Iterable[DataIssue]) -> None:
        self.issues: list[DataIssue] = list(issues)
        if not self.issues:
            raise ValueError("DataValidationError needs at least one issue")
        # args holds the issues, so the error pickles (worker pools) and rebuilds itself.
        super().__init__(self.issues)

    def __str__(self) -> str:
        if len(self.issues) == 1:
            return str(self.issues[0])
        shown = [f"  {issue}" for issue in self.issues[:MAX_LISTED_ISSUES]]
        hidden = len(self.issues) - len(shown)
        if hidden:
            shown.append(f"  ... and {hidden} more")
        return f"{len(self.issues)} problems found:\n" + "\n".join(shown)
