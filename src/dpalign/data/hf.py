"""Preference data from Hugging Face ``datasets``: a ``datasets.Dataset``, or a folder that
``Dataset.save_to_disk`` wrote, is accepted wherever a preference JSONL path is.

Row layouts (read row by row, so one dataset may mix the string and conversation forms)::

    dpalign's fields   {"id": "p1", "images": ["img/p1.png"], "prompt": "What is on the table?",
                        "chosen": "A red cup.", "rejected": "A blue cat.",
                        "metadata": {"user_id": "u7"}}
    TRL standard       {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    TRL conversational {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                        "chosen": [{"role": "assistant", "content": "It is blue."}],
                        "rejected": [{"role": "assistant", "content": "It is green."}]}
    implicit prompt    {"chosen": [{"role": "user", "content": "What color is the sky?"},
                                   {"role": "assistant", "content": "It is blue."}],
                        "rejected": [{"role": "user", "content": "What color is the sky?"},
                                     {"role": "assistant", "content": "It is green."}]}
    TRL vision         {"images": [<PIL image>],
                        "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": "Q"}]}],
                        "chosen": [{"role": "assistant", "content": [{"type": "text",
                                                                      "text": "A"}]}],
                        "rejected": [{"role": "assistant", "content": "B"}]}

``id``, ``images`` (or ``image``, one image) and ``metadata`` are optional: a row without an
id gets its 0-based index (``"0"``, ``"1"``, ...: the ids ``dpalign data convert --format trl``
gives a Parquet export of the same dataset), a row without images is a text-only pair. As in
TRL (``trl.data_utils.maybe_extract_prompt``), the prompt is taken from the turns ``chosen``
and ``rejected`` share when there is no ``prompt`` or when ``prompt`` is a string but the
answers are whole conversations. A message's ``content`` is a string or a list of parts
(``{"type": "text", "text": ...}``, ``{"type": "image"}``); text parts are joined with
newlines. A pair is single-turn: one user message, one assistant answer each.

Images may be ``datasets.Image`` values (the stored bytes are written unchanged, named by
their content, under ``images_dir``: equal images are stored once), raw bytes, HF
``{"bytes", "path"}`` dicts, or path strings (relative to ``image_root``, by default the
working directory, as ``datasets`` resolves them). Records carry absolute image paths.

Validation is the JSONL reader's: the ``PreferenceRecord`` schema with the same messages,
unique ids, readable images, and columns other than the ones above are refused (like unknown
JSONL keys). Every problem is collected, each naming the dataset (``name``; a saved dataset's
folder) and the 0-based row index as Parquet rows are named (``dataset: index 3: missing
field 'chosen'``), and raised together as one ``DataValidationError``; nothing is written
then. Unlike ``dpalign data convert``, rows are never skipped: ``chosen == rejected`` and
multi-turn conversations are errors, since training data should not lose rows silently.

A run's resolved configuration names files, not objects: ``materialize`` writes a dataset as
a dpalign JSONL file (images in ``<stem>_images/`` beside it), and
``materialize_config_data`` does it for the datasets in a raw configuration.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from pydantic import ValidationError

from dpalign.data.convert.base import ImageRef, RowError, nested, pick, sub_row
from dpalign.data.convert.images import ImageStore, images_dir_for
from dpalign.data.convert.trl_vision import content_text
from dpalign.data.errors import DataIssue, DataValidationError
from dpalign.data.records import (
    ValidationSummary,
    read_preference_jsonl,
    summarize_records,
    validate_preference_file,
    write_preference_jsonl,
)
from dpalign.data.schema import PreferenceRecord, json_type_name, validation_problems

if TYPE_CHECKING:
    from datasets import Dataset

COLUMNS = ("id", "images", "image", "prompt", "chosen", "rejected", "metadata")
ROW_BATCH = 256  # rows decoded at a time; bounds memory for image-heavy datasets
# The dataset-valued keys of a raw training configuration, and the file each becomes.
CONFIG_DATA_KEYS = (("data", "train"), ("data", "heldout"), ("eval", "validation"))


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk``."""
    path = Path(path)
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def records_from_dataset(
    ds: Dataset,
    *,
    images_dir: str | os.PathLike[str],
    name: str = "dataset",
    image_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> list[PreferenceRecord]:
    """The validated records of ``ds`` (any layout in the module doc), in row order.

    Embedded images are written to ``images_dir`` (only when every row is valid; files are
    added, never replaced). Path images are relative to ``image_root`` (default: the working
    directory) and, unless ``check_images`` is False, must open as images. Raises
    ``DataValidationError`` listing every problem, each naming ``name`` and the row index;
    ``TypeError`` when ``ds`` is not a ``datasets.Dataset``.
    """
    root = Path.cwd() if image_root is None else Path(image_root)
    store = ImageStore(Path(images_dir), root, check_files=check_images)
    try:
        records = _read_dataset(ds, Path(name), store)
        store.commit()
    finally:
        store.discard()
    return records


def materialize(
    ds: Dataset,
    out: str | os.PathLike[str],
    *,
    name: str = "dataset",
    image_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``ds``'s records as the dpalign JSONL file ``out`` (atomically; returns it).

    Embedded images go to ``<out stem>_images/`` beside ``out`` and are written relative to
    it; path images stay absolute. Materializing the same dataset again writes the same
    bytes. On any problem (``DataValidationError``) nothing is written.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the path of the JSONL file to write")
    records = records_from_dataset(ds, images_dir=images_dir_for(out), name=name,
                                   image_root=image_root)
    return write_preference_jsonl(out, records)


def load_saved_dataset(path: str | os.PathLike[str]) -> Dataset:
    """The ``datasets.Dataset`` saved in folder ``path``; ``DataValidationError`` naming the
    folder when it holds none (or a ``DatasetDict``: then it names the split folders)."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        splits = _splits(path)
        example = f", e.g. {path / splits[0]}" if splits else ""
        raise DataValidationError([DataIssue(
            path, 0, f"a saved DatasetDict (splits: {', '.join(splits) or 'none'}): give one "
                     f"split's folder{example}")])
    if not is_saved_dataset(path):
        raise DataValidationError([DataIssue(
            path, 0, "a folder, but not a saved dataset (no state.json and dataset_info.json, "
                     "as Dataset.save_to_disk writes): give a preference JSONL file or such "
                     "a folder")])
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets/pyarrow raise many types; all mean unreadable
        raise DataValidationError([DataIssue(path, 0, f"cannot load the saved dataset: "
                                                      f"{error}")]) from error
    return loaded


def read_records(
    source: str | os.PathLike[str] | Dataset,
    *,
    images_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    check_images: bool = True,
) -> list[PreferenceRecord]:
    """The validated records of any preference source: a JSONL file
    (``read_preference_jsonl``), a folder written by ``Dataset.save_to_disk`` or a
    ``datasets.Dataset`` (``records_from_dataset``).

    A saved dataset's embedded images are written to ``images_dir``, by default
    ``<folder>_images`` beside the folder; a ``Dataset`` object needs ``images_dir``. A
    dataset's errors name ``name``, by default its folder (or ``"dataset"``); a JSONL file's
    name the file.
    """
    if not isinstance(source, str | os.PathLike):
        if images_dir is None:
            raise TypeError("read_records(<Dataset>) needs images_dir=: the folder its "
                            "embedded images are written to")
        return records_from_dataset(source, images_dir=images_dir, name=name or "dataset",
                                    check_images=check_images)
    path = Path(source)
    if path.is_dir():
        return records_from_dataset(
            load_saved_dataset(path), name=name or str(path), check_images=check_images,
            images_dir=images_dir_for(path.absolute()) if images_dir is None else images_dir)
    return read_preference_jsonl(path, check_images=check_images)


def validate_source(
    source: str | os.PathLike[str], *, check_images: bool = True
) -> ValidationSummary:
    """Check a preference JSONL file or a saved dataset folder and summarize it (nothing is
    written); raises ``DataValidationError`` on problems."""
    path = Path(source)
    if not path.is_dir():
        return validate_preference_file(path, check_images=check_images)
    ds = load_saved_dataset(path)
    with tempfile.TemporaryDirectory() as scratch:
        records = records_from_dataset(ds, images_dir=Path(scratch) / "images", name=str(path),
                                       check_images=check_images)
    return summarize_records(path, records)


def materialize_config_data(raw: Mapping[str, Any], out: str | os.PathLike[str]
                            ) -> dict[str, Any]:
    """``raw`` (a training configuration as a dict) with each ``datasets.Dataset`` in
    ``data.train``, ``data.heldout`` and ``eval.validation`` written by ``materialize`` to
    ``<out>/data/<key>.jsonl`` (``train.jsonl``, ``heldout.jsonl``, ``validation.jsonl``)
    and replaced by that file's absolute path; ``raw`` itself is left unchanged.

    Paths and other values are kept as they are (the configuration's own validation judges
    them). Errors name the key: ``data.train: index 3: missing field 'chosen'``.
    """
    config = dict(raw)
    for section, key in CONFIG_DATA_KEYS:
        part = config.get(section)
        if not isinstance(part, Mapping) or not _is_dataset(part.get(key)):
            continue
        path = Path(out).absolute() / "data" / f"{key}.jsonl"
        materialize(part[key], path, name=f"{section}.{key}")
        config[section] = {**part, key: str(path)}
    return config


def _is_dataset(value: object) -> bool:
    """Whether ``value`` is a ``datasets`` object (imported only for a non-path value)."""
    if value is None or isinstance(value, str | os.PathLike | int | float | bool):
        return False
    import datasets

    return isinstance(value, datasets.Dataset | datasets.DatasetDict)


def _splits(path: Path) -> list[str]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(split) for split in splits]


def _read_dataset(ds: Dataset, where: Path, store: ImageStore) -> list[PreferenceRecord]:
    """Every row's record; all problems raised together as one ``DataValidationError``."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        example = f", e.g. ds[{splits[0]!r}]" if splits else ""
        raise DataValidationError([DataIssue(
            where, 0, f"a DatasetDict (splits: {', '.join(splits) or 'none'}): give one "
                      f"split{example}")])
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(ds).__name__}")
    issues: list[DataIssue] = []
    unknown = [column for column in ds.column_names if column not in COLUMNS]
    if unknown:
        issues.append(DataIssue(where, 0, _unknown_columns(unknown)))
    if len(ds) == 0:
        issues.append(DataIssue(where, 0, "empty dataset: no rows"))
    records: list[PreferenceRecord] = []
    first_row_of_id: dict[str, int] = {}
    for index, row in _rows(ds.select_columns([c for c in ds.column_names if c in COLUMNS])):
        record, record_id = _record(row, index, where, store, issues)
        if record_id is not None and record_id in first_row_of_id:
            issues.append(DataIssue(where, 0, f"index {index}: duplicate id '{record_id}' "
                                              f"(first at index {first_row_of_id[record_id]})",
                                    "id"))
            continue
        if record_id is not None:
            first_row_of_id[record_id] = index
        if record is not None:
            records.append(record)
    if issues:
        raise DataValidationError(issues)
    return records


def _unknown_columns(unknown: list[str]) -> str:
    names = ", ".join(f"'{column}'" for column in unknown)
    hints = "".join(f"; '{column}': did you mean '{close[0]}'?" for column in unknown
                    if (close := difflib.get_close_matches(column, COLUMNS, n=1)))
    return (f"unknown column{'s' if len(unknown) > 1 else ''} {names}{hints} (dpalign reads "
            f"{', '.join(COLUMNS)}; drop the others with ds.remove_columns({unknown!r}))")


def _rows(ds: Dataset) -> Iterator[tuple[int, dict[str, Any]]]:
    """(0-based index, row) with values as stored: images as ``{"bytes", "path"}`` dicts, not
    decoded, so their bytes are kept unchanged."""
    table = ds.with_format("arrow")
    for start in range(0, len(ds), ROW_BATCH):
        for offset, row in enumerate(table[start:start + ROW_BATCH].to_pylist()):
            yield start + offset, row


def _record(row: Mapping[str, Any], index: int, where: Path, store: ImageStore,
            issues: list[DataIssue]) -> tuple[PreferenceRecord | None, str | None]:
    """(record or None, id for the duplicate check) of one row; problems go to ``issues``.

    A null value is a missing one (Arrow fills absent values of a column with nulls)."""
    def problem(message: str, field: str | None = None) -> None:
        issues.append(DataIssue(where, 0, f"index {index}: {message}", field))

    values = {key: value for key, value in row.items() if value is not None}
    record_id = _raw_id(values.get("id", str(index)))
    try:
        refs = _image_refs(values)
    except RowError as error:
        problem(str(error), "images")
        refs = ()
    images = []
    for ref in refs:
        try:
            images.append(store.resolve(ref))
        except RowError as error:
            problem(str(error), ref.field)
    try:
        turns, n_placeholders = _turns(values)
    except RowError as error:
        problem(str(error))
        return None, record_id
    if n_placeholders and n_placeholders != len(refs):
        problem(f"field 'prompt' has {n_placeholders} image placeholder"
                f"{'s' if n_placeholders != 1 else ''} but the row holds {len(refs)} "
                f"image{'s' if len(refs) != 1 else ''}", "prompt")
        return None, record_id
    data: dict[str, Any] = {"id": values.get("id", str(index)), **turns}
    if images:
        data["images"] = images
    if "metadata" in values:
        data["metadata"] = _metadata(values["metadata"])
    try:
        record = PreferenceRecord.model_validate(data)
    except ValidationError as error:
        for field, message in validation_problems(error):
            problem(message, field)
        return None, record_id
    return record, record.id


def _raw_id(value: object) -> str | None:
    """The id a row would have, when it is a usable one (for the duplicate check)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _metadata(value: Any) -> Any:
    """An Arrow struct gives every row every key, absent ones as null: drop those."""
    if isinstance(value, Mapping):
        return {key: item for key, item in value.items() if item is not None}
    return value


def _image_refs(values: Mapping[str, Any]) -> tuple[ImageRef, ...]:
    """The row's images: the ``images`` list, or the single ``image``; none when neither."""
    image, images = values.get("image"), values.get("images")
    if image is not None and images is not None:
        raise RowError("give either 'image' or 'images', not both")
    if image is not None:
        return (ImageRef("image", _image_value(image)),)
    if images is None:
        return ()
    if not isinstance(images, list):
        raise RowError(f"field 'images' must be a list, got {json_type_name(images)} (one "
                       "image may go in 'image')")
    return tuple(ImageRef(f"images[{i}]", _image_value(item)) for i, item in enumerate(images))


def _image_value(value: Any) -> Any:
    """Raw bytes and PIL images as the ``{"bytes", "path"}`` dict ``ImageStore`` takes."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    return value


def _is_conversation(value: Any) -> bool:
    """TRL's test (``is_conversational``): a list whose first item is a message."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)
            and "role" in value[0])


