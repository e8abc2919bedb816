"""Read, validate and write preference JSONL files (schema in ``dpalign.data.schema``).

The reader checks the whole file in one pass and raises one ``DataValidationError`` listing
every problem with its file and 1-based line: schema errors of every line, duplicate ids and
missing or unreadable images, including the ids and images of lines that break the schema.
Records come back with image paths made absolute; the writer stores them relative to the
output file's folder when they lie under it (or always, with ``relative_outside``), so a data
folder (file + images) can be moved as a whole.
"""

from __future__ import annotations

import codecs
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image
from pydantic import ValidationError

from dpalign.data.errors import DataIssue, DataValidationError
from dpalign.data.schema import (
    PairMetadata,
    PreferenceRecord,
    json_type_name,
    validation_problems,
)
from dpalign.io import atomic_write_jsonl


@dataclass(frozen=True)
class ValidationSummary:
    """What a valid preference file holds."""

    path: Path
    n_records: int
    n_images: int  # distinct image files
    n_users: int  # distinct non-null metadata.user_id
    error_kinds: dict[str, int]  # metadata.error_kind -> count of records


class Parsed(Protocol):
    """What a line parser returns: an item with an ``id`` and its ``images`` as written."""

    @property
    def id(self) -> str: ...

    @property
    def images(self) -> tuple[str, ...]: ...


P = TypeVar("P", bound=Parsed)


def read_checked_jsonl(path: str | Path, parse: Callable[[dict[str, Any], int], P], *,
                       check_images: bool = True) -> list[tuple[P, tuple[str, ...]]]:
    """Each line's item, ``parse(object, line number)`` (which raises ``ValidationError``
    when the line breaks its schema), with its image paths made absolute.

    Blank lines are skipped. Every problem (bad JSON, schema errors, duplicate ids, missing
    or unreadable images when ``check_images``) is collected in one pass, then all are
    raised together, in line order, as one ``DataValidationError``. A line that breaks the
    schema still has its id checked for duplicates and its image paths checked, so fixing
    the reported problems does not uncover new ones.
    """
    path = Path(path)
    if not path.is_file():
        problem = "not a regular file" if path.exists() else "file not found"
        raise DataValidationError([DataIssue(path, 0, problem)])
    issues: list[DataIssue] = []
    items: list[tuple[P, tuple[str, ...]]] = []
    first_line_of_id: dict[str, int] = {}
    image_problems: dict[str, str | None] = {}  # absolute path -> problem; checked once
    base = path.parent.absolute()
    n_lines = 0
    for line_no, text in _non_blank_lines(path, issues):
        n_lines += 1
        obj = _json_object(text, path, line_no, issues)
        if obj is None:
            continue
        try:
            item: P | None = parse(obj, line_no)
        except ValidationError as error:
            item = None
            issues.extend(DataIssue(path, line_no, message, field)
                          for field, message in validation_problems(error))
        item_id = item.id if item is not None else _raw_id(obj)
        duplicate = item_id is not None and item_id in first_line_of_id
        if item_id is not None and duplicate:
            message = f"duplicate id '{item_id}' (first on line {first_line_of_id[item_id]})"
            issues.append(DataIssue(path, line_no, message, "id"))
        elif item_id is not None:
            first_line_of_id[item_id] = line_no
        if check_images:
            for field, image in _raw_images(obj):
                problem = _cached_image_problem(_absolute(image, base), image_problems)
                if problem is not None:
                    issues.append(DataIssue(path, line_no, f"image '{image}' {problem}", field))
        if item is not None and not duplicate:
            items.append((item, tuple(_absolute(image, base) for image in item.images)))
    if n_lines == 0 and not issues:
        issues.append(DataIssue(path, 0, "file is empty: no records"))
    if issues:
        raise DataValidationError(sorted(issues, key=lambda issue: issue.line))
    return items


def read_preference_jsonl(path: str | Path, *, check_images: bool = True) -> list[PreferenceRecord]:
    """Read and validate a preference JSONL file (``read_checked_jsonl``); image paths come
    back absolute."""
    return [record.model_copy(update={"images": images}) for record, images in
            read_checked_jsonl(path, lambda obj, _: PreferenceRecord.model_validate(obj),
                               check_images=check_images)]


def validate_preference_file(path: str | Path, *, check_images: bool = True) -> ValidationSummary:
    """Check a preference file and summarize it; raises ``DataValidationError`` on problems."""
    return summarize_records(path, read_preference_jsonl(path, check_images=check_images))


