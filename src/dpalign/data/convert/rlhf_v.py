"""openbmb/RLHF-V-Dataset: one pair per row, the texts packed in a JSON string.

Layout (dataset card, "Data fields", huggingface.co/datasets/openbmb/RLHF-V-Dataset; file
``RLHF-V-Dataset.parquet``)::

    ds_name         string   dataset name
    image           image    {"bytes": ..., "path": ...} in Parquet
    text            string   JSON object with "question", "chosen", "rejected"
    origin_dataset  string   dataset used for annotation
    origin_split    string   model that wrote the original answer, question type
    idx             int64    data index (used as the record id)
    image_path      string   image path (used when ``image`` is absent or null)

``text`` may also be an already-decoded object (JSON exports of the decoded dataset).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dpalign.data.convert.base import (
    Converter,
    Draft,
    RowError,
    image_field,
    nested,
    pick,
    provenance,
    row_id,
    sub_row,
    text_field,
)
from dpalign.data.convert.rlaif_v import PROVENANCE_KEYS


def _texts(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``text`` field decoded to its question/chosen/rejected object."""
    _, value = pick(row, "text")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RowError(f"field 'text' is not valid JSON: {error}") from error
    return nested(sub_row(value, "text"), "text")


def convert_row(row: Mapping[str, Any], default_id: str) -> tuple[Draft, ...]:
    """One RLHF-V row -> one pair."""
    record_id, from_source = row_id(row, ("idx", "id"), default_id)
    texts = _texts(row)
    return (Draft(
        id=record_id,
        images=(image_field(row, "image", "image_path"),),
        prompt=text_field(texts, "text.question"),
        chosen=text_field(texts, "text.chosen"),
        rejected=text_field(texts, "text.rejected"),
        metadata=provenance(row, record_id if from_source else None, *PROVENANCE_KEYS),
    ),)


RLHF_V = Converter("rlhf-v", convert_row,
                   "openbmb/RLHF-V-Dataset: text (JSON: question, chosen, rejected), image, idx")