def _turns(values: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """({prompt, chosen, rejected} as texts, image placeholders in the prompt).

    Strings (and values of other types, which the schema then refuses with the JSONL
    reader's message) pass through; conversations are read to text.
    """
    prompt, chosen, rejected = (values.get(key) for key in ("prompt", "chosen", "rejected"))
    if (_is_conversation(chosen) and _is_conversation(rejected)
            and not _is_conversation(prompt)
            and (prompt is None or len(chosen) > 1 or len(rejected) > 1)):
        return _implicit_turns(chosen, rejected)
    turns: dict[str, Any] = {}
    n_placeholders = 0
    for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        if key not in values:
            continue
        value = values[key]
        if isinstance(value, list):
            turns[key], n_images = _message_text(value, key, role)
            n_placeholders += n_images if key == "prompt" else 0
        else:
            turns[key] = value
    return turns, n_placeholders


def _implicit_turns(chosen: list[Any], rejected: list[Any]) -> tuple[dict[str, Any], int]:
    """The prompt is the turns ``chosen`` and ``rejected`` share (TRL's ``extract_prompt``);
    the rest of each is its answer."""
    shared = 0
    while (shared < min(len(chosen), len(rejected))
           and chosen[shared] == rejected[shared]):
        shared += 1
    if shared == 0:
        raise RowError("missing field 'prompt' (and 'chosen' and 'rejected' share no "
                       "first turn to take it from)")
    if shared == len(chosen) and shared == len(rejected):
        raise RowError("'chosen' and 'rejected' are identical: no preference signal")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(value):
            raise RowError(f"field '{key}' has no answer after the {shared} turn"
                           f"{'s' if shared != 1 else ''} it shares with the other")
    if shared > 1:
        raise RowError(f"'chosen' and 'rejected' share {shared} turns, which would be the "
                       "prompt: a dpalign pair is single-turn (one 'user' message, then one "
                       "answer)")
    prompt, n_placeholders = _message_text(chosen[:1], "chosen", "user")
    return ({"prompt": prompt,
             "chosen": _message_text(chosen[shared:], "chosen", "assistant", shared)[0],
             "rejected": _message_text(rejected[shared:], "rejected", "assistant", shared)[0]},
            n_placeholders)


def _message_text(messages: list[Any], name: str, role: str, start: int = 0
                  ) -> tuple[str, int]:
    """(text, image placeholders) of a one-message conversation, ``messages``, which is
    ``name[start:]`` of the row."""
    if not messages:
        raise RowError(f"field '{name}' is empty")
    if len(messages) > 1:
        span = f"'{name}'" if start == 0 else f"'{name}[{start}:]'"
        raise RowError(f"field {span} holds {len(messages)} messages: a dpalign pair is "
                       f"single-turn (one '{role}' message here)")
    where = f"{name}[{start}]"
    message = nested(sub_row(messages[0], where), where)
    got = pick(message, f"{where}.role")[1]
    if got != role:
        raise RowError(f"field '{where}.role' must be '{role}', got {got!r}")
    return content_text(pick(message, f"{where}.content")[1], f"{where}.content")
