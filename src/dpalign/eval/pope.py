"""POPE: polling-based object probing, a judge-free yes/no hallucination benchmark.

Each POPE question asks whether an object is in an image ("Is there a dog in the
image?"); half the ground-truth labels are "yes", half "no". A model's free-text
answer is reduced to yes/no by :func:`parse_yes_no`, and the predictions are scored
by :func:`pope_metrics` with "yes" as the positive class (DESIGN.md §5).

The question files (``coco_pope_{random,popular,adversarial}.json``) hold one JSON
object per line with keys ``question_id``, ``image``, ``text`` and ``label``;
:func:`read_pope_questions` reads that layout and reports malformed lines precisely.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "PopeFormatError",
    "PopeMetrics",
    "PopeQuestion",
    "parse_yes_no",
    "pope_metrics",
    "read_pope_questions",
]

_SENTENCE_BREAK = re.compile(r"[.!?\n]")
# Words with internal apostrophes stay whole, so "isn't" is one token.
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_NEGATION_WORDS = frozenset({"no", "not"})
_REQUIRED_KEYS = ("question_id", "image", "text", "label")
_LABELS = ("yes", "no")


def parse_yes_no(answer: str) -> bool:
    """Reduce a free-text answer to a POPE prediction: ``True`` for yes, ``False`` for no.

    The rule follows the POPE authors' evaluation script, which keeps the first
    sentence and answers "no" when it contains the word "no" or "not":

    1. Split ``answer`` on ``.``, ``!``, ``?`` and newlines and keep the first sentence
       that is not blank (so a leading newline does not hide the answer).
    2. Lowercase it and split it into word tokens (a curly apostrophe counts as ``'``).
    3. It is a "no" if a token is exactly ``no`` or ``not``, or ends in ``n't``
       ("isn't", "don't", "can't"); otherwise it is a "yes".

    Consequences worth knowing: matching is on whole words, so "nothing", "none",
    "nope", "never" and "cannot" are *not* negations; a first sentence such as
    "Yes, there is no dog" is a "no", exactly as in the authors' script; only the
    first sentence counts, so "Yes. No." is a "yes". An answer with no non-blank
    sentence at all (empty, whitespace, only punctuation) is a "no" (``False``):
    the model did not affirm the object.

    The authors' script checks only the exact words "No", "no" and "not"; lowercasing
    and the "n't" contractions are this implementation's extensions.
    """
    sentence = next((s for s in _SENTENCE_BREAK.split(answer) if s.strip()), None)
    if sentence is None:
        return False
    tokens = _WORD.findall(sentence.lower().replace("\u2019", "'"))
    is_negated = any(tok in _NEGATION_WORDS or tok.endswith("n't") for tok in tokens)
    return not is_negated


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question: the image it is about, its text and its ground-truth label."""

    question_id: int | str
    image: str
    text: str
    label: Literal["yes", "no"]

    @property
    def label_yes(self) -> bool:
        """Whether the ground-truth answer is "yes" (the object is in the image)."""
        return self.label == "yes"


class PopeFormatError(ValueError):
    """A POPE question file does not follow the one-JSON-object-per-line layout.

    The message names the file, the 1-based line number (when one applies) and the
    problem; the same facts are available as ``path``, ``line`` and ``problem``.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}" if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}")


def _question_from_json(text: str) -> PopeQuestion:
    """Parse one line of a question file; raise ``ValueError`` naming the problem."""
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(repr(k) for k in missing)}")
    question_id, image, question, label = (obj[key] for key in _REQUIRED_KEYS)
    if isinstance(question_id, bool) or not isinstance(question_id, int | str):
        raise ValueError(f"question_id must be an integer or a string, got {question_id!r}")
    if not isinstance(image, str) or not isinstance(question, str):
        raise ValueError("image and text must be strings")
    if label not in _LABELS:
        raise ValueError(f"label must be 'yes' or 'no', got {label!r}")
    return PopeQuestion(question_id=question_id, image=image, text=question, label=label)


def read_pope_questions(path: str | os.PathLike[str]) -> list[PopeQuestion]:
    """Read a POPE question file (one JSON object per line; blank lines are skipped).

    Raises:
        PopeFormatError: on malformed JSON, a line that is not an object, a missing
            key, a field of the wrong type, a label other than "yes"/"no", or a file
            holding no questions at all. The message names the file and, for a bad
            line, its 1-based line number.
    """
    questions: list[PopeQuestion] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                questions.append(_question_from_json(line))
            except ValueError as exc:
                raise PopeFormatError(path, line_number, str(exc)) from exc
    if not questions:
        raise PopeFormatError(path, None, "empty file: no questions found")
    return questions


@dataclass(frozen=True)
class PopeMetrics:
    """POPE scores with "yes" as the positive class.

    ``accuracy``, ``precision``, ``recall`` and ``f1`` are the usual binary scores;
    ``yes_ratio`` is the fraction of answers that were "yes" (0.5 for an unbiased
    model on the balanced POPE splits); ``n`` is the number of questions scored.
    """

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """The scores as a plain dict, e.g. for a JSON report."""
        return dataclasses.asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is zero."""
    return numerator / denominator if denominator else 0.0


def pope_metrics(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> PopeMetrics:
    """Score yes/no predictions against ground-truth labels, "yes" being positive.

    A ratio whose denominator is zero is reported as 0.0: precision when nothing was
    predicted "yes", recall when no label is "yes", F1 when precision + recall is 0.

    Raises:
        ValueError: if the sequences are empty or of different lengths.
    """
    if len(predicted_yes) != len(label_yes):
        raise ValueError(
            f"predicted_yes has {len(predicted_yes)} entries but label_yes has {len(label_yes)}"
        )
    if not predicted_yes:
        raise ValueError("cannot score an empty set of POPE answers")
    pairs = [(bool(p), bool(t)) for p, t in zip(predicted_yes, label_yes, strict=True)]
    true_pos = sum(p and t for p, t in pairs)
    false_pos = sum(p and not t for p, t in pairs)
    false_neg = sum(t and not p for p, t in pairs)
    correct = sum(p == t for p, t in pairs)
    n = len(pairs)
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    return PopeMetrics(
        accuracy=correct / n,
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        yes_ratio=(true_pos + false_pos) / n,
        n=n,
    )
