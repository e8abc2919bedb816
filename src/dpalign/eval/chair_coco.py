"""The CHAIR authors' object-word rules for COCO captions, reimplemented without NLTK/pattern.

CHAIR numbers published on COCO come from the authors' script (``utils/chair.py`` in
LisaAnne/Hallucination), which reads a caption in four steps; :class:`CocoOfficialRules`
does the same:

1. Tokenise the lowercased caption like NLTK's ``word_tokenize`` (sentences split at a
   word-final period, then the Treebank rules): punctuation becomes its own token, a
   sentence-final period is split off, clitics such as ``'s`` are split off, but
   hyphenated words ("hot-dog") and slashed words ("cat/dog") stay one token.
2. Make every token singular with the ``singularize`` of the ``pattern`` library, quirks
   included: "bus" -> "bu", "glass" -> "glas", "tennis" -> "tenni", "ties" -> "ty",
   "canoes" -> "cano", while "collies"/"doggies" stay plural and "scissors" stays whole
   (see :func:`singular`).
3. Read adjacent token pairs left to right against a fixed table (:data:`PAIRS`): a known
   pair is consumed and replaced by one word, e.g. "baby elephant" -> "elephant" (not a
   person), "passenger train" -> "train", "toilet seat" -> "toilet", "bow tie" -> "tie",
   "hot dog" stays "hot dog" (not a dog), "train track" stays "train track" (no object).
   Pairs only: the three-word "stove top oven" never matches.
4. If "toilet" is among the words, every "seat" is dropped (so a toilet's seat is no
   chair). What remains is looked up *as written* in the synonym list as the script reads
   it (entries split on ", "), so an entry listed after a double space (" motor bike",
   " cheesecake") or capitalised ("iPhone") never matches a caption word.

Every remaining word that is a listed synonym is one mention of its category, repeats
included. NLTK's sentence splitter knows abbreviations ("mr.", "st."); here every
word-final period followed by a space or the end of the text ends a sentence, which
differs only for abbreviations, none of which is a COCO object word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["PAIRS", "CocoOfficialRules", "singular", "tokenize"]

# --- step 1: tokens -------------------------------------------------------------------

# Split off as tokens of their own, as NLTK's sentence splitter + Treebank rules do: a
# sentence-final period (ending a word, then any closing brackets or straight quotes, then
# a space; before curly closing quotes only at the end of the text), runs of dots, double
# dashes, these symbols and curly quotes ("dog’s" -> dog ’ s), long dashes, and a comma or
# colon not followed by a digit ("1,000" and "10:30" stay whole).
_SENTENCE_END = re.compile(r"""(?<=[^.\s])\.(?=[\])}>"']*\s|[\])}>"'»”’]*\s*$)""")
_PUNCTUATION = re.compile(
    r"""\.{2,}|--|[;@#$%&?!*()\[\]{}<>"`«»“”‘’„\u2012-\u2015]|[:,](?!\d)""")
# A quote that opens a word ('baby' -> ' baby '), unless it starts a clitic ('s, 're, ...).
_OPENING_QUOTE = re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
# Clitics and a closing quote at the end of a word: dog's -> dog 's, dogs' -> dogs '.
_CLITIC = re.compile(r"(?<=[^'\s])('s|'m|'d|'ll|'re|'ve|n't|')(?=\s)")


def tokenize(caption: str) -> list[str]:
    """Lowercase word tokens of ``caption`` as NLTK's ``word_tokenize`` gives them."""
    text = _SENTENCE_END.sub(" . ", f" {caption.lower()} ")
    text = _OPENING_QUOTE.sub("' ", _PUNCTUATION.sub(r" \g<0> ", text))
    return _CLITIC.sub(r" \1 ", text).split()


# --- step 2: singular forms -------------------------------------------------------------

