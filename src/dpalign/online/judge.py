"""Judges for online DPO: score the answers sampled for one prompt, higher is better.

Online DPO samples several answers per prompt from the policy, ranks them with a judge
and trains DPO on the best against the worst (:func:`rank`). On dpalign's synthetic world
the judge is exact, in the spirit of Fact-RLHF's factually grounded reward: every record
carries its scene's ground truth (``metadata.objects`` and the aligned
``metadata.colours``), and :func:`judge_answer` counts the answer's false statements
about that scene -- objects that are not there, wrong colours, present objects denied.

A judge is any callable ``(record, answers) -> scores`` (:class:`Judge`). Judges are
chosen by name from :data:`JUDGES`, or imported from ``"package.module:function"``
(:func:`load_judge`), which is where a trained reward model plugs in.

The world's language (``dpalign.world.text``) that :func:`judge_answer` reads::

    A red fork, a blue cat and a green knife.    caption: every mention asserted
    Yes, there is a green fork.                  existence, affirmed with a colour
    No, there is no fork.                        existence, denied
    The fork is red.                             colour answer
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from dpalign.data.schema import PreferenceRecord
from dpalign.eval.chair import SynonymMap, extract_objects
from dpalign.world.vocab import CATEGORIES, COLOUR_NAMES

__all__ = [
    "JUDGES",
    "Judge",
    "Judgement",
    "WorldJudge",
    "judge_answer",
    "load_judge",
    "rank",
    "scene_of",
    "world_synonyms",
]

RECALL_WEIGHT = 0.5
"""Weight of recall in :attr:`Judgement.score`; below 1, so one error outweighs any recall."""


@dataclass(frozen=True)
class Judgement:
    """What one answer states about one scene, counted per distinct object category.

    - ``hallucinated``: categories not in the scene that the answer asserts (a caption
      mention, "Yes, there is a fork.");
    - ``wrong_colour``: present categories given a colour that is not theirs ("a green
      fork", "The fork is green." when the fork is red);
    - ``denied``: present categories the answer denies ("No, there is no fork.");
    - ``correct``: present categories asserted with no colour or the right colour, and
      never denied or miscoloured elsewhere in the answer;
    - ``n_objects``: the number of objects in the scene.

    An absent category that is denied ("No, there is no cat." with no cat) is true but
    neither an error nor ``correct``: ``correct`` measures coverage of the scene.
    """

    hallucinated: int
    wrong_colour: int
    denied: int
    correct: int
    n_objects: int

    @property
    def errors(self) -> int:
        """False statements about the scene: hallucinated + wrong_colour + denied."""
        return self.hallucinated + self.wrong_colour + self.denied

    @property
    def recall(self) -> float:
        """Share of the scene's objects stated correctly (0.0 for an empty scene)."""
        return self.correct / self.n_objects if self.n_objects else 0.0

    @property
    def score(self) -> float:
        """``-errors + 0.5 * recall``: errors dominate, recall breaks ties.

        Recall lies in [0, 1], so its term is at most 0.5 and an answer with fewer errors
        always scores higher; among answers with equally many errors, the one that states
        more of the scene correctly wins (a full faithful caption over "A red fork.").
        """
        return -self.errors + RECALL_WEIGHT * self.recall

    def to_dict(self) -> dict[str, int | float]:
        """The counts and the derived errors, recall and score, for logging."""
        return {**dataclasses.asdict(self), "errors": self.errors, "recall": self.recall,
                "score": self.score}


# --------------------------------------------------------------------------- parsing

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,;:!?]")
_CLAUSE_PUNCTUATION = frozenset(".,;:!?")
_SENTENCE_PUNCTUATION = frozenset(".;!?")
_CONJUNCTIONS = frozenset({"and", "but", "while", "whereas", "although", "though"})
_NEGATIONS = frozenset({"no", "not", "none", "never", "without", "neither", "nor", "nothing",
                        "cannot"})
_COPULAS = frozenset({"is", "are", "was", "were"})


@cache
def world_synonyms() -> SynonymMap:
    """The world's synonym map, built from its vocabulary (no world folder needed)."""
    return SynonymMap.from_mapping({c.name: c.synonyms for c in CATEGORIES})


@dataclass(frozen=True)
class _Mention:
    """One object mention: its category, whether it is denied and the colours bound to it."""

    category: str
    denied: bool
    colours: tuple[str, ...] = ()


def _is_negation(token: str) -> bool:
    return token in _NEGATIONS or token.endswith("n't")


def _clauses(answer: str) -> Iterator[list[str]]:
    """The answer's tokens, lowercased, split into clauses at punctuation and conjunctions."""
    clause: list[str] = []
    for token in _TOKEN.findall(answer.lower()):
        if token in _CLAUSE_PUNCTUATION or token in _CONJUNCTIONS:
            if clause:
                yield clause
            clause = []
        else:
            clause.append(token)
    if clause:
        yield clause


