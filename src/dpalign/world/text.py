"""The world's language: captions, existence and colour questions, and their answers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpalign.world.render import PlacedObject, Scene
from dpalign.world.vocab import CATEGORY_BY_NAME

CAPTION_PROMPT = "Describe the image."


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def noun(rng: np.random.Generator, category: str, synonym_rate: float) -> str:
    """The category's name, or one of its synonyms with probability ``synonym_rate``."""
    synonyms = CATEGORY_BY_NAME[category].synonyms
    if synonyms and rng.random() < synonym_rate:
        return synonyms[int(rng.integers(len(synonyms)))]
    return category


def mention(colour: str, word: str) -> str:
    """'a red fork', 'an orange cat'."""
    return f"{article(colour)} {colour} {word}"


def join_caption(mentions: Sequence[str]) -> str:
    """'A red fork, a blue cat and a green knife.'"""
    body = mentions[0] if len(mentions) == 1 else ", ".join(mentions[:-1]) + " and " + mentions[-1]
    return body[0].upper() + body[1:] + "."


def scene_mentions(rng: np.random.Generator, scene: Scene, synonym_rate: float) -> list[str]:
    """One mention per object, in reading order (by cell)."""
    ordered: list[PlacedObject] = sorted(scene.objects, key=lambda o: o.cell)
    return [mention(o.colour, noun(rng, o.category, synonym_rate)) for o in ordered]


def existence_question(word: str) -> str:
    return f"Is there {article(word)} {word} in the image?"


def yes_answer(colour: str, word: str) -> str:
    return f"Yes, there is {mention(colour, word)}."


def no_answer(word: str) -> str:
    return f"No, there is no {word}."


def colour_question(word: str) -> str:
    return f"What colour is the {word}?"


def colour_answer(word: str, colour: str) -> str:
    return f"The {word} is {colour}."
