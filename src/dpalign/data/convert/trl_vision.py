"""TRL's vision preference format (what ``trl.DPOTrainer`` takes for VLMs).

Layout (TRL docs "Dataset formats and types", huggingface.co/docs/trl/dataset_formats; and
trl-lib/rlaif-v, HuggingFaceH4/rlaif-v_formatted)::

    images    list of images: {"bytes", "path"} dicts in Parquet, or path strings
              (``image``, one image, accepted too)
    prompt    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
    chosen    [{"role": "assistant", "content": [{"type": "text", "text": A}]}]
    rejected  [{"role": "assistant", "content": [{"type": "text", "text": B}]}]
    id        (optional; else the row number is the id)

``content`` may be a plain string, and ``prompt``/``chosen``/``rejected`` may be plain
strings ("standard" format). Text parts of one message are joined with newlines. The number of
``{"type": "image"}`` placeholders in the prompt, when there are any, must equal the number of
images. A prompt with more than one message, or a chosen/rejected with more than one, is
skipped (a dpalign pair is single-turn); the implicit-prompt layout (no ``prompt``) is
refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpalign.data.convert.base import (
    Converter,
    Draft,
    ImageRef,
    RowError,
    RowSkip,
    pick,
    provenance,
    row_id,
    sub_row,
    text,
)
from dpalign.data.schema import json_type_name

SKIP_MULTI_TURN = "multi-turn conversation (dpalign pairs are single-turn)"


def content_text(content: Any, where: str) -> tuple[str, int]:
    """(text, number of image placeholders) of one message's ``content``."""
    if isinstance(content, str):
        return text(content, where), 0
    if not isinstance(content, list):
        raise RowError(f"field '{where}' must be a string or a list of parts, "
                       f"got {json_type_name(content)}")
    texts, n_images = [], 0
    for i, part in enumerate(content):
        part = sub_row(part, f"{where}[{i}]")
        kind = pick(part, "type")[1]
        if kind == "image":
            n_images += 1
        elif kind == "text":
            texts.append(text(part.get("text"), f"{where}[{i}].text"))
        else:
            raise RowError(f"field '{where}[{i}].type' must be 'text' or 'image', got {kind!r}")
    if not texts:
        raise RowError(f"field '{where}' has no text part")
    return "\n".join(texts), n_images


def message_text(row: Mapping[str, Any], name: str, role: str) -> tuple[str, int]:
    """(text, image placeholders) of field ``name``: a string or a one-message conversation."""
    _, value = pick(row, name)
    if isinstance(value, str):
        return text(value, name), 0
    if not isinstance(value, list):
        raise RowError(f"field '{name}' must be a string or a list of messages, "
                       f"got {json_type_name(value)}")
    if not value:
        raise RowError(f"field '{name}' is empty")
    if len(value) > 1:
        raise RowSkip(SKIP_MULTI_TURN)
    message = sub_row(value[0], f"{name}[0]")
    got = pick(message, "role")[1]
    if got != role:
        raise RowError(f"field '{name}[0].role' must be '{role}', got {got!r}")
    return content_text(pick(message, "content")[1], f"{name}[0].content")


def image_refs(row: Mapping[str, Any]) -> tuple[ImageRef, ...]:
    """The row's images: the ``images`` list, or the single ``image``."""
    name, value = pick(row, "images", "image")
    if name == "image":
        return (ImageRef("image", value),)
    if not isinstance(value, list):
        raise RowError(f"field 'images' must be a list, got {json_type_name(value)}")
    if not value:
        raise RowError("field 'images' is empty")
    return tuple(ImageRef(f"images[{i}]", item) for i, item in enumerate(value))


def convert_row(row: Mapping[str, Any], default_id: str) -> tuple[Draft, ...]:
    """One TRL vision preference row -> one pair."""
    record_id, from_source = row_id(row, ("id",), default_id)
    if "prompt" not in row:
        raise RowError("missing field 'prompt' (the implicit-prompt layout is not supported)")
    prompt, n_placeholders = message_text(row, "prompt", "user")
    chosen, _ = message_text(row, "chosen", "assistant")
    rejected, _ = message_text(row, "rejected", "assistant")
    images = image_refs(row)
    if n_placeholders and n_placeholders != len(images):
        raise RowError(f"field 'prompt' has {n_placeholders} image placeholders but "
                       f"'{images[0].field.split('[')[0]}' holds {len(images)} images")
    return (Draft(record_id, images, prompt, chosen, rejected,
                  provenance(row, record_id if from_source else None)),)


TRL = Converter("trl", convert_row,
                "TRL vision preference: images, prompt/chosen/rejected as strings or "
                "conversations")