def summarize_records(path: str | Path, records: list[PreferenceRecord]) -> ValidationSummary:
    """The ``ValidationSummary`` of valid ``records`` read from ``path``."""
    kinds = Counter(r.metadata.error_kind for r in records if r.metadata.error_kind is not None)
    return ValidationSummary(
        path=Path(path),
        n_records=len(records),
        n_images=len({image for record in records for image in record.images}),
        n_users=len({r.user_id for r in records if r.user_id is not None}),
        error_kinds=dict(sorted(kinds.items())),
    )


def write_preference_jsonl(
    path: str | Path,
    records: Iterable[PreferenceRecord],
    *,
    relative_to: Path | None = None,
    relative_outside: bool = False,
) -> Path:
    """Write records atomically, one JSON object per line; returns the path written.

    ``relative_to`` is the folder that *relative* image paths in ``records`` are relative
    to; when None they are taken as already relative to the output file's folder and
    written unchanged. Absolute paths under the output folder are written relative to it;
    others stay absolute, unless ``relative_outside``: then they too are written relative
    to the output folder (``../images/a.png``), so the file keeps working when the folder
    that holds it and its images is moved as a whole. Reading the file back gives equal
    records.
    """
    path = Path(path)
    folder = Path(os.path.normpath(path.parent.absolute()))
    rows = []
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"duplicate id '{record.id}': ids must be unique in a file")
        seen.add(record.id)
        images = [_portable(image, folder, relative_to, relative_outside)
                  for image in record.images]
        rows.append(_to_row(record, images))
    return atomic_write_jsonl(path, rows)


def _non_blank_lines(path: Path, issues: list[DataIssue]) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line; undecodable lines become issues."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            issues.append(DataIssue(path, line_no, f"line is not valid UTF-8: {error.reason}"))
            continue
        if text.strip():
            yield line_no, text


def _json_object(
    text: str, path: Path, line_no: int, issues: list[DataIssue]
) -> dict[str, Any] | None:
    """Decode one line into a JSON object, or add its problem to ``issues`` and return None."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        issues.append(DataIssue(path, line_no, f"malformed JSON: {error}"))
        return None
    if not isinstance(obj, dict):
        message = f"line is not a JSON object (got {json_type_name(obj)})"
        issues.append(DataIssue(path, line_no, message))
        return None
    return obj


def _raw_id(obj: dict[str, Any]) -> str | None:
    """The id of a line that breaks the schema, when its ``id`` alone would be valid."""
    value = obj.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _raw_images(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, path) of each usable image path string of a line, valid record or not."""
    if isinstance(obj.get("image"), str) and obj["image"].strip():
        return [("image", obj["image"])]
    images = obj.get("images")
    if not isinstance(images, list):
        return []
    return [(f"images[{i}]", image) for i, image in enumerate(images)
            if isinstance(image, str) and image.strip()]


def _absolute(image: str, base: Path) -> str:
    """An image path made absolute against ``base`` and normalized (no symlink resolving)."""
    return os.path.normpath(base / Path(image).expanduser())


def _cached_image_problem(absolute: str, cache: dict[str, str | None]) -> str | None:
    """``_image_problem(absolute)``, opening each file once per read (``cache``)."""
    if absolute not in cache:
        cache[absolute] = _image_problem(absolute)
    return cache[absolute]


def _image_problem(absolute: str) -> str | None:
    """Why the image at ``absolute`` cannot be used, or None when it opens and verifies."""
    if not os.path.exists(absolute):
        return f"not found (looked at {absolute})"
    try:
        with Image.open(absolute) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for corrupt files; all mean unreadable
        return f"cannot be read: {error}"
    return None


def _portable(
    image: str, folder: Path, relative_to: Path | None, relative_outside: bool
) -> str:
    """The path to store for ``image`` in a file that lives in ``folder``."""
    if relative_to is None and not Path(image).expanduser().is_absolute():
        return image
    absolute = Path(_absolute(image, (relative_to or folder).absolute()))
    if absolute.is_relative_to(folder):
        return absolute.relative_to(folder).as_posix()
    if relative_outside:
        return Path(os.path.relpath(absolute, folder)).as_posix()
    return str(absolute)


def _to_row(record: PreferenceRecord, images: list[str]) -> dict[str, Any]:
    """The JSON object for one record; unset (None) known metadata fields are left out."""
    metadata = {
        key: value
        for key, value in record.metadata.model_dump(mode="json").items()
        if value is not None or key not in PairMetadata.model_fields
    }
    row: dict[str, Any] = {
        "id": record.id,
        **({"images": images} if images else {}),
        "prompt": record.prompt,
        "chosen": record.chosen,
        "rejected": record.rejected,
    }
    if metadata:
        row["metadata"] = metadata
    return row
