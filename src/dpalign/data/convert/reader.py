"""Rows of a source file (JSONL, JSON array or Parquet), each with where it came from.

JSONL rows are numbered by their 1-based line; JSON-array and Parquet rows by their 0-based
index (what ``json.load(f)[i]`` and ``datasets``/pandas show). Problems become ``DataIssue``s
that name the file and the row: ``data.jsonl:3: ...`` or ``data.parquet: index 2: ...``.

A ``.json`` file whose text does not start with ``[`` is read as JSON Lines: that is what
``datasets.Dataset.to_json`` writes by default.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dpalign.data.errors import DataIssue, DataValidationError
from dpalign.data.schema import json_type_name

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 256  # rows decoded at a time; bounds memory for image-heavy shards


@dataclass(frozen=True)
class SourceRow:
    """One row of a source file; ``number`` is a 1-based line or a 0-based index."""

    path: Path
    number: int
    kind: Literal["line", "index"]
    data: Mapping[str, Any]

    @property
    def default_id(self) -> str:
        """The id a row without its own id gets: its line number or index, as a string."""
        return str(self.number)

    def where(self) -> str:
        """``line 3`` or ``index 2``."""
        return f"{self.kind} {self.number}"


def row_issue(path: Path, kind: Literal["line", "index"], number: int, message: str) -> DataIssue:
    """A ``DataIssue`` for one row: lines use the issue's line field, indexes the message."""
    if kind == "line":
        return DataIssue(path, number, message)
    return DataIssue(path, 0, f"index {number}: {message}")


def issue_for(row: SourceRow, message: str) -> DataIssue:
    """A ``DataIssue`` naming ``row``'s file and position."""
    return row_issue(row.path, row.kind, row.number, message)


def iter_rows(path: Path, issues: list[DataIssue]) -> Iterator[SourceRow]:
    """Yield the rows of ``path``; rows that are not JSON objects are added to ``issues``.

    Raises ``DataValidationError`` at once when the file itself cannot be read (missing,
    unsupported suffix, not Parquet, not a JSON array).
    """
    if not path.is_file():
        problem = "not a regular file" if path.exists() else "file not found"
        raise DataValidationError([DataIssue(path, 0, problem)])
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        yield from _parquet_rows(path)
        return
    if suffix not in JSONL_SUFFIXES + JSON_SUFFIXES:
        known = ", ".join(JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)
        message = f"unsupported file type '{suffix or path.name}' (use {known})"
        raise DataValidationError([DataIssue(path, 0, message)])
    text = _decode(path)
    if suffix in JSON_SUFFIXES and text.lstrip().startswith("["):
        yield from _json_array_rows(path, text, issues)
    else:
        yield from _jsonl_rows(path, text, issues)


def _decode(path: Path) -> str:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataValidationError(
            [DataIssue(path, line, f"not valid UTF-8: {error.reason}")]
        ) from error


def _object_or_issue(
    path: Path, kind: Literal["line", "index"], number: int, obj: Any, issues: list[DataIssue]
) -> SourceRow | None:
    if isinstance(obj, dict):
        return SourceRow(path, number, kind, obj)
    what = "line" if kind == "line" else "row"
    issues.append(row_issue(path, kind, number,
                            f"{what} is not a JSON object (got {json_type_name(obj)})"))
    return None


def _jsonl_rows(path: Path, text: str, issues: list[DataIssue]) -> Iterator[SourceRow]:
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            issues.append(DataIssue(path, line_no, f"malformed JSON: {error}"))
            continue
        row = _object_or_issue(path, "line", line_no, obj, issues)
        if row is not None:
            yield row


def _json_array_rows(path: Path, text: str, issues: list[DataIssue]) -> Iterator[SourceRow]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataValidationError(
            [DataIssue(path, error.lineno, f"malformed JSON: {error}")]
        ) from error
    for index, obj in enumerate(rows):
        row = _object_or_issue(path, "index", index, obj, issues)
        if row is not None:
            yield row


def _parquet_rows(path: Path) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        index = 0
        for batch in batches:
            for obj in batch.to_pylist():
                yield SourceRow(path, index, "index", obj)
                index += 1
    except (pa.ArrowException, OSError) as error:
        raise DataValidationError([DataIssue(path, 0, f"cannot read Parquet: {error}")]) from error
