"""Errors for bad data files: every problem names the file, the 1-based line and what is wrong.

Readers collect all problems in a file before raising, so a user fixes a file in one pass
instead of one error per run. Listings are capped at ``MAX_LISTED_ISSUES`` lines followed by
``... and N more problems``; the error object keeps every issue.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_LISTED_ISSUES = 50


@dataclass(frozen=True)
class DataIssue:
    """One problem in a data file; ``line`` is 1-based, 0 means the whole file.

    ``field`` is the record field the problem is about (``"prompt"``, ``"images[1]"``,
    ``"metadata.user_id"``), when there is one.
    """

    path: Path
    line: int
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line > 0 else f"{self.path}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view: file, line (None for the whole file), field (when set), message."""
        view: dict[str, Any] = {"file": str(self.path), "line": self.line or None}
        if self.field is not None:
            view["field"] = self.field
        view["message"] = self.message
        return view


def format_issues(
    issues: Sequence[DataIssue], *, limit: int = MAX_LISTED_ISSUES, indent: str = ""
) -> list[str]:
    """One ``file:line: message`` text line per issue, at most ``limit`` of them, then
    ``... and N more problems`` when some were left out."""
    lines = [f"{indent}{issue}" for issue in issues[:limit]]
    hidden = len(issues) - len(lines)
    if hidden:
        lines.append(f"{indent}... and {hidden} more problem{'s' if hidden != 1 else ''}")
    return lines


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
        listed = format_issues(self.issues, indent="  ")
        return f"{len(self.issues)} problems found:\n" + "\n".join(listed)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view: ``{"count": N, "errors": [issue.as_dict(), ...]}`` (all issues)."""
        return {"count": len(self.issues), "errors": [issue.as_dict() for issue in self.issues]}
