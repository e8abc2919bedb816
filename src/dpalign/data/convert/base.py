"""What every format converter shares: the draft record it returns, the two ways a row can
fail (``RowError``: the input is wrong; ``RowSkip``: the row is fine but yields no pair), and
small field readers whose messages name the field.

A converter is a pure function ``(row, default_id) -> tuple[Draft, ...]``. It never touches
the file system: image values are passed through as ``ImageRef`` and resolved (paths checked,
embedded bytes written) by ``dpalign.data.convert.run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dpalign.data.schema import json_type_name

IMAGE_TOKEN = "<image>"


class RowError(ValueError):
    """The row does not have the layout its format documents (message names the field)."""


class RowSkip(Exception):  # noqa: N818 - a signal, not an error
    """The row is well formed but gives no preference pair; the message is the reason, and
    rows skipped for the same reason are counted together."""


@dataclass(frozen=True)
class ImageRef:
    """An image as the source stores it: a path string, or an HF ``{"bytes", "path"}`` dict.

    ``field`` names where it came from (``"image"``, ``"images[1]"``) for error messages.
    """

    field: str
    value: Any


@dataclass(frozen=True)
class Draft:
    """One preference pair read from a source row, before images are resolved."""

    id: str
    images: tuple[ImageRef, ...]
    prompt: str
    chosen: str
    rejected: str
    metadata: dict[str, Any] = field(default_factory=dict)


ConvertRow = Callable[[Mapping[str, Any], str], tuple[Draft, ...]]


@dataclass(frozen=True)
class Converter:
    """A named source layout and the pure function that turns one of its rows into pairs."""

    name: str
    convert: ConvertRow
    description: str


def _alternatives(names: tuple[str, ...]) -> str:
    rest = ", ".join(f"'{name}'" for name in names[1:])
    return f" (also accepted: {rest})" if rest else ""


def pick(row: Mapping[str, Any], *names: str) -> tuple[str, Any]:
    """(name, value) of the first of ``names`` present with a non-null value.

    Raises ``RowError`` naming the first (documented) name when none is usable.
    """
    for name in names:
        if row.get(name) is not None:
            return name, row[name]
    if any(name in row for name in names):
        present = next(name for name in names if name in row)
        raise RowError(f"field '{present}' is null")
    raise RowError(f"missing field '{names[0]}'{_alternatives(names)}")


def text(value: Any, where: str) -> str:
    """``value`` as a non-blank string, or ``RowError`` naming ``where``."""
    if not isinstance(value, str):
        raise RowError(f"field '{where}' must be a string, got {json_type_name(value)}")
    if not value.strip():
        raise RowError(f"field '{where}' is empty")
    return value


def text_field(row: Mapping[str, Any], *names: str) -> str:
    """The first present field of ``names`` as a non-blank string."""
    name, value = pick(row, *names)
    return text(value, name)


def sub_row(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` as a JSON object, or ``RowError`` naming ``where``."""
    if not isinstance(value, Mapping):
        raise RowError(f"field '{where}' must be an object, got {json_type_name(value)}")
    return value


def nested(row: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """A view of a nested object whose missing-field messages read ``'prefix.name'``."""
    return {f"{prefix}.{key}": value for key, value in row.items()}


def row_id(row: Mapping[str, Any], names: tuple[str, ...], default: str) -> tuple[str, bool]:
    """(id, from_source): the first of ``names`` as a string id, else ``default``.

    Integer ids become strings; an id of another type is a ``RowError``.
    """
    for name in names:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value), True
        if isinstance(value, str):
            return text(value, name).strip(), True
        raise RowError(f"field '{name}' must be a string or integer id, got "
                       f"{json_type_name(value)}")
    return default, False


def image_field(row: Mapping[str, Any], *names: str) -> ImageRef:
    """The first present image field of ``names`` (a path or an HF image dict)."""
    name, value = pick(row, *names)
    return ImageRef(name, value)


def provenance(row: Mapping[str, Any], source_id: str | None, *keys: str) -> dict[str, Any]:
    """Metadata kept from the source: its id and the named string fields that are set."""
    kept: dict[str, Any] = {} if source_id is None else {"source_id": source_id}
    for key in keys:
        value = row.get(key)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and value != "":
            kept[key] = value
    return kept


def strip_image_token(prompt: str) -> str:
    """LLaVA-style prompts carry ``<image>`` placeholders; dpalign's prompt is plain text."""
    return prompt.replace(IMAGE_TOKEN, "").strip()
