"""CHAIR: caption hallucination assessment with image relevance (Rohrbach et al., 2018).

A caption *mentions* an object category when one of the category's surface words
(synonyms, e.g. "puppy" for "dog", "motor bike" for "motorcycle") occurs in it; a
mention is *hallucinated* when its category is not among the image's ground-truth
objects. Over a set of captions (DESIGN.md §5):

- CHAIR_s = captions with at least one hallucinated mention / captions;
- CHAIR_i = hallucinated mentions / all mentions;
- recall = ground-truth categories mentioned at least once / ground-truth categories.

Object extraction is deliberately simple and dependency-free (see
:func:`extract_objects`); it does not reproduce the hand-written special cases of the
authors' script (e.g. "baby elephant", "passenger jet", "toilet seat"), so its numbers
can differ slightly from published CHAIR values on the same captions.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ChairMetrics", "SynonymMap", "chair_metrics", "extract_objects"]

_WORD = re.compile(r"[a-z0-9]+")
# Plural -> singular suffix rewrites, tried in this order; the first rewrite that
# lands on a known surface word wins ("puppies" -> "puppy", "women" -> "woman",
# "benches" -> "bench", "dogs" -> "dog").
_SINGULAR_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ies", "y"),
    ("men", "man"),
    ("es", ""),
    ("s", ""),
)

Tokens = tuple[str, ...]


def _tokens(text: str) -> Tokens:
    """Lowercase ``text`` and split it into alphanumeric word tokens (punctuation drops)."""
    return tuple(_WORD.findall(text.lower()))


def _singular_forms(word: str) -> Iterator[str]:
    """Candidate singular forms of ``word`` under the simple suffix rules."""
    for suffix, replacement in _SINGULAR_SUFFIXES:
        singular = word.removesuffix(suffix) + replacement
        if word.endswith(suffix) and singular:
            yield singular


class SynonymMap:
    """Maps surface words (one or more words each) to object categories.

    Surface words and category names are normalised the way captions are: lowercase,
    punctuation dropped, runs of whitespace collapsed. Every category is a surface
    word for itself. A surface word claimed by two different categories is an error.
    """

    def __init__(self, surface_to_category: Mapping[str, str]) -> None:
        """Build the map from ``{surface word: category}`` (categories map to themselves)."""
        by_tokens: dict[Tokens, str] = {}
        categories: dict[str, None] = {}  # insertion-ordered set
        for surface, category in surface_to_category.items():
            category_tokens = _tokens(category)
            if not category_tokens:
                raise ValueError(f"category name {category!r} has no words")
            name = " ".join(category_tokens)
            categories.setdefault(name)
            for key in (category_tokens, _tokens(surface)):
                if not key:
                    continue
                claimed = by_tokens.setdefault(key, name)
                if claimed != name:
                    raise ValueError(
                        f"surface word {' '.join(key)!r} maps to both {claimed!r} and {name!r}"
                    )
        self._by_tokens = by_tokens
        self._categories = tuple(categories)
        self._max_words = max((len(key) for key in by_tokens), default=0)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Iterable[str]]) -> SynonymMap:
        """Build the map from ``{category: [synonyms]}``; the category is itself a synonym."""
        surface_to_category: dict[str, str] = {}
        for category, synonyms in mapping.items():
            surface_to_category[category] = category
            for synonym in synonyms:
                claimed = surface_to_category.setdefault(synonym, category)
                if claimed != category:
                    raise ValueError(
                        f"synonym {synonym!r} listed under both {claimed!r} and {category!r}"
                    )
        return cls(surface_to_category)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SynonymMap:
        """Read the CHAIR synonyms layout: one category per line, comma-separated.

        The first entry of a line is the category name, the rest its synonyms.
        Blank lines and empty entries are ignored; stray spaces, repeated entries and
        multi-word entries are fine.
        """
        mapping: dict[str, list[str]] = {}
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                entries = [entry.strip() for entry in line.split(",") if entry.strip()]
                if entries:
                    mapping.setdefault(entries[0], []).extend(entries[1:])
        return cls.from_mapping(mapping)

    @property
    def categories(self) -> tuple[str, ...]:
        """The category names, in the order they were first given."""
        return self._categories

    @property
    def max_words(self) -> int:
        """The number of words in the longest surface word."""
        return self._max_words

    def lookup(self, phrase: str) -> str | None:
        """The category of a surface word (exact after normalisation), or ``None``."""
        return self._by_tokens.get(_tokens(phrase))

    def _match(self, window: Tokens) -> str | None:
        """Category of ``window`` as written or with its last word made singular."""
        found = self._by_tokens.get(window)
        if found is not None:
            return found
        *head, last = window
        for singular in _singular_forms(last):
            found = self._by_tokens.get((*head, singular))
            if found is not None:
                return found
        return None

    def __len__(self) -> int:
        return len(self._by_tokens)

    def __repr__(self) -> str:
        return f"SynonymMap({len(self._categories)} categories, {len(self)} surface words)"


def extract_objects(caption: str, synonyms: SynonymMap) -> list[str]:
    """The categories a caption mentions, one entry per mention, in caption order.

    The caption is lowercased and split into word tokens (punctuation is dropped, so
    "hot-dog" reads as "hot dog"). Scanning left to right, the longest run of tokens
    that is a surface word wins and is consumed, so "hot dog" is one mention of
    "hot dog", not a mention of "dog". A run whose last token is not a surface word
    also matches when a singular form of that token is one, by the first rule that
    applies of: "-ies" -> "-y", "-men" -> "-man", drop "-es", drop "-s"
    ("puppies", "women", "benches", "dogs", "hot dogs"). Irregular plurals beyond
    these ("mice", "geese") are not recognised unless listed as synonyms.
    """
    tokens = _tokens(caption)
    mentions: list[str] = []
    start = 0
    while start < len(tokens):
        width, category = _longest_match(tokens, start, synonyms)
        if category is not None:
            mentions.append(category)
        start += width
    return mentions


def _longest_match(tokens: Tokens, start: int, synonyms: SynonymMap) -> tuple[int, str | None]:
    """(tokens consumed, category) for the longest surface word at ``start``; (1, None) if none."""
    longest = min(synonyms.max_words, len(tokens) - start)
    for width in range(longest, 0, -1):
        category = synonyms._match(tokens[start : start + width])
        if category is not None:
            return width, category
    return 1, None


@dataclass(frozen=True)
class ChairMetrics:
    """CHAIR scores over a set of captions.

    ``n_mentions`` counts all object mentions and ``n_hallucinated`` the hallucinated
    ones (mentions, not captions), so ``chair_i == n_hallucinated / n_mentions``.
    """

    chair_s: float
    chair_i: float
    recall: float
    n_captions: int
    n_mentions: int
    n_hallucinated: int

    def to_dict(self) -> dict[str, float | int]:
        """The scores as a plain dict, e.g. for a JSON report."""
        return dataclasses.asdict(self)


def _ground_truth(objects: Collection[str], index: int, known: frozenset[str]) -> set[str]:
    """Normalise one caption's ground-truth category names; reject unknown names."""
    if isinstance(objects, str):
        raise TypeError(f"gt_objects[{index}] is a string; pass a collection of category names")
    truth = {" ".join(_tokens(name)) for name in objects}
    unknown = sorted(truth - known)
    if unknown:
        raise ValueError(f"gt_objects[{index}] has names that are not categories: {unknown}")
    return truth


