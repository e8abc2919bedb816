"""Atomic file writes (a reader never sees a half-written file), the JSONL reader for
files dpalign writes itself, and the reader of append-only logs that recovers a torn last
line.

Every writer goes through a temporary file in the same directory followed by
``os.replace``, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file dpalign wrote itself (trusted layout, blank lines skipped); user
    data goes through ``dpalign.data.records``, which reports bad lines."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class TornLineWarning(UserWarning):
    """The last line of an append-only JSONL log was cut short (a kill or a full disk during
    ``append_jsonl``) and was dropped."""


class CorruptLogError(ValueError):
    """A line of an append-only JSONL log that is not its last cannot be read: damage a torn
    append cannot explain. The message names the file and the 1-based line."""


def _log_row(raw: bytes) -> dict[str, Any] | str:
    """One log line as a JSON object, or why it is not one."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"not UTF-8 ({exc.reason})"
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc})"
    return row if isinstance(row, dict) else f"not a JSON object (a {type(row).__name__})"


def read_log_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an append-only JSONL log written by ``append_jsonl`` (blank lines skipped).

    A last line that cannot be read is the torn tail of an interrupted append: it is dropped
    with a ``TornLineWarning``. Any earlier unreadable line raises ``CorruptLogError`` naming
    the file and the line.
    """
    lines = [(no, raw) for no, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1)
             if raw.strip()]
    rows: list[dict[str, Any]] = []
    for k, (no, raw) in enumerate(lines):
        row = _log_row(raw)
        if isinstance(row, dict):
            rows.append(row)
        elif k == len(lines) - 1:
            warnings.warn(f"{path}:{no}: dropped a torn last line ({row}; an append was cut "
                          "short)", TornLineWarning, stacklevel=2)
        else:
            raise CorruptLogError(f"{path}:{no}: {row}; only a torn last line can be "
                                  "recovered, so the file is damaged")
    return rows


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line atomically."""
    text = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    return atomic_write_text(path, text)


def append_jsonl(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it to disk (for per-step logs)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside ``path``; on success it replaces ``path``, on error it
    is removed, so ``path`` never holds a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
