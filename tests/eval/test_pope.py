"""POPE answer parsing, question-file reading and metrics, checked against hand-worked numbers."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from dpalign.eval.pope import (
    PopeFormatError,
    PopeMetrics,
    PopeQuestion,
    parse_yes_no,
    pope_metrics,
    read_pope_questions,
)

# tests/eval/test_pope.py -> parents[2] is the repository root; shared/ sits beside it.
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
POPE_DIR = SHARED / "reference" / "pope"
SPLITS = ("random", "popular", "adversarial")


# --- parse_yes_no -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", True),
        ("yes, there is a dog in the image.", True),
        ("No", False),
        ("NO.", False),
        ("No, there is not.", False),
        ("Not at all.", False),
        ("There isn't a dog.", False),
        ("I don\u2019t see one.", False),  # curly apostrophe
        ("It can't be seen.", False),
        # Only the first sentence counts.
        ("Yes. No.", True),
        ("Yes!\nNo, wait.", True),
        ("Is it? No.", True),
        ("There is a dog; no cat.", False),
        # A "no" anywhere in the first sentence wins, as in the POPE authors' script.
        ("Yes, there is no dog in the image.", False),
        # Whole words only: these contain "no"/"not" as letters but are other words.
        ("Nothing", True),
        ("Nothing is missing from the picture", True),
        ("Nope", True),
        ("The rope has a knot.", True),
        ("It is notable.", True),
        ("I cannot tell.", True),
        # Blank leading sentences are skipped.
        ("\n\nNo, there is no dog.", False),
        ("  \nYes.", True),
        # Nothing to read: a "no".
        ("", False),
        ("   \n  ", False),
        ("...", False),
    ],
)
def test_parse_yes_no(answer: str, expected: bool) -> None:
    assert parse_yes_no(answer) is expected


def test_ten_answer_case_end_to_end() -> None:
    # answer                                       label  parsed  outcome
    # 1  "Yes, there is a dog in the image."        yes    yes     TP
    # 2  "Yes."                                     yes    yes     TP
    # 3  "There is a cat."                          yes    yes     TP
    # 4  "No, there is no car."                     yes    no      FN
    # 5  "Yes"                                      no     yes     FP
    # 6  "No."                                      no     no      TN
    # 7  "There isn't a bus in the image."          no     no      TN
    # 8  "I do not see a bench."                    no     no      TN
    # 9  "Nothing suggests otherwise; yes."         no     yes     FP  ("nothing" is not "no")
    # 10 "\nNo, the image does not contain a train." no    no      TN
    # TP=3, FP=2, TN=4, FN=1, n=10
    # accuracy  = (TP+TN)/n        = 7/10 = 0.7
    # precision = TP/(TP+FP)       = 3/5  = 0.6
    # recall    = TP/(TP+FN)       = 3/4  = 0.75
    # F1        = 2PR/(P+R)        = 2*0.6*0.75/1.35 = 0.9/1.35 = 2/3
    # yes_ratio = (TP+FP)/n        = 5/10 = 0.5
    answers = [
        "Yes, there is a dog in the image.",
        "Yes.",
        "There is a cat.",
        "No, there is no car.",
        "Yes",
        "No.",
        "There isn't a bus in the image.",
        "I do not see a bench.",
        "Nothing suggests otherwise; yes.",
        "\nNo, the image does not contain a train.",
    ]
    labels = ["yes"] * 4 + ["no"] * 6
    predicted = [parse_yes_no(a) for a in answers]
    assert predicted == [True, True, True, False, True, False, False, False, True, False]

    metrics = pope_metrics(predicted, [label == "yes" for label in labels])

    assert metrics.n == 10
    assert metrics.accuracy == pytest.approx(0.7)
    assert metrics.precision == pytest.approx(0.6)
    assert metrics.recall == pytest.approx(0.75)
    assert metrics.f1 == pytest.approx(2 / 3)
    assert metrics.yes_ratio == pytest.approx(0.5)


# --- pope_metrics -------------------------------------------------------------------


def test_metrics_all_no_predictions_give_zero_precision_recall_f1() -> None:
    # predictions: no, no, no, no; labels: yes, no, no, no
    # TP=0, FP=0, TN=3, FN=1 -> accuracy 3/4; precision 0/0 -> 0.0; recall 0/1 = 0;
    # F1: P+R = 0 -> 0.0; yes_ratio 0/4 = 0.
    metrics = pope_metrics([False] * 4, [True, False, False, False])
    assert metrics.accuracy == pytest.approx(0.75)
    assert (metrics.precision, metrics.recall, metrics.f1, metrics.yes_ratio) == (0, 0, 0, 0)


def test_metrics_without_positive_labels_give_zero_recall() -> None:
    # predictions: yes, no; labels: no, no -> TP=0, FP=1, TN=1, FN=0
    # accuracy 1/2; precision 0/1 = 0; recall 0/0 -> 0.0; F1 0.0; yes_ratio 1/2.
    metrics = pope_metrics([True, False], [False, False])
    assert metrics.accuracy == pytest.approx(0.5)
    assert (metrics.precision, metrics.recall, metrics.f1) == (0, 0, 0)
    assert metrics.yes_ratio == pytest.approx(0.5)


def test_metrics_perfect_predictions() -> None:
    metrics = pope_metrics([True, False, True], [True, False, True])
    assert metrics.to_dict() == {
        "accuracy": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "yes_ratio": pytest.approx(2 / 3),
        "n": 3,
    }


def test_metrics_reject_length_mismatch_and_empty_input() -> None:
    with pytest.raises(ValueError, match="2 entries but label_yes has 3"):
        pope_metrics([True, False], [True, False, True])
    with pytest.raises(ValueError, match="empty"):
        pope_metrics([], [])


def test_metrics_are_frozen() -> None:
    metrics = pope_metrics([True], [True])
    assert isinstance(metrics, PopeMetrics)
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.accuracy = 0.0  # type: ignore[misc]


# --- read_pope_questions on the published files --------------------------------------


@pytest.fixture
def pope_dir() -> Path:
    if not POPE_DIR.is_dir():
        pytest.skip(f"POPE reference files not found at {POPE_DIR.resolve()}")
    return POPE_DIR


@pytest.mark.parametrize("split", SPLITS)
def test_reads_published_split(pope_dir: Path, split: str) -> None:
    questions = read_pope_questions(pope_dir / f"coco_pope_{split}.json")

    assert len(questions) == 3000
    assert Counter(q.label for q in questions) == {"yes": 1500, "no": 1500}
    assert sum(q.label_yes for q in questions) == 1500
    assert [q.question_id for q in questions] == list(range(1, 3001))
    assert len({q.image for q in questions}) == 500  # six questions per image
    assert questions[0] == PopeQuestion(
        question_id=1,
        image="COCO_val2014_000000310196.jpg",
        text="Is there a snowboard in the image?",
        label="yes",
    )


# --- read_pope_questions on small hand-written files ---------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD_LINE = '{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}'


def test_reader_skips_blank_lines_and_ignores_extra_keys(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "ok.json",
        "\n"
        + GOOD_LINE
        + "\n   \n"
        + '{"question_id": "q2", "image": "b.jpg", "text": "Is there a cat?", '
        '"label": "no", "extra": 7}\n',
    )
    questions = read_pope_questions(path)
    assert questions == [
        PopeQuestion(1, "a.jpg", "Is there a dog?", "yes"),
        PopeQuestion("q2", "b.jpg", "Is there a cat?", "no"),
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        questions[0].label = "no"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"question_id": 2, "image": "b.jpg", "text": "Is there', "malformed JSON"),
        ('{"question_id": 2, "image": "b.jpg", "label": "no"}', "missing key(s) 'text'"),
        ('{"question_id": 2, "image": "b.jpg", "text": "?", "label": "maybe"}', "'maybe'"),
        ('{"question_id": 2, "image": "b.jpg", "text": "?", "label": "Yes"}', "'Yes'"),
        ('{"question_id": true, "image": "b.jpg", "text": "?", "label": "no"}', "question_id"),
        ('{"question_id": 2, "image": 5, "text": "?", "label": "no"}', "must be strings"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path: Path, bad_line: str, problem: str) -> None:
    # Line 1 good, line 2 blank (still counted), line 3 bad.
    path = _write(tmp_path, "bad_questions.json", GOOD_LINE + "\n\n" + bad_line + "\n")
    with pytest.raises(PopeFormatError) as info:
        read_pope_questions(path)
    message = str(info.value)
    assert "bad_questions.json" in message
    assert "line 3" in message
    assert problem in message
    assert info.value.line == 3
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_reader_rejects_file_without_questions(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "empty_questions.json", text)
    with pytest.raises(PopeFormatError, match=r"empty_questions\.json.*empty file"):
        read_pope_questions(path)
