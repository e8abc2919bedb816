"""The world judge: hand-worked counts and scores, ranking, the registry, and every answer
form the world produces (chosen answers are faithful, rejected ones are not)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from dpalign.data.records import read_preference_jsonl
from dpalign.data.schema import PreferenceRecord
from dpalign.eval.chair import SynonymMap
from dpalign.online.judge import (
    JUDGES,
    Judgement,
    WorldJudge,
    judge_answer,
    load_judge,
    rank,
    scene_of,
    world_synonyms,
)
from dpalign.world.config import WorldConfig
from dpalign.world.load import World
from dpalign.world.splits import PAIR_BUILDERS, preference_split
from dpalign.world.vocab import CATEGORIES, COLOUR_NAMES

# A scene in reading order: a red fork, a blue cat, a green knife.
OBJECTS = ["fork", "cat", "knife"]
COLOURS = ["red", "blue", "green"]
FAITHFUL = "A red fork, a blue cat and a green knife."


def judge(answer: str, question: str | None = None) -> Judgement:
    return judge_answer(answer, OBJECTS, COLOURS, world_synonyms(), question=question)


def counts(answer: str, question: str | None = None) -> tuple[int, int, int, int]:
    """(hallucinated, wrong_colour, denied, correct) of ``answer`` on the scene."""
    j = judge(answer, question)
    return j.hallucinated, j.wrong_colour, j.denied, j.correct


def record(prompt: str = "Describe the image.", **metadata: object) -> PreferenceRecord:
    meta = {"objects": OBJECTS, "colours": COLOURS, **metadata}
    return PreferenceRecord(id="pool-00003", images=["images/x.png"], prompt=prompt,
                            chosen="a", rejected="b", metadata=meta)


# --------------------------------------------------------------------------- Judgement


def test_judgement_derived_values_are_hand_worked() -> None:
    j = Judgement(hallucinated=1, wrong_colour=1, denied=0, correct=2, n_objects=4)
    assert j.errors == 2
    assert j.recall == 0.5
    assert j.score == -2 + 0.5 * 0.5
    assert j.to_dict() == {"hallucinated": 1, "wrong_colour": 1, "denied": 0, "correct": 2,
                           "n_objects": 4, "errors": 2, "recall": 0.5, "score": -1.75}
    assert Judgement(0, 0, 0, 0, 0).recall == 0.0  # an empty scene


def test_one_error_outweighs_any_recall() -> None:
    perfect_but_one_error = Judgement(1, 0, 0, correct=3, n_objects=3)  # -1 + 0.5
    silent = Judgement(0, 0, 0, correct=0, n_objects=3)  # 0
    assert perfect_but_one_error.score == -0.5
    assert silent.score == 0.0
    assert silent.score > perfect_but_one_error.score


# --------------------------------------------------------------------------- captions


def test_faithful_caption_is_all_correct() -> None:
    assert counts(FAITHFUL) == (0, 0, 0, 3)
    assert judge(FAITHFUL).score == 0.5


def test_caption_with_an_extra_absent_object_ranks_below_the_faithful_one() -> None:
    extra = "A red fork, a blue cat, a green knife and a yellow dog."
    assert counts(extra) == (1, 0, 0, 3)
    assert judge(extra).score == -0.5
    assert judge(extra).score < judge(FAITHFUL).score


def test_caption_with_a_wrong_colour() -> None:
    wrong = "A red fork, a purple cat and a green knife."
    assert counts(wrong) == (0, 1, 0, 2)
    assert judge(wrong).score == pytest.approx(-1 + 0.5 * 2 / 3)


def test_synonyms_and_multi_word_names_map_to_categories() -> None:
    # "table fork" is a fork, "kitten" a cat, "blade" a knife: all present, right colours.
    assert counts("A red table fork, a blue kitten and a green blade.") == (0, 0, 0, 3)
    # "a purple puppy" is a dog, which is absent.
    assert counts("A red fork and a purple puppy.") == (1, 0, 0, 1)
    # "a purple kitty" is the cat in the wrong colour.
    assert counts("A purple kitty.") == (0, 1, 0, 0)


def test_plurals() -> None:
    assert counts("Two red forks and two blue kittens.") == (0, 0, 0, 2)
    assert counts("Some yellow puppies.") == (1, 0, 0, 0)
    assert counts("Two green forks.") == (0, 1, 0, 0)


def test_repeated_absent_object_counts_once() -> None:
    assert counts("A yellow dog, a white dog and a hound.") == (1, 0, 0, 0)
    # Two distinct absent objects are two hallucinations.
    assert counts("A yellow dog and a white ball.") == (2, 0, 0, 0)


def test_a_right_and_a_wrong_statement_about_one_object_is_an_error() -> None:
    assert counts("A red fork. The fork is green.") == (0, 1, 0, 0)


def test_mention_without_colour_is_correct_if_present() -> None:
    assert counts("There is a fork and a cat.") == (0, 0, 0, 2)


# --------------------------------------------------------------------------- existence answers


@pytest.mark.parametrize(("answer", "expected"), [
    ("Yes, there is a red fork.", (0, 0, 0, 1)),   # present, affirmed, right colour
    ("Yes, there is a green fork.", (0, 1, 0, 0)),  # present, affirmed, wrong colour
    ("No, there is no fork.", (0, 0, 1, 0)),        # present, denied
    ("Yes, there is a white dog.", (1, 0, 0, 0)),   # absent, affirmed
    ("No, there is no dog.", (0, 0, 0, 0)),         # absent, denied: true, not counted
    ("No, there is no hound.", (0, 0, 0, 0)),       # same through a synonym
    ("There isn't a dog.", (0, 0, 0, 0)),
    ("There is not a fork.", (0, 0, 1, 0)),
])
def test_existence_answers(answer: str, expected: tuple[int, int, int, int]) -> None:
    assert counts(answer) == expected


def test_negation_is_scoped_to_its_clause() -> None:
    # The leading "No," denies nothing; the cat after "but" is asserted.
    assert counts("No, there is no dog, but there is a blue cat.") == (0, 0, 0, 1)
    assert counts("No, there is a yellow dog.") == (1, 0, 0, 0)
    assert counts("A red fork and no knife.") == (0, 0, 1, 1)
    # Negation covers every mention after it in its clause.
    assert counts("There is no dog or ball.") == (0, 0, 0, 0)


def test_bare_yes_no_answers_read_the_question() -> None:
    present, absent = "Is there a fork in the image?", "Is there a puppy in the image?"
    assert counts("Yes.", present) == (0, 0, 0, 1)
    assert counts("No.", present) == (0, 0, 1, 0)
    assert counts("Yes.", absent) == (1, 0, 0, 0)
    assert counts("No.", absent) == (0, 0, 0, 0)
    assert counts("Maybe.", present) == (0, 0, 0, 0)
    # Without the question a bare "Yes." states nothing.
    assert counts("Yes.") == (0, 0, 0, 0)


# --------------------------------------------------------------------------- colour answers


@pytest.mark.parametrize(("answer", "expected"), [
    ("The fork is red.", (0, 0, 0, 1)),
    ("The fork is green.", (0, 1, 0, 0)),
    ("The table fork is red.", (0, 0, 0, 1)),
    ("The kitten is blue.", (0, 0, 0, 1)),
    ("The kitten is white.", (0, 1, 0, 0)),
    ("The puppy is white.", (1, 0, 0, 0)),   # an absent object given any colour
    ("The fork is not green.", (0, 0, 0, 1)),  # a negated colour binds nothing
])
def test_colour_answers(answer: str, expected: tuple[int, int, int, int]) -> None:
    assert counts(answer) == expected


def test_bare_colour_answers_read_the_question() -> None:
    question = "What colour is the fork?"
    assert counts("Red.", question) == (0, 0, 0, 1)
    assert counts("Green.", question) == (0, 1, 0, 0)
    assert counts("It is red, not green.", question) == (0, 0, 0, 1)


# --------------------------------------------------------------------------- garbage


@pytest.mark.parametrize("answer", ["", "   ", "asdf qwer zxcv!!", "red blue green", "?!.,",
                                    "The the the is is.", "No.", "Yes"])
def test_garbage_counts_nothing(answer: str) -> None:
    assert counts(answer) == (0, 0, 0, 0)
    assert judge(answer).score == 0.0


def test_misaligned_scene_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 objects but 2 colours"):
        judge_answer(FAITHFUL, OBJECTS, COLOURS[:2])


# --------------------------------------------------------------------------- ranking


def test_full_ranking_over_four_answers() -> None:
    answers = [
        "A red fork and a blue cat.",                               # 0 errors, recall 2/3
        "A red fork, a blue cat, a green knife and a white dog.",   # 1 error, recall 1
        FAITHFUL,                                                    # 0 errors, recall 1
        "A green fork, a white cat and a yellow dog.",              # 3 errors
    ]
    scores = WorldJudge()(record(), answers)
    assert scores == pytest.approx([1 / 3, -0.5, 0.5, -3.0])
    assert rank(scores) == (2, 3)


def test_rank_ties() -> None:
    assert rank([0.5, 0.5, 0.5]) is None
    assert rank([1.0]) is None
    assert rank([]) is None
    assert rank([0.0, 1.0, 1.0, -1.0, -1.0]) == (1, 3)  # lowest index wins each tie
    with pytest.raises(ValueError, match="NaN"):
        rank([0.0, float("nan")])


def test_world_judge_judgements_and_bare_answers() -> None:
    judgements = WorldJudge().judgements(record("Is there a knife in the image?"),
                                         ["No.", "Yes, there is a green knife."])
    assert [j.errors for j in judgements] == [1, 0]
    assert judgements[1].correct == 1


# --------------------------------------------------------------------------- metadata errors


def test_missing_colours_error_names_the_record() -> None:
    bare = PreferenceRecord(id="pool-00003", images=["x.png"], prompt="p", chosen="a",
                            rejected="b", metadata={"objects": OBJECTS})
    message = ("record pool-00003 has no metadata.colours: the world judge needs the scene's "
               "objects and colours (rebuild the world with this dpalign)")
    with pytest.raises(ValueError) as raised:
        WorldJudge()(bare, ["A red fork."])
    assert str(raised.value) == message


def test_missing_objects_and_misaligned_lists_are_errors() -> None:
    no_meta = PreferenceRecord(id="r1", images=["x.png"], prompt="p", chosen="a", rejected="b")
    with pytest.raises(ValueError, match=re.escape("record r1 has no metadata.objects")):
        scene_of(no_meta)
    with pytest.raises(ValueError, match=re.escape(
            "record pool-00003 has 3 metadata.objects but 2 metadata.colours")):
        scene_of(record(colours=["red", "blue"]))
    with pytest.raises(ValueError, match=re.escape("metadata.colours must be a list")):
        scene_of(record(colours="red"))


# --------------------------------------------------------------------------- registry


def fixed_judge(record: PreferenceRecord, answers: Sequence[str]) -> list[float]:
    return [float(len(a)) for a in answers]


def test_load_judge_by_name() -> None:
    assert set(JUDGES) == {"world"}
    judge_ = load_judge("world")
    assert isinstance(judge_, WorldJudge)
    assert judge_(record(), [FAITHFUL]) == [0.5]


def test_load_judge_from_this_test_module() -> None:
    assert load_judge(f"{__name__}:fixed_judge") is fixed_judge


def test_load_judge_from_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_reward.py").write_text(textwrap.dedent("""
        def length(record, answers):
            return [float(len(a)) for a in answers]

        class Holder:
            @staticmethod
            def first_word(record, answers):
                return [1.0 if a.startswith("A") else 0.0 for a in answers]

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_judge("my_reward:length")(record(), ["ab", "abcd"]) == [2.0, 4.0]
    assert load_judge("my_reward:Holder.first_word")(record(), ["A b", "b"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not callable"):
        load_judge("my_reward:NOT_CALLABLE")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_judge("my_reward:missing")


@pytest.mark.parametrize("spec", ["wrold", "", "no_such_module_xyz:judge", ":judge", "mod:"])
def test_unknown_judge_lists_the_names_and_the_module_form(spec: str) -> None:
    with pytest.raises(ValueError) as raised:
        load_judge(spec)
    message = str(raised.value)
    assert f"unknown judge {spec!r}" in message
    assert "['world']" in message
    assert "'package.module:function'" in message


# --------------------------------------------------------------------------- the world's own pairs


def _check_pairs(records: Sequence[PreferenceRecord]) -> set[str]:
    """Chosen answers have no error and rejected ones at least one; returns the tasks seen."""
    world_judge = WorldJudge()
    for r in records:
        chosen, rejected = world_judge.judgements(r, [r.chosen, r.rejected])
        assert chosen.errors == 0, (r.id, r.chosen, chosen)
        assert rejected.errors >= 1, (r.id, r.rejected, rejected)
        assert rank(world_judge(r, [r.rejected, r.chosen])) == (1, 0), r.id
    return {str((r.metadata.model_extra or {})["task"]) for r in records}


def test_every_pair_of_a_real_small_world(small_world: Path) -> None:
    world = World.load(small_world)
    records = [*read_preference_jsonl(world.pool_file, check_images=False),
               *read_preference_jsonl(world.heldout_file, check_images=False)]
    assert len(records) == 72
    _check_pairs(records)


def test_every_answer_form_of_the_pair_builders() -> None:
    """Many generated pairs (no rendering), synonyms on half the nouns: every builder and
    every surface word is exercised."""
    cfg = WorldConfig(seed=11, synonym_rate=0.5)
    split = preference_split(np.random.default_rng(11), cfg, "pool", 1500)
    records = [PreferenceRecord.model_validate(row) for row in split.rows]
    assert _check_pairs(records) == set(PAIR_BUILDERS)
    answers = " ".join(f"{r.chosen} {r.rejected}" for r in records).lower()
    surface = [w for c in CATEGORIES for w in (c.name, *c.synonyms)]
    assert all(w in answers for w in surface)
    assert all(c in answers for c in COLOUR_NAMES)


def test_custom_synonym_map() -> None:
    words = SynonymMap.from_mapping({"fork": ["prong"], "cat": []})
    j = judge_answer("A red prong and a blue cat.", ["fork", "cat"], ["red", "blue"], words)
    assert (j.correct, j.errors) == (2, 0)
