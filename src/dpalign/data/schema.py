"""The one schema for a preference record, as stored one per line in a JSONL file.

A record is the privacy unit of dpalign (DESIGN §2): one preference example made of
image(s), a prompt, a chosen and a rejected response. ``metadata.user_id`` groups examples
for user-level DP.

Example line::

    {"id": "p1", "images": ["img/p1.png"], "prompt": "What is on the table?",
     "chosen": "A red cup.", "rejected": "A blue cat.",
     "metadata": {"user_id": "u7", "error_kind": "object", "hardness": "hard"}}

``"image": "img/p1.png"`` may stand in for ``"images"`` when there is one image. Image paths
are relative to the JSONL file's folder, or absolute. A record without images (no
``"images"``, or ``"images": []``) is a text-only pair, for text LLMs (or a VLM asked
without a picture).
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

_JSON_TYPE_NAMES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def json_type_name(value: object) -> str:
    """The JSON name of a decoded value's type ("object", "array", ...)."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _int_to_str(value: object) -> object:
    """Accept JSON integers where a string id is expected (booleans stay errors)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank_string", "must be a non-empty string")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_blank)]
IdStr = Annotated[NonEmptyStr, BeforeValidator(_int_to_str)]


class PairMetadata(BaseModel):
    """Optional facts about a pair; keys beyond the known ones are kept as they are."""

    model_config = ConfigDict(frozen=True, extra="allow")

    error_kind: str | None = None
    hardness: str | None = None
    hardness_score: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    user_id: Annotated[str | None, BeforeValidator(_int_to_str)] = None


class PreferenceRecord(BaseModel):
    """One preference example: image(s) (none for a text-only pair), prompt, chosen and
    rejected response."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: IdStr
    images: tuple[NonEmptyStr, ...] = ()
    prompt: NonEmptyStr
    chosen: NonEmptyStr
    rejected: NonEmptyStr
    metadata: PairMetadata = PairMetadata()

    @model_validator(mode="before")
    @classmethod
    def _null_metadata(cls, data: Any) -> Any:
        """``"metadata": null`` means no metadata."""
        if isinstance(data, dict) and "metadata" in data and data["metadata"] is None:
            return {key: value for key, value in data.items() if key != "metadata"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _image_alias(cls, data: Any) -> Any:
        """Turn ``"image": "a.png"`` into ``"images": ["a.png"]``; refuse both keys."""
        if not isinstance(data, dict) or "image" not in data:
            return data
        if "images" in data:
            raise PydanticCustomError(
                "image_and_images", "give either 'image' or 'images', not both"
            )
        image = data["image"]
        if not isinstance(image, str):
            raise PydanticCustomError(
                "image_type",
                "field 'image' must be one path string, got {got} (use 'images' for a list)",
                {"got": json_type_name(image)},
            )
        rest = {key: value for key, value in data.items() if key != "image"}
        return {**rest, "images": [image]}

    @model_validator(mode="after")
    def _has_preference(self) -> PreferenceRecord:
        if self.chosen.strip() == self.rejected.strip():
            raise PydanticCustomError(
                "no_preference", "'chosen' and 'rejected' are identical: no preference signal"
            )
        return self

    @property
    def text_only(self) -> bool:
        """True for a pair without images."""
        return not self.images

    @property
    def user_id(self) -> str | None:
        """The user this example belongs to (for user-level DP), if known."""
        return self.metadata.user_id


# Short messages per pydantic error type. Placeholders: {field} (dotted location), {got}
# (JSON type of the bad value), {input}, and the error's ctx keys (ge, le, ...).
# Types not listed here fall back to "field '<field>' <msg>" or the bare message.
_MESSAGES: dict[str, str] = {
    "missing": "missing field '{field}'",
    "extra_forbidden": "unknown field '{field}'",
    "string_type": "field '{field}' must be a string, got {got}",
    "blank_string": "field '{field}' must be a non-empty string",
    "tuple_type": "field '{field}' must be a list, got {got}",
    "too_short": "field '{field}' must not be empty",
    "model_type": "field '{field}' must be a JSON object, got {got}",
    "float_type": "field '{field}' must be a number, got {got}",
    "float_parsing": "field '{field}' must be a number, got {got}",
    "finite_number": "field '{field}' must be a finite number",
    "greater_than_equal": "field '{field}' must be >= {ge}, got {input}",
    "less_than_equal": "field '{field}' must be <= {le}, got {input}",
}

_TOP_LEVEL_KEYS: tuple[str, ...] = (*PreferenceRecord.model_fields, "image")


def _location(loc: tuple[int | str, ...]) -> str:
    """('images', 0) -> 'images[0]'; ('metadata', 'user_id') -> 'metadata.user_id'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, _TOP_LEVEL_KEYS, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validation_problems(error: ValidationError) -> list[tuple[str | None, str]]:
    """(field, message) per problem in a record's ``ValidationError``; field is the dotted
    location (``"metadata.user_id"``, ``"images[0]"``), None for record-level problems."""
    problems: list[tuple[str | None, str]] = []
    for item in error.errors():
        field = _location(item["loc"])
        template = _MESSAGES.get(item["type"])
        if template is None:
            message = f"field '{field}' {item['msg']}" if field else item["msg"]
        else:
            value = item.get("input")
            context = {**item.get("ctx", {}), "field": field, "got": json_type_name(value)}
            message = template.format(input=value, **context)
            if item["type"] == "extra_forbidden" and len(item["loc"]) == 1:
                message += _did_you_mean(field)
        problems.append((field or None, message))
    return problems


def describe_validation_error(error: ValidationError) -> list[str]:
    """One short, user-facing message per problem in a record's ``ValidationError``."""
    return [message for _, message in validation_problems(error)]