def _clause_mentions(clause: list[str], colour_words: Collection[str],
                     synonyms: SynonymMap) -> list[_Mention]:
    """The mentions of one clause, with negation and colours resolved.

    The clause is cut into *segments* at its structural words (colours, negations,
    copulas); the object mentions of each segment are found by CHAIR's extractor, so
    synonyms, multi-word names and plurals are read as CHAIR reads them. Then:

    - a negation denies every mention after it in the clause ("there is no fork");
    - a colour word binds to the first mention of the segment right after it ("a red
      fork", "a red table fork");
    - ``COPULA COLOUR`` binds the colour to the last mention before the copula ("the
      fork is red"); a negated colour ("the fork is not red") binds nothing.
    """
    mentions: list[_Mention] = []
    negated = False
    pending_colour: str | None = None  # a colour waiting for the next segment's first mention
    segment: list[str] = []

    def flush() -> None:
        nonlocal pending_colour
        for i, category in enumerate(extract_objects(" ".join(segment), synonyms)):
            colours = (pending_colour,) if i == 0 and pending_colour else ()
            mentions.append(_Mention(category, negated, colours))
        if segment:
            pending_colour = None
        segment.clear()

    for position, token in enumerate(clause):
        previous = clause[position - 1] if position else ""
        if token in colour_words:
            flush()
            if previous in _COPULAS and mentions and not negated:
                last = mentions[-1]
                mentions[-1] = dataclasses.replace(last, colours=(*last.colours, token))
            else:
                pending_colour = token
        elif _is_negation(token):
            flush()
            negated = True
            pending_colour = None
        elif token in _COPULAS:
            flush()
            pending_colour = None
        else:
            segment.append(token)
    flush()
    return mentions


def _elliptical_mentions(answer: str, subject: str,
                         colour_words: Collection[str]) -> list[_Mention]:
    """Read an answer that names no object ("No.", "Red.") as about the question's object.

    A colour word not preceded by a negation in its clause binds to the subject ("Red.",
    "It is red, not blue."); otherwise the first sentence decides, as POPE parses answers:
    a negation word denies the subject, a leading "yes" affirms it, anything else states
    nothing.
    """
    colours = []
    for clause in _clauses(answer):
        negated = False
        for token in clause:
            negated = negated or _is_negation(token)
            if token in colour_words and not negated:
                colours.append(token)
    if colours:
        return [_Mention(subject, denied=False, colours=tuple(colours))]
    first = re.split(r"[.;!?]", answer.lower(), maxsplit=1)[0]
    words = _TOKEN.findall(first)
    if any(_is_negation(word) for word in words):
        return [_Mention(subject, denied=True)]
    if words[:1] == ["yes"]:
        return [_Mention(subject, denied=False)]
    return []


def _mentions(answer: str, question: str | None, colour_words: Collection[str],
              synonyms: SynonymMap) -> list[_Mention]:
    found = [m for clause in _clauses(answer)
             for m in _clause_mentions(clause, colour_words, synonyms)]
    if found or question is None:
        return found
    asked = set(extract_objects(question, synonyms))
    if len(asked) != 1:
        return []
    return _elliptical_mentions(answer, asked.pop(), colour_words)


def _scene(objects: Sequence[str], colours: Sequence[str]) -> Mapping[str, frozenset[str]]:
    """``{category: its colours}`` (a category may appear more than once in a scene)."""
    if isinstance(objects, str) or isinstance(colours, str):
        raise TypeError("objects and colours must be sequences of names, not one string")
    if len(objects) != len(colours):
        raise ValueError(f"{len(objects)} objects but {len(colours)} colours; "
                         "they must be aligned (one colour per object, same order)")
    scene: dict[str, set[str]] = {}
    for category, colour in zip(objects, colours, strict=True):
        scene.setdefault(" ".join(category.lower().split()), set()).add(colour.lower())
    return {category: frozenset(found) for category, found in scene.items()}


def judge_answer(
    answer: str,
    objects: Sequence[str],
    colours: Sequence[str],
    synonyms: SynonymMap | None = None,
    *,
    question: str | None = None,
    colour_words: Collection[str] = COLOUR_NAMES,
) -> Judgement:
    """Count what ``answer`` states correctly and falsely about a scene.

    ``objects`` are the scene's category names and ``colours`` their colours, aligned
    (one colour per object). ``synonyms`` maps surface words to categories (default:
    :func:`world_synonyms`). The answer is read clause by clause (clauses end at
    punctuation and at "and", "but", ...):

    - object mentions are found with CHAIR's extractor (synonyms such as "puppy" for dog,
      multi-word names such as "table fork", plurals such as "forks");
    - a negation ("no", "not", "none", "without", "isn't", ...) denies every mention after
      it in its clause, so "No, there is no fork." denies the fork while the leading "No,"
      (a clause of its own) denies nothing;
    - a colour word binds to the object right after it ("a red fork") or, after "is" /
      "are", to the object before ("The fork is red."); a negated colour binds nothing;
    - every other word is ignored, so text with no object mention counts nothing.

    Counts are per distinct category, not per mention: the judge counts false *facts*
    about the scene, and naming the same object twice ("There is a fork. The fork is
    red.") states one object, so a repeated absent object is one hallucination. A present
    category with both a right and a wrong statement counts as an error, not as correct.

    When the answer names no object and ``question`` names exactly one category, the
    answer is read as about that category: "No." denies it, "Yes." affirms it, "Red."
    gives it a colour (short answers to the world's existence and colour questions).

    Raises:
        ValueError: if ``objects`` and ``colours`` differ in length.
    """
    words = world_synonyms() if synonyms is None else synonyms
    scene = _scene(objects, colours)
    colour_set = frozenset(c.lower() for c in colour_words)
    hallucinated: set[str] = set()
    wrong_colour: set[str] = set()
    denied: set[str] = set()
    affirmed: set[str] = set()
    for mention in _mentions(answer, question, colour_set, words):
        truth = scene.get(mention.category)
        if truth is None:
            if not mention.denied:
                hallucinated.add(mention.category)
        elif mention.denied:
            denied.add(mention.category)
        elif any(colour not in truth for colour in mention.colours):
            wrong_colour.add(mention.category)
        else:
            affirmed.add(mention.category)
    return Judgement(
        hallucinated=len(hallucinated),
        wrong_colour=len(wrong_colour),
        denied=len(denied),
        correct=len(affirmed - wrong_colour - denied),
        n_objects=len(objects),
    )


