"""CHAIR: caption hallucination assessment with image relevance (Rohrbach et al., 2018).

A caption *mentions* an object category when one of the category's surface words
(synonyms, e.g. "puppy" for "dog", "motor bike" for "motorcycle") occurs in it; a
mention is *hallucinated* when its category is not among the image's ground-truth
objects. Over a set of captions (DESIGN.md §5):

- CHAIR_s = captions with at least one hallucinated mention / captions;
- CHAIR_i = hallucinated mentions / all mentions;
- recall = ground-truth categories mentioned at least once / ground-truth categories.

Which words are mentions is decided by a named *rule set* (:data:`CHAIR_RULES`):

- ``"dpalign"`` (:func:`extract_objects`): simple and dependency-free, longest synonym
  first, plain plural rules. Used for the synthetic world.
- ``"coco-official"`` (:class:`~dpalign.eval.chair_coco.CocoOfficialRules`): the CHAIR
  authors' hand-written COCO rules ("baby elephant" is an elephant, "toilet seat" a
  toilet, "train track" no train, their tokeniser and singulariser), so that scores on
  COCO captions compare with published CHAIR values -- given the authors' ground truth
  too, which adds the objects named in an image's COCO reference captions, read with the
  same rules (:func:`dpalign.eval.coco.caption_objects`).

Every :class:`ChairMetrics` records the rule set that produced it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from dpalign.eval.chair_coco import CocoOfficialRules

__all__ = [
    "CHAIR_RULES",
    "DEFAULT_RULES",
    "ChairMetrics",
    "MentionFinder",
    "SynonymMap",
    "chair_metrics",
    "extract_objects",
    "mention_finder",
]

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
    :attr:`listed` keeps the surface words as written, for rules that match them verbatim.
    """

    def __init__(self, surface_to_category: Mapping[str, str],
                 listed: Iterable[tuple[str, str]] | None = None) -> None:
        """Build the map from ``{surface word: category}`` (categories map to themselves).

        ``listed`` holds the ``(surface word as written, category)`` pairs of the source
        list (default: the items of ``surface_to_category``).
        """
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
        pairs = surface_to_category.items() if listed is None else listed
        self._listed = tuple((surface, " ".join(_tokens(category))) for surface, category in pairs)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Iterable[str]],
                     listed: Iterable[tuple[str, str]] | None = None) -> SynonymMap:
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
        return cls(surface_to_category, listed)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SynonymMap:
        """Read the CHAIR synonyms layout: one category per line, comma-separated.

        The first entry of a line is the category name, the rest its synonyms.
        Blank lines and empty entries are ignored; stray spaces, repeated entries and
        multi-word entries are fine. :attr:`listed` keeps the entries as the CHAIR
        authors' script reads them: each stripped line split on ", " exactly, so an
        entry after a double space keeps its leading space (" motor bike").
        """
        mapping: dict[str, list[str]] = {}
        listed: list[tuple[str, str]] = []
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                entries = [entry.strip() for entry in line.split(",") if entry.strip()]
                if entries:
                    mapping.setdefault(entries[0], []).extend(entries[1:])
                    listed += [(verbatim, entries[0]) for verbatim in line.strip().split(", ")]
        return cls.from_mapping(mapping, listed)

    @property
    def categories(self) -> tuple[str, ...]:
        """The category names, in the order they were first given."""
        return self._categories

    @property
    def listed(self) -> tuple[tuple[str, str], ...]:
        """``(surface word as written in the source, category)`` pairs, in source order."""
        return self._listed

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


# --- rule sets ------------------------------------------------------------------------

MentionFinder = Callable[[str], list[str]]
"""Maps a caption to the categories it mentions, one entry per mention, in caption order."""


def _dpalign_rules(synonyms: SynonymMap) -> MentionFinder:
    """dpalign's own rules: :func:`extract_objects`."""
    return lambda caption: extract_objects(caption, synonyms)


def _coco_official_rules(synonyms: SynonymMap) -> MentionFinder:
    """The CHAIR authors' COCO rules over the synonym list as they read it."""
    return CocoOfficialRules(synonyms.listed)


CHAIR_RULES: Mapping[str, Callable[[SynonymMap], MentionFinder]] = MappingProxyType({
    "dpalign": _dpalign_rules,
    "coco-official": _coco_official_rules,
})
"""Rule sets by name; each builds a :data:`MentionFinder` from a synonym list."""

DEFAULT_RULES = "dpalign"


def mention_finder(synonyms: SynonymMap, rules: str = DEFAULT_RULES) -> MentionFinder:
    """The mention finder of rule set ``rules`` (a key of :data:`CHAIR_RULES`).

    Raises:
        ValueError: if ``rules`` is not a known rule set (the message lists them).
    """
    if rules not in CHAIR_RULES:
        raise ValueError(f"unknown CHAIR rule set {rules!r}; known: {sorted(CHAIR_RULES)}")
    return CHAIR_RULES[rules](synonyms)


# --- metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChairMetrics:
    """CHAIR scores over a set of captions, and the rule set that found the mentions.

    ``n_mentions`` counts all object mentions and ``n_hallucinated`` the hallucinated
    ones (mentions, not captions), so ``chair_i == n_hallucinated / n_mentions``.
    """

    chair_s: float
    chair_i: float
    recall: float
    n_captions: int
    n_mentions: int
    n_hallucinated: int
    rules: str = DEFAULT_RULES

    def to_dict(self) -> dict[str, float | int | str]:
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
    *,
    rules: str = DEFAULT_RULES,
) -> ChairMetrics:
    """Score captions against each image's ground-truth object categories.

    ``gt_objects[k]`` holds the category names (as in ``synonyms.categories``; case
    and spacing are normalised, repeats ignored) present in the image of
    ``captions[k]``. Mentions are those found by the rule set ``rules`` (a key of
    :data:`CHAIR_RULES`); a category mentioned several times in one caption counts
    once *per mention* in CHAIR_i, both in the numerator (if hallucinated) and in the
    denominator (as in the authors' script). Recall counts
    each ground-truth category of a caption once, however often it is mentioned.
    A ratio with a zero denominator (no mentions at all, no ground-truth objects at
    all) is reported as 0.0.

    Raises:
        ValueError: if ``captions`` is empty, the two sequences differ in length, a
            ground-truth name is not a category of ``synonyms``, or ``rules`` is unknown.
        TypeError: if an entry of ``gt_objects`` is a bare string.
    """
    find_mentions = mention_finder(synonyms, rules)
    if len(captions) != len(gt_objects):
        raise ValueError(f"{len(captions)} captions but {len(gt_objects)} ground-truth object sets")
    if not captions:
        raise ValueError("cannot score an empty set of captions")
    known = frozenset(synonyms.categories)
    hallucinated_captions = mentions_total = hallucinated_total = 0
    gt_total = gt_mentioned = 0
    for index, (caption, objects) in enumerate(zip(captions, gt_objects, strict=True)):
        truth = _ground_truth(objects, index, known)
        mentions = find_mentions(caption)
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
        rules=rules,
    )
