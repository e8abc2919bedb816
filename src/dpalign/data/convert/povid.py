"""YiyangAiLab/POVID_preference_data_for_VLLMs: a JSON array in LLaVA conversation style.

Layout (the fields POVID's own trainer reads, ``llava/train/train_dpo.py`` in
github.com/YiyangZhou/POVID; file ``POVID_preference_data_for_VLLMs.json``)::

    id                      string   (optional; else the row index is the id)
    image                   string   path under the COCO image folder (``--images``)
    conversations           [{"from": "human", "value": "<image>\\nQuestion"},
                             {"from": "gpt", "value": chosen answer}]
    rejected_conversations  same question, {"from": "gpt", "value": rejected answer}

The ``<image>`` placeholder is removed from the prompt. Flat rows with ``question`` (or
``prompt``), ``chosen`` and ``rejected`` are accepted too (re-exports of the same data).
Conversations with more than one question are skipped: a dpalign pair is single-turn.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    strip_image_token,
    sub_row,
    text,
    text_field,
)
from dpalign.data.schema import json_type_name

SKIP_MULTI_TURN = "multi-turn conversation (dpalign pairs are single-turn)"


def single_turn(row: Mapping[str, Any], name: str) -> tuple[str, str]:
    """(question, answer) of a one-question LLaVA conversation in field ``name``."""
    _, turns = pick(row, name)
    if not isinstance(turns, list):
        raise RowError(f"field '{name}' must be a list, got {json_type_name(turns)}")
    speakers = []
    for i, turn in enumerate(turns):
        speakers.append(pick(sub_row(turn, f"{name}[{i}]"), "from")[1])
    if speakers.count("human") > 1:
        raise RowSkip(SKIP_MULTI_TURN)
    if speakers != ["human", "gpt"]:
        raise RowError(f"field '{name}' must be one 'human' turn then one 'gpt' turn, "
                       f"got {speakers}")
    question = strip_image_token(text(turns[0].get("value"), f"{name}[0].value"))
    if not question:
        raise RowError(f"field '{name}[0].value' holds only the image placeholder")
    return question, text(turns[1].get("value"), f"{name}[1].value")


def texts(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from conversations or from flat fields."""
    if "conversations" in row:
        question, chosen = single_turn(row, "conversations")
        rejected_question, rejected = single_turn(row, "rejected_conversations")
        if rejected_question != question:
            raise RowError("'conversations' and 'rejected_conversations' ask different "
                           "questions")
        return question, chosen, rejected
    prompt = strip_image_token(text_field(row, "question", "prompt"))
    return prompt, text_field(row, "chosen"), text_field(row, "rejected")


def convert_row(row: Mapping[str, Any], default_id: str) -> tuple[Draft, ...]:
    """One POVID row -> one pair."""
    record_id, from_source = row_id(row, ("id",), default_id)
    prompt, chosen, rejected = texts(row)
    return (Draft(
        id=record_id,
        images=(image_field(row, "image", "image_path", "img_path"),),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        metadata=provenance(row, record_id if from_source else None),
    ),)


POVID = Converter("povid", convert_row,
                  "POVID: image, conversations / rejected_conversations (LLaVA style)")