# Kept as written: a word without a plural form, and plurals of "-ie" nouns that the
# singulariser returns unchanged (a bug kept here, so "collies" is no dog).
_INVARIANT = frozenset({"scissors"})
_KEPT_IE_PLURALS = ("collies", "doggies")
# Irregular endings, checked before the suffix rules: "policemen" -> "policeman".
_IRREGULAR_ENDINGS: tuple[tuple[str, str], ...] = (
    ("children", "child"), ("people", "person"), ("geese", "goose"), ("oxen", "ox"),
    ("kine", "cow"), ("men", "man"),
)
# Suffix rules, first match wins; the last one drops any final "s" ("bus" -> "bu").
_SUFFIX_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in (
        (r"^(ox)en", r"\1"),  # also mid-word: oxens -> oxs
        (r"(shoe)s$", r"\1"),
        (r"oes$", "o"),  # potatoes -> potato, but canoes -> cano
        (r"(bus)es$", r"\1"),
        (r"([ml])ice$", r"\1ouse"),  # mice -> mouse
        (r"(x|ch|ss|sh)es$", r"\1"),  # sandwiches -> sandwich, glasses -> glass
        (r"([^aeiouy]|qu)ies$", r"\1y"),  # puppies -> puppy, ties -> ty
        (r"([aeo]l)ves$", r"\1f"),  # calves -> calf
        (r"([nlw]i)ves$", r"\1fe"),  # knives -> knife
        (r"s$", ""),
    )
)


def singular(word: str) -> str:
    """``word`` made singular as the ``pattern`` library's ``singularize`` does it.

    Checked to agree with ``pattern.en.singularize`` on every word of pattern's English
    lexicon (and of those words + "s", "es", "'s") whose singular by either function is a
    word the COCO rules look at; other words may differ ("is" -> "i", "loaves" -> "loave"
    here), which cannot change a CHAIR score.
    """
    if word in _INVARIANT or word.endswith(_KEPT_IE_PLURALS):
        return word
    for ending, replacement in _IRREGULAR_ENDINGS:
        if word.endswith(ending):
            return word[: -len(ending)] + replacement
    for suffix, replacement in _SUFFIX_RULES:
        if suffix.search(word):
            return suffix.sub(replacement, word, count=1)
    return word


# --- step 3: word pairs ------------------------------------------------------------------

# Two-word names read as one object word (as themselves).
_COMPOUNDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light",
    "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter", "suit case",
    "sports ball", "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog",
    "cell phone", "mobile phone", "teddy bear", "hair drier", "potted plant",
    "laptop computer", "home plate", "train track",
)
# "baby X" / "adult X" is the animal X, not a person.
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
            "giraffe", "animal", "cub")
# "passenger X" is the vehicle X, not a person.
_VEHICLES = ("jet", "train")

PAIRS: Mapping[tuple[str, ...], str] = {
    **{tuple(name.split()): name for name in _COMPOUNDS},
    **{(age, animal): animal for age in ("baby", "adult") for animal in _ANIMALS},
    **{("passenger", vehicle): vehicle for vehicle in _VEHICLES},
    ("bow", "tie"): "tie",
    ("toilet", "seat"): "toilet",
    ("wine", "glas"): "wine glass",  # "glass" is singularised to "glas"
}
"""Adjacent (singular) word pairs and the one word each is read as."""


def _merge_pairs(words: list[str]) -> list[str]:
    """Replace known pairs, scanning left to right; a merged pair is not read again."""
    merged: list[str] = []
    index = 0
    while index < len(words):
        pair = tuple(words[index : index + 2])
        if pair in PAIRS:
            merged.append(PAIRS[pair])
            index += 2
        else:
            merged.append(words[index])
            index += 1
    return merged


# --- the rule set ---------------------------------------------------------------------


class CocoOfficialRules:
    """Object mentions of a caption under the CHAIR authors' COCO rules (module docstring).

    Built from ``(surface word as listed, category)`` pairs, e.g.
    :attr:`dpalign.eval.chair.SynonymMap.listed`; a surface word matches only when a
    processed caption word equals it exactly.
    """

    name = "coco-official"

    def __init__(self, listed: Iterable[tuple[str, str]]) -> None:
        """Index the listed surface words by their exact spelling."""
        self._category = dict(listed)

    def words(self, caption: str) -> list[str]:
        """The caption's words after steps 1-4 of the module docstring, in order."""
        words = _merge_pairs([singular(token) for token in tokenize(caption)])
        if "toilet" in words:
            words = [word for word in words if word != "seat"]
        return words

    def __call__(self, caption: str) -> list[str]:
        """The categories ``caption`` mentions, one entry per mention, in caption order."""
        return [self._category[word] for word in self.words(caption) if word in self._category]
