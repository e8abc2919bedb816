"""CHAIR object extraction, synonym maps and metrics, checked against hand-worked numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dpalign.eval.chair import (
    CHAIR_RULES,
    ChairMetrics,
    SynonymMap,
    chair_metrics,
    extract_objects,
    mention_finder,
)
from dpalign.eval.chair_coco import PAIRS, singular, tokenize

# tests/eval/test_chair.py -> parents[2] is the repository root; shared/ sits beside it.
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
SYNONYMS_FILE = SHARED / "reference" / "chair" / "synonyms.txt"


@pytest.fixture
def small_map() -> SynonymMap:
    return SynonymMap.from_mapping(
        {
            "person": ["man", "woman", "child"],
            "dog": ["puppy"],
            "hot dog": [],
            "motorcycle": ["motor bike", "motorbike"],
            "bench": [],
            "couch": ["sofa"],
            "cup": [],
        }
    )


@pytest.fixture
def coco_map() -> SynonymMap:
    if not SYNONYMS_FILE.is_file():
        pytest.skip(f"CHAIR synonyms file not found at {SYNONYMS_FILE.resolve()}")
    return SynonymMap.from_file(SYNONYMS_FILE)


# --- SynonymMap ---------------------------------------------------------------------


def test_from_mapping_categories_and_lookup(small_map: SynonymMap) -> None:
    assert small_map.categories == (
        "person",
        "dog",
        "hot dog",
        "motorcycle",
        "bench",
        "couch",
        "cup",
    )
    assert small_map.lookup("puppy") == "dog"
    assert small_map.lookup("dog") == "dog"  # a category is its own synonym
    assert small_map.lookup("  Motor   BIKE ") == "motorcycle"
    assert small_map.lookup("hot dog") == "hot dog"
    assert small_map.lookup("cat") is None
    assert small_map.max_words == 2
    # 7 category names + man, woman, child, puppy, motor bike, motorbike, sofa
    assert len(small_map) == 14


def test_from_mapping_rejects_a_synonym_in_two_categories() -> None:
    with pytest.raises(ValueError, match="'pup'"):
        SynonymMap.from_mapping({"dog": ["pup"], "seal": ["pup"]})
    with pytest.raises(ValueError, match="'cat'"):
        SynonymMap.from_mapping({"cat": [], "pet": ["Cat"]})


def test_from_file_tolerates_stray_spaces_duplicates_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "synonyms.txt"
    path.write_text(
        "dog, puppy,  pup , puppy\n\nmotorcycle,  motor bike, motorbike,\ncup\n",
        encoding="utf-8",
    )
    synonyms = SynonymMap.from_file(path)
    assert synonyms.categories == ("dog", "motorcycle", "cup")
    assert synonyms.lookup("pup") == "dog"
    assert synonyms.lookup("motor bike") == "motorcycle"
    assert len(synonyms) == 7  # dog, puppy, pup, motorcycle, motor bike, motorbike, cup


def test_real_synonyms_file(coco_map: SynonymMap) -> None:
    assert len(coco_map.categories) == 80
    assert coco_map.categories[0] == "person"
    assert coco_map.categories[-1] == "toothbrush"
    assert "hot dog" in coco_map.categories
    assert coco_map.lookup("motor bike") == "motorcycle"
    assert coco_map.lookup("hot dog") == "hot dog"
    assert coco_map.lookup("cheesecake") == "cake"  # listed after a double space
    assert coco_map.lookup("iPhone") == "cell phone"  # listed capitalised
    assert coco_map.max_words == 3  # "stove top oven"


def test_real_synonyms_extraction(coco_map: SynonymMap) -> None:
    caption = "Two women eat hot dogs beside parked motor bikes and a dog."
    assert extract_objects(caption, coco_map) == ["person", "hot dog", "motorcycle", "dog"]


# --- extract_objects ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man and his puppy.", ["person", "dog"]),
        # Longest match first: "hot dog" is one mention, not "dog".
        ("A hot dog next to a dog.", ["hot dog", "dog"]),
        ("A HOT-DOG!", ["hot dog"]),
        ("He parks the motor bike by the motorbike.", ["motorcycle", "motorcycle"]),
        # Plurals: drop "s", drop "es", "ies" -> "y", "men" -> "man", on multi-word too.
        ("Dogs, benches, puppies, men and women.", ["dog", "bench", "dog", "person", "person"]),
        ("Three hot dogs and two motor bikes.", ["hot dog", "motorcycle"]),
        ("Sofas and cups.", ["couch", "cup"]),
        # Words that only look like category words are not mentions.
        ("A hotel with a dogma and a cupboard.", []),
        ("", []),
        ("A clear blue sky.", []),
    ],
)
def test_extract_objects(small_map: SynonymMap, caption: str, expected: list[str]) -> None:
    assert extract_objects(caption, small_map) == expected


# --- chair_metrics ------------------------------------------------------------------


def test_chair_metrics_hand_worked(small_map: SynonymMap) -> None:
    captions = [
        "A man rides a motor bike past two puppies.",
        "A woman eats hot dogs on a bench.",
        "A puppy and a dog sleep on a sofa.",
        "A blurry photo of the sky.",
        "Men and women sit on benches.",
    ]
    gt_objects = [
        {"person", "motorcycle"},
        {"person", "bench", "dog"},
        {"couch"},
        {"cup"},
        ["person", "bench", "person"],  # repeats are ignored
    ]
    # caption  mentions (category)              hallucinated        gt mentioned / gt
    # 1        person, motorcycle, dog           dog         (1)     2 / 2
    # 2        person, hot dog, bench            hot dog     (1)     2 / 3  (dog unmentioned)
    # 3        dog, dog, couch                   dog, dog    (2)     1 / 1  (each mention counts)
    # 4        (none)                            -           (0)     0 / 1
    # 5        person, person, bench             -           (0)     2 / 2
    # captions with a hallucination: 1, 2, 3 -> CHAIR_s = 3/5 = 0.6
    # mentions 3+3+3+0+3 = 12, hallucinated 1+1+2+0+0 = 4 -> CHAIR_i = 4/12 = 1/3
    # recall = (2+2+1+0+2) / (2+3+1+1+2) = 7/9
    metrics = chair_metrics(captions, gt_objects, small_map)

    assert metrics.n_captions == 5
    assert metrics.n_mentions == 12
    assert metrics.n_hallucinated == 4
    assert metrics.chair_s == pytest.approx(0.6)
    assert metrics.chair_i == pytest.approx(1 / 3)
    assert metrics.recall == pytest.approx(7 / 9)
    assert metrics.to_dict() == {
        "chair_s": pytest.approx(0.6),
        "chair_i": pytest.approx(1 / 3),
        "recall": pytest.approx(7 / 9),
        "n_captions": 5,
        "n_mentions": 12,
        "n_hallucinated": 4,
        "rules": "dpalign",
    }


def test_chair_metrics_zero_denominators(small_map: SynonymMap) -> None:
    # No mentions and no ground-truth objects: CHAIR_s 0/2 = 0, CHAIR_i 0/0 -> 0.0,
    # recall 0/0 -> 0.0.
    metrics = chair_metrics(["Nothing here.", "Just sky."], [set(), ()], small_map)
    assert metrics == ChairMetrics(
        chair_s=0.0, chair_i=0.0, recall=0.0, n_captions=2, n_mentions=0, n_hallucinated=0
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.chair_s = 1.0  # type: ignore[misc]


def test_chair_metrics_normalises_ground_truth_names(small_map: SynonymMap) -> None:
    # "Hot  Dog" normalises to the category "hot dog": 1 mention, 0 hallucinated.
    metrics = chair_metrics(["A hot dog."], [{"Hot  Dog"}], small_map)
    assert (metrics.chair_s, metrics.chair_i, metrics.recall) == (0.0, 0.0, 1.0)


def test_chair_metrics_input_errors(small_map: SynonymMap) -> None:
    with pytest.raises(ValueError, match="2 captions but 1"):
        chair_metrics(["a", "b"], [set()], small_map)
    with pytest.raises(ValueError, match="empty"):
        chair_metrics([], [], small_map)
    with pytest.raises(ValueError, match=r"gt_objects\[0\].*'puppy'"):
        chair_metrics(["A dog."], [{"puppy"}], small_map)  # a synonym, not a category
    with pytest.raises(TypeError, match=r"gt_objects\[0\] is a string"):
        chair_metrics(["A dog."], ["dog"], small_map)


# --- rule sets ------------------------------------------------------------------------


def test_rule_sets_by_name(small_map: SynonymMap) -> None:
    assert set(CHAIR_RULES) == {"dpalign", "coco-official"}
    assert mention_finder(small_map)("A man and his puppy.") == ["person", "dog"]
    with pytest.raises(ValueError, match=r"unknown CHAIR rule set 'coco'.*'coco-official'"):
        mention_finder(small_map, "coco")
    with pytest.raises(ValueError, match="unknown CHAIR rule set"):
        chair_metrics(["A dog."], [{"dog"}], small_map, rules="nope")


def test_listed_keeps_entries_as_the_authors_script_reads_them(coco_map: SynonymMap) -> None:
    # Lines are stripped and split on ", " exactly: an entry after a double space keeps its
    # leading space, and "iPhone" keeps its capital; categories are the first entries.
    assert (" motor bike", "motorcycle") in coco_map.listed
    assert (" cheesecake", "cake") in coco_map.listed
    assert ("iPhone", "cell phone") in coco_map.listed
    assert ("bison", "cow") in coco_map.listed  # the trailing space of its line is stripped
    assert coco_map.listed[0] == ("person", "person")
    # Built from a mapping, the entries are the mapping's own.
    assert SynonymMap.from_mapping({"dog": ["pup"]}).listed == (("dog", "dog"), ("pup", "dog"))


# --- the CHAIR authors' COCO rules ----------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        # NLTK's word_tokenize: punctuation and clitics split off, a sentence's final period
        # split off, hyphenated and slashed words kept whole, "1,000" kept whole.
        ("A dog's bone, and two dogs' toys.", ["a", "dog", "'s", "bone", ",", "and", "two",
                                                 "dogs", "'", "toys", "."]),
        ("A hot-dog (big) by a cat/dog. 1,000 cats!", ["a", "hot-dog", "(", "big", ")", "by",
                                                       "a", "cat/dog", ".", "1,000", "cats",
                                                       "!"]),
        ("It isn't 'baby' food...", ["it", "is", "n't", "'", "baby", "'", "food", "..."]),
        ("A dog’s “bed”", ["a", "dog", "’", "s", "“", "bed", "”"]),
        ("3.5 dogs.", ["3.5", "dogs", "."]),
    ],
)
def test_tokenize_like_nltk(caption: str, tokens: list[str]) -> None:
    assert tokenize(caption) == tokens


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        # Values of pattern.en.singularize (pattern 2.6, which the authors' script calls),
        # quirks included: a final "s" is dropped from singular words too.
        ("dogs", "dog"), ("puppies", "puppy"), ("benches", "bench"), ("women", "woman"),
        ("policemen", "policeman"), ("people", "person"), ("children", "child"),
        ("geese", "goose"), ("mice", "mouse"), ("knives", "knife"), ("calves", "calf"),
        ("oxen", "ox"), ("buses", "bus"), ("glasses", "glass"), ("potatoes", "potato"),
        ("skis", "ski"), ("bus", "bu"), ("glass", "glas"), ("tennis", "tenni"),
        ("ties", "ty"), ("canoes", "cano"), ("collies", "collies"), ("doggies", "doggies"),
        ("scissors", "scissors"), ("sheep", "sheep"), ("dog", "dog"),
    ],
)
def test_singular_like_pattern(word: str, expected: str) -> None:
    assert singular(word) == expected


def test_pairs_table() -> None:
    assert PAIRS[("baby", "elephant")] == "elephant"
    assert PAIRS[("adult", "cub")] == "cub"
    assert PAIRS[("passenger", "jet")] == "jet"
    assert PAIRS[("toilet", "seat")] == "toilet"
    assert PAIRS[("bow", "tie")] == "tie"
    assert PAIRS[("hot", "dog")] == "hot dog"
    assert PAIRS[("train", "track")] == "train track"
    assert PAIRS[("wine", "glas")] == "wine glass"
    assert ("passenger", "plane") not in PAIRS and ("baby", "kitten") not in PAIRS
    assert all(len(words) == 2 for words in PAIRS)  # "stove top oven" never matches


@pytest.mark.parametrize(
    ("caption", "official", "ours"),
    [
        # Hand-worked from the authors' rules (official) and dpalign's (ours).
        ("A baby elephant.", ["elephant"], ["person", "elephant"]),
        ("An adult giraffe and a baby giraffe.", ["giraffe", "giraffe"],
         ["person", "giraffe", "person", "giraffe"]),
        ("A baby in a crib.", ["person"], ["person"]),
        ("A baby kitten.", ["person", "cat"], ["person", "cat"]),  # kitten is no animal word
        ("A passenger jet on the runway.", ["airplane"], ["person", "airplane"]),
        ("A passenger train on the train tracks.", ["train"], ["person", "train", "train"]),
        ("Passengers wait.", ["person"], ["person"]),
        ("A toilet seat.", ["toilet"], ["toilet", "chair"]),
        ("The seat of the toilet is up.", ["toilet"], ["chair", "toilet"]),
        ("Toilets with seats.", ["toilet"], ["toilet", "chair"]),
        ("A chair and a seat.", ["chair", "chair"], ["chair", "chair"]),
        ("Two hot dogs next to a dog.", ["hot dog", "dog"], ["hot dog", "dog"]),
        ("A hot-dog stand.", [], ["hot dog"]),  # one token, no object word
        ("A man with a bow tie.", ["person", "tie"], ["person", "tie"]),
        ("Ties and a tie.", ["tie"], ["tie", "tie"]),  # "ties" -> "ty"
        ("A teddy bear on a bed.", ["teddy bear", "bed"], ["teddy bear", "bed"]),
        ("A wine glass and wine glasses.", ["wine glass", "wine glass"],
         ["wine glass", "wine glass"]),
        ("A glass of water.", [], []),
        ("A red bus and two buses.", ["bus"], ["bus", "bus"]),  # "bus" -> "bu"
        ("A man on a motor bike.", ["person"], ["person", "motorcycle"]),  # " motor bike"
        ("A cheesecake and an iPhone.", [], ["cake", "cell phone"]),
        ("A stove top oven.", ["oven", "oven"], ["oven"]),  # pairs only
        ("Two collies and a puppy.", ["dog"], ["dog", "dog"]),
        ("Women and children with mice.", ["person", "person", "mouse"], ["person", "person"]),
        ("A dog's frisbee.", ["dog", "frisbee"], ["dog", "frisbee"]),
    ],
)
def test_official_mentions(coco_map: SynonymMap, caption: str, official: list[str],
                           ours: list[str]) -> None:
    assert mention_finder(coco_map, "coco-official")(caption) == official
    assert mention_finder(coco_map, "dpalign")(caption) == ours


# Captions and their images' COCO ground truth where the two rule sets disagree.
RULES_CAPTIONS = [
    "A baby elephant walks beside a tree.",
    "A toilet seat is up in a small bathroom.",
    "Two hot dogs on a plate next to a dog.",
    "A passenger train stops on the train tracks.",
    "A man rides a bus down the street.",
    "A cat sleeps on a couch near a laptop.",
]
RULES_TRUTH = [{"elephant"}, {"toilet"}, {"hot dog"}, {"train"}, {"person", "bus"},
               {"cat", "couch"}]


def test_chair_under_both_rule_sets(coco_map: SynonymMap) -> None:
    # caption  official mentions (hallucinated)   dpalign mentions (hallucinated)
    # 1        elephant                            person, elephant      (person)
    # 2        toilet                              toilet, chair         (chair)
    # 3        hot dog, dog          (dog)         hot dog, dog          (dog)
    # 4        train ("train track" is none)       person, train, train  (person)
    # 5        person ("bus" -> "bu", none)        person, bus
    # 6        cat, couch, laptop    (laptop)      cat, couch, laptop    (laptop)
    # official: CHAIR_s = 2/6, CHAIR_i = 2/(1+1+2+1+1+3) = 2/9, recall = 7/8 (bus unnamed)
    # dpalign:  CHAIR_s = 5/6, CHAIR_i = 5/(2+2+2+3+2+3) = 5/14, recall = 8/8
    official = chair_metrics(RULES_CAPTIONS, RULES_TRUTH, coco_map, rules="coco-official")
    assert official == ChairMetrics(chair_s=pytest.approx(2 / 6), chair_i=pytest.approx(2 / 9),
                                    recall=pytest.approx(7 / 8), n_captions=6, n_mentions=9,
                                    n_hallucinated=2, rules="coco-official")
    ours = chair_metrics(RULES_CAPTIONS, RULES_TRUTH, coco_map)
    assert ours == ChairMetrics(chair_s=pytest.approx(5 / 6), chair_i=pytest.approx(5 / 14),
                                recall=1.0, n_captions=6, n_mentions=14, n_hallucinated=5,
                                rules="dpalign")
    assert official.to_dict()["rules"] == "coco-official"