# --------------------------------------------------------------------------- judges


class Judge(Protocol):
    """Scores the answers sampled for one record's prompt; higher is better."""

    def __call__(self, record: PreferenceRecord, answers: Sequence[str]) -> list[float]: ...


_REBUILD = "the world judge needs the scene's objects and colours (rebuild the world with " \
           "this dpalign)"


def scene_of(record: PreferenceRecord) -> tuple[list[str], list[str]]:
    """The record's ground-truth ``(objects, colours)`` from its metadata.

    Raises:
        ValueError: naming the record, if either list is missing, not a list of strings,
            or the two differ in length.
    """
    extra = record.metadata.model_extra or {}
    found: dict[str, list[str]] = {}
    for key in ("objects", "colours"):
        value = extra.get(key)
        if value is None:
            raise ValueError(f"record {record.id} has no metadata.{key}: {_REBUILD}")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"record {record.id}: metadata.{key} must be a list of names, "
                             f"got {value!r}: {_REBUILD}")
        found[key] = value
    objects, colours = found["objects"], found["colours"]
    if len(objects) != len(colours):
        raise ValueError(f"record {record.id} has {len(objects)} metadata.objects but "
                         f"{len(colours)} metadata.colours; they must be aligned: {_REBUILD}")
    return objects, colours


class WorldJudge:
    """The exact judge of the synthetic world: :func:`judge_answer` against the record's
    scene, with the record's prompt as the question (for bare "Yes." / "No." / "Red.")."""

    def __init__(self, synonyms: SynonymMap | None = None) -> None:
        self.synonyms = world_synonyms() if synonyms is None else synonyms

    def judgements(self, record: PreferenceRecord, answers: Sequence[str]) -> list[Judgement]:
        """One :class:`Judgement` per answer, for logging."""
        objects, colours = scene_of(record)
        return [judge_answer(answer, objects, colours, self.synonyms, question=record.prompt)
                for answer in answers]

    def __call__(self, record: PreferenceRecord, answers: Sequence[str]) -> list[float]:
        """Each answer's :attr:`Judgement.score`."""
        return [j.score for j in self.judgements(record, answers)]

    def __repr__(self) -> str:
        return f"WorldJudge({self.synonyms!r})"


JUDGES: dict[str, Callable[[], Judge]] = {
    "world": WorldJudge,
}
"""Judge factories by name (:func:`load_judge`)."""


def _unknown(spec: str, why: str) -> ValueError:
    return ValueError(f"unknown judge {spec!r} ({why}); give one of {sorted(JUDGES)} or "
                      "'package.module:function' naming a callable (record, answers) -> scores")


def load_judge(spec: str) -> Judge:
    """The judge named ``spec``: a key of :data:`JUDGES`, or ``"package.module:function"``.

    The second form imports the module and returns the named attribute (dots after the
    colon reach nested attributes, ``"pkg.mod:Class.method"``), which must itself be a
    judge: a callable ``(record, answers) -> list[float]``.

    Raises:
        ValueError: if ``spec`` is neither a known name nor an importable callable (the
            message lists the registry's names and the ``module:function`` form).
    """
    if spec in JUDGES:
        return JUDGES[spec]()
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise _unknown(spec, "not a registered name")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as error:
        raise _unknown(spec, f"cannot import {module_name!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _unknown(spec, f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise _unknown(spec, f"{attribute!r} is not callable")
    return target  # type: ignore[return-value]


# --------------------------------------------------------------------------- ranking


def rank(scores: Sequence[float]) -> tuple[int, int] | None:
    """``(best_index, worst_index)`` of one prompt's scores, or None when all tie.

    All-equal scores (or fewer than two) carry no preference, and the caller skips the
    prompt. Ties for best or worst go to the lowest index, so ranking is deterministic.

    Raises:
        ValueError: if a score is NaN.
    """
    if any(math.isnan(s) for s in scores):
        raise ValueError(f"a judge returned NaN among the scores {list(scores)}")
    if len(scores) < 2 or max(scores) == min(scores):
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst
