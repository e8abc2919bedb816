"""Convert one source file into a dpalign preference JSONL file, all or nothing.

Every row is read, converted and checked (fields, images, the ``PreferenceRecord`` schema,
unique ids) before anything is written. Any problem raises one ``DataValidationError`` that
lists them all, each naming the file, the row and the field, and leaves no output behind.
Rows that are well formed but give no pair (VLFeedback ties, ``chosen == rejected``,
multi-turn conversations) are skipped and counted by reason in the summary.

An existing output file is never replaced unless asked (``force=True``). Image paths in the
output are relative to its folder (``OUT_images/<hash>.png``, ``../coco/1.jpg``), so the
output folder can be moved together with the images it points at.
"""

from __future__ import annotations

import difflib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dpalign.data.convert.base import Converter, Draft, RowError, RowSkip
from dpalign.data.convert.images import ImageStore, images_dir_for
from dpalign.data.convert.reader import SourceRow, issue_for, iter_rows
from dpalign.data.convert.registry import FORMATS
from dpalign.data.errors import DataIssue, DataValidationError
from dpalign.data.records import write_preference_jsonl
from dpalign.data.schema import PreferenceRecord, describe_validation_error

SKIP_IDENTICAL = "chosen and rejected are identical"


class OutputExistsError(ValueError):
    """The output file exists and replacing it was not asked for; nothing was written."""

    def __init__(self, out: Path) -> None:
        self.out = out
        super().__init__(f"{out} already exists; use --force to overwrite it")


@dataclass(frozen=True)
class ConversionSummary:
    """What a conversion read and wrote."""

    source: Path
    out: Path
    format: str
    n_rows: int  # rows read from the source
    n_records: int  # pairs written
    n_embedded_images: int  # distinct embedded images written beside the output
    images_dir: Path | None  # where they went (None when the source had none)
    skipped: dict[str, int]  # reason -> rows skipped for it

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view (paths as strings)."""
        return {"source": str(self.source), "out": str(self.out), "format": self.format,
                "rows": self.n_rows, "records": self.n_records,
                "embedded_images": self.n_embedded_images,
                "images_dir": None if self.images_dir is None else str(self.images_dir),
                "skipped": self.skipped}


def get_converter(name: str) -> Converter:
    """The converter registered as ``name``; ``ValueError`` naming the known ones if none."""
    if name in FORMATS:
        return FORMATS[name]
    close = difflib.get_close_matches(name, FORMATS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown format '{name}'{hint}; choose one of {', '.join(FORMATS)}")


def convert_file(
    source: str | Path,
    fmt: str,
    out: str | Path,
    *,
    images: str | Path | None = None,
    force: bool = False,
) -> ConversionSummary:
    """Convert ``source`` (layout ``fmt``, a key of ``FORMATS``) into the JSONL file ``out``.

    ``images`` is the folder that relative image paths in the source are relative to
    (default: the source file's folder). Embedded images are written to
    ``<out stem>_images/`` beside ``out``. Image paths are written relative to ``out``'s
    folder. An existing ``out`` raises ``OutputExistsError`` unless ``force``. Raises
    ``ValueError`` for an unknown format or an unusable ``out``, and ``DataValidationError``
    listing every problem in the source; all three are ``ValueError``s, and in every case
    nothing is written.
    """
    converter = get_converter(fmt)
    source, out = Path(source), Path(out)
    if out.exists() and source.exists() and os.path.samefile(source, out):
        raise ValueError(f"the output {out} is the input file; choose another --out")
    if out.is_dir():
        raise ValueError(f"the output {out} is a folder; give a file path for --out")
    if out.exists() and not force:
        raise OutputExistsError(out)
    if images is not None and not Path(images).is_dir():
        raise ValueError(f"image folder {images} not found")
    store = ImageStore(images_dir_for(out),
                       Path(images) if images is not None else source.parent)
    issues: list[DataIssue] = []
    try:
        records, n_rows, skipped = _convert_rows(converter, iter_rows(source, issues),
                                                 store, issues)
        if not issues and n_rows == 0:
            issues.append(DataIssue(source, 0, "file is empty: no rows"))
        elif not issues and not records:
            reasons = "; ".join(f"{reason}: {n}" for reason, n in skipped.items())
            issues.append(DataIssue(source, 0, f"no pairs to write: all {n_rows} rows were "
                                               f"skipped ({reasons})"))
        if issues:
            raise DataValidationError(issues)
        store.commit()
        write_preference_jsonl(out, records, relative_outside=True)
    finally:
        store.discard()
    return ConversionSummary(
        source=source, out=out, format=converter.name, n_rows=n_rows, n_records=len(records),
        n_embedded_images=store.n_embedded,
        images_dir=store.final if store.n_embedded else None, skipped=skipped)


def _convert_rows(
    converter: Converter, rows: Iterable[SourceRow], store: ImageStore, issues: list[DataIssue]
) -> tuple[list[PreferenceRecord], int, dict[str, int]]:
    """(records, rows read, skip counts); problems are appended to ``issues``."""
    records: list[PreferenceRecord] = []
    skipped: Counter[str] = Counter()
    first_row_of_id: dict[str, str] = {}
    n_rows = 0
    for row in rows:
        n_rows += 1
        try:
            drafts = converter.convert(row.data, row.default_id)
        except RowSkip as skip:
            skipped[str(skip)] += 1
            continue
        except RowError as error:
            issues.append(issue_for(row, str(error)))
            continue
        for draft in drafts:
            if draft.chosen.strip() == draft.rejected.strip():
                skipped[SKIP_IDENTICAL] += 1
                continue
            if draft.id in first_row_of_id:
                message = f"duplicate id '{draft.id}' (first at {first_row_of_id[draft.id]})"
                issues.append(issue_for(row, message))
                continue
            first_row_of_id[draft.id] = row.where()
            record = _record(draft, converter.name, row, store, issues)
            if record is not None:
                records.append(record)
    return records, n_rows, dict(sorted(skipped.items()))


def _record(
    draft: Draft, fmt: str, row: SourceRow, store: ImageStore, issues: list[DataIssue]
) -> PreferenceRecord | None:
    """The validated record for ``draft`` (images resolved), or None with ``issues`` added."""
    try:
        images = [store.resolve(ref) for ref in draft.images]
    except RowError as error:
        issues.append(issue_for(row, str(error)))
        return None
    try:
        return PreferenceRecord.model_validate({
            "id": draft.id, "images": images, "prompt": draft.prompt, "chosen": draft.chosen,
            "rejected": draft.rejected, "metadata": {"source_format": fmt, **draft.metadata},
        })
    except ValidationError as error:
        issues.extend(issue_for(row, message) for message in describe_validation_error(error))
        return None