def chair_metrics(
    captions: Sequence[str],
    gt_objects: Sequence[Collection[str]],
    synonyms: SynonymMap,
) -> ChairMetrics:
    """Score captions against each image's ground-truth object categories.

    ``gt_objects[k]`` holds the category names (as in ``synonyms.categories``; case
    and spacing are normalised, repeats ignored) present in the image of
    ``captions[k]``. Mentions are those of :func:`extract_objects`, and a category
    mentioned several times in one caption counts once *per mention* in CHAIR_i,
    both in the numerator (if hallucinated) and in the denominator. Recall counts
    each ground-truth category of a caption once, however often it is mentioned.
    A ratio with a zero denominator (no mentions at all, no ground-truth objects at
    all) is reported as 0.0.

    Raises:
        ValueError: if ``captions`` is empty, the two sequences differ in length, or
            a ground-truth name is not a category of ``synonyms``.
        TypeError: if an entry of ``gt_objects`` is a bare string.
    """
    if len(captions) != len(gt_objects):
        raise ValueError(f"{len(captions)} captions but {len(gt_objects)} ground-truth object sets")
    if not captions:
        raise ValueError("cannot score an empty set of captions")
    known = frozenset(synonyms.categories)
    hallucinated_captions = mentions_total = hallucinated_total = 0
    gt_total = gt_mentioned = 0
    for index, (caption, objects) in enumerate(zip(captions, gt_objects, strict=True)):
        truth = _ground_truth(objects, index, known)
        mentions = extract_objects(caption, synonyms)
        # Every mention counts, repeats included: the authors' chair.py adds
        # len(node_words) per caption to the mention count and one hallucination per
        # node word outside the ground truth, with no de-duplication.
        hallucinated = sum(category not in truth for category in mentions)
        hallucinated_captions += hallucinated > 0
        mentions_total += len(mentions)
        hallucinated_total += hallucinated
        gt_total += len(truth)
        gt_mentioned += len(truth.intersection(mentions))
    return ChairMetrics(
        chair_s=hallucinated_captions / len(captions),
        chair_i=hallucinated_total / mentions_total if mentions_total else 0.0,
        recall=gt_mentioned / gt_total if gt_total else 0.0,
        n_captions=len(captions),
        n_mentions=mentions_total,
        n_hallucinated=hallucinated_total,
    )
