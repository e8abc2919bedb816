"""openbmb/RLAIF-V-Dataset: one pair per row.

Layout (dataset card, "Data fields", huggingface.co/datasets/openbmb/RLAIF-V-Dataset; the
Parquet shards ``RLAIF-V-Dataset_000.parquet`` ...)::

    ds_name         string   dataset name
    image           image    {"bytes": ..., "path": ...} in Parquet
    question        string   the prompt
    chosen          string
    rejected        string
    origin_dataset  string   where the image/question came from
    origin_split    string   generator/labeller models and question type
    idx             string   data index (used as the record id)
    image_path      string   image path (used when ``image`` is absent or null)

``prompt`` is accepted for ``question`` (re-exports such as trl-lib's use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpalign.data.convert.base import (
    Converter,
    Draft,
    image_field,
    provenance,
    row_id,
    text_field,
)

PROVENANCE_KEYS = ("ds_name", "origin_dataset", "origin_split")


def convert_row(row: Mapping[str, Any], default_id: str) -> tuple[Draft, ...]:
    """One RLAIF-V row -> one pair."""
    record_id, from_source = row_id(row, ("idx", "id"), default_id)
    return (Draft(
        id=record_id,
        images=(image_field(row, "image", "image_path"),),
        prompt=text_field(row, "question", "prompt"),
        chosen=text_field(row, "chosen"),
        rejected=text_field(row, "rejected"),
        metadata=provenance(row, record_id if from_source else None, *PROVENANCE_KEYS),
    ),)


RLAIF_V = Converter("rlaif-v", convert_row,
                    "openbmb/RLAIF-V-Dataset: question, chosen, rejected, image, idx")
