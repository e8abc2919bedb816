"""MMInstruction/VLFeedback: several rated completions per prompt, turned into one pair.

Layout (dataset card ``dataset_info``, huggingface.co/datasets/MMInstruction/VLFeedback; file
``vlfeedback_80k.jsonl``)::

    id           string
    prompt       string            (``instruction`` accepted too)
    models       list[string]
    completions  list of {"model", "response", "annotations"}; annotations maps
                 "Helpfulness" / "Visual Faithfulness" / "Ethical Considerations"
                 to {"Rating": "1".."5", "Rationale": ...}
    img_path     string            (``image`` / ``image_path`` accepted: Parquet re-exports
                                    embed the image as {"bytes", "path"})

``completions`` may also come as a struct of lists (``{"model": [...], "response": [...],
"annotations": [...]}``), which is how ``datasets`` hands back a ``Sequence`` of structs.

Pairing (one pair per prompt, best vs worst):

* a completion's score is the mean of its numeric ratings over the three aspects (ratings
  that are not numbers, e.g. "N/A", are left out of the mean);
* completions with no numeric rating, or with a missing/blank response, are left out;
* chosen = the highest score, rejected = the lowest; ties go to the earlier completion;
* the row is skipped when fewer than two completions are left, or when the best and worst
  scores are equal (all tie).

One pair per prompt keeps each source prompt+image a single privacy unit: emitting every
ordered pair would put up to six near-duplicate examples of one image in the data, which
example-level DP would count as unrelated people.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpalign.data.convert.base import (
    Converter,
    Draft,
    RowError,
    RowSkip,
    image_field,
    pick,
    provenance,
    row_id,
    sub_row,
    text_field,
)
from dpalign.data.schema import json_type_name

ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
SKIP_FEW = "fewer than two rated completions"
SKIP_TIE = "all rated completions tie"


@dataclass(frozen=True)
class Scored:
    """A usable completion: its position, score, model and response."""

    index: int
    score: float
    model: str | None
    response: str


def completions(value: Any) -> list[Mapping[str, Any]]:
    """The completions as a list of objects, from a list of structs or a struct of lists."""
    if isinstance(value, Mapping):
        columns = {key: col for key, col in value.items() if col is not None}
        for key, col in columns.items():
            if not isinstance(col, list):
                raise RowError(f"field 'completions.{key}' must be a list, "
                               f"got {json_type_name(col)}")
        lengths = {len(col) for col in columns.values()}
        if len(lengths) > 1:
            raise RowError("field 'completions' has lists of different lengths")
        n = lengths.pop() if lengths else 0
        return [{key: col[i] for key, col in columns.items()} for i in range(n)]
    if not isinstance(value, list):
        raise RowError(f"field 'completions' must be a list, got {json_type_name(value)}")
    return [sub_row(item, f"completions[{i}]") for i, item in enumerate(value)]


def rating(annotation: Any) -> float | None:
    """``{"Rating": "4", ...}`` -> 4.0; None when absent or not a finite number."""
    if not isinstance(annotation, Mapping):
        return None
    value = annotation.get("Rating")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def score(annotations: Any) -> float | None:
    """Mean numeric rating over ``ASPECTS``; None when none is numeric."""
    if not isinstance(annotations, Mapping):
        return None
    ratings = [r for r in (rating(annotations.get(aspect)) for aspect in ASPECTS)
               if r is not None]
    return sum(ratings) / len(ratings) if ratings else None


def scored(items: list[Mapping[str, Any]]) -> list[Scored]:
    """The completions that can be ranked (numeric score and non-blank response)."""
    usable = []
    for i, item in enumerate(items):
        response = item.get("response")
        if response is not None and not isinstance(response, str):
            raise RowError(f"field 'completions[{i}].response' must be a string, "
                           f"got {json_type_name(response)}")
        value = score(item.get("annotations"))
        if value is None or response is None or not response.strip():
            continue
        model = item.get("model")
        usable.append(Scored(i, value, model if isinstance(model, str) else None, response))
    return usable


def best_and_worst(items: list[Scored]) -> tuple[Scored, Scored]:
    """(chosen, rejected); ``RowSkip`` when fewer than two or all scores tie."""
    if len(items) < 2:
        raise RowSkip(SKIP_FEW)
    best = max(items, key=lambda c: (c.score, -c.index))
    worst = min(items, key=lambda c: (c.score, c.index))
    if best.score == worst.score:
        raise RowSkip(SKIP_TIE)
    return best, worst


def convert_row(row: Mapping[str, Any], default_id: str) -> tuple[Draft, ...]:
    """One VLFeedback row -> the best-vs-worst pair."""
    record_id, from_source = row_id(row, ("id",), default_id)
    prompt = text_field(row, "prompt", "instruction")
    image = image_field(row, "img_path", "image", "image_path")
    chosen, rejected = best_and_worst(scored(completions(pick(row, "completions")[1])))
    metadata = provenance(row, record_id if from_source else None)
    metadata.update(chosen_model=chosen.model, rejected_model=rejected.model,
                    chosen_score=chosen.score, rejected_score=rejected.score)
    return (Draft(record_id, (image,), prompt, chosen.response, rejected.response, metadata),)


VLFEEDBACK = Converter("vlfeedback", convert_row,
                       "MMInstruction/VLFeedback: prompt, completions with ratings, img_path; "
                       "best vs worst mean rating per prompt, ties skipped")
