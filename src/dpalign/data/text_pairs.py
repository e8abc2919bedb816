"""The world's preference pairs as text-only pairs, for text LLMs.

Each pair's image is replaced by a sentence stating what it shows (its objects and their
colours, from ``metadata.objects`` / ``metadata.colours``), put before the question, so a
text model can answer from the context what a VLM answers from the picture: the chosen
answer agrees with the stated scene, the rejected one contradicts it.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpalign.data.schema import PreferenceRecord
from dpalign.world.text import article


class MissingSceneError(ValueError):
    """A record has no ``metadata.objects`` to describe its image with."""


def scene_sentence(objects: Sequence[str], colours: Sequence[str] | None) -> str:
    """'The image shows a white sock, a yellow knife and a green shoe.'"""
    named = ([f"{article(c)} {c} {o}" for o, c in zip(objects, colours, strict=True)]
             if colours else [f"{article(o)} {o}" for o in objects])
    listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    return f"The image shows {listed}."


def text_pair(record: PreferenceRecord) -> PreferenceRecord:
    """``record`` without its images, the scene stated before its prompt."""
    meta = record.metadata.model_extra or {}
    objects, colours = meta.get("objects"), meta.get("colours")
    if not objects:
        raise MissingSceneError(f"record {record.id!r}: no metadata.objects to state its "
                                "scene with")
    return record.model_copy(update={
        "images": (), "prompt": f"{scene_sentence(objects, colours)}\n{record.prompt}"})
