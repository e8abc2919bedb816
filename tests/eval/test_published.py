"""Published-format evaluation: POPE files, COCO instances, CHAIR/AMBER scores and the CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.eval.amber import amber_metrics
from dpalign.eval.chair import SynonymMap, mention_finder
from dpalign.eval.coco import (
    CocoFormatError,
    chair_scores,
    load_coco_instances,
    read_coco_captions,
    read_coco_instances,
)
from dpalign.eval.pope import PopeFormatError, parse_yes_no, pope_metrics
from dpalign.eval.published import (
    PACKAGED_SYNONYMS,
    PublishedInputError,
    chair_from_coco,
    default_synonyms_file,
    load_caption_task,
    load_pope_task,
    plan_published,
    plan_warnings,
    pope_from_file,
)
from dpalign.models.load import load_model
from dpalign.world.load import World

# tests/eval/test_published.py -> parents[2] is the repository root; shared/ sits beside it.
REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference"
ADVERSARIAL = REFERENCE / "pope" / "coco_pope_adversarial.json"
COCO_SYNONYMS = REFERENCE / "chair" / "synonyms.txt"
runner = CliRunner()


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"reference file not found at {path.resolve()}")
    return path


def _png(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / name)
    return folder / name


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- POPE files ---------------------------------------------------------------------------


def test_real_adversarial_file_is_read_and_limited_by_image(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in _need(ADVERSARIAL).read_text().splitlines() if line]
    first_image = rows[0]["image"]
    _png(tmp_path, first_image)

    task = load_pope_task(ADVERSARIAL, tmp_path, limit=1)
    expected = [r for r in rows if r["image"] == first_image]
    assert [q.question_id for q in task.questions] == [r["question_id"] for r in expected]
    assert [q.label for q in task.questions] == [r["label"] for r in expected]
    assert task.label == "coco_pope_adversarial"

    # Without a limit every one of the 3000 questions needs its COCO image: the error names
    # the file, the first line lacking one and its path, before anything is generated.
    with pytest.raises(PublishedInputError) as info:
        load_pope_task(ADVERSARIAL, tmp_path)
    missing = [i for i, r in enumerate(rows, start=1) if r["image"] != first_image]
    message = str(info.value)
    assert len(rows) == 3000
    assert str(ADVERSARIAL) in message
    assert f"line {missing[0]} (question_id {rows[missing[0] - 1]['question_id']})" in message
    assert str(tmp_path / rows[missing[0] - 1]["image"]) in message
    assert f"and {len(missing) - 1} more" in message


def test_real_adversarial_labels_are_balanced(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in _need(ADVERSARIAL).read_text().splitlines() if line]
    for image in {r["image"] for r in rows}:
        _png(tmp_path, image)
    task = load_pope_task(ADVERSARIAL, tmp_path)
    assert len(task.questions) == len(rows) == 3000
    assert Counter(q.label for q in task.questions) == Counter(r["label"] for r in rows)
    assert Counter(q.label for q in task.questions) == {"yes": 1500, "no": 1500}


def test_pope_file_missing_image_names_file_line_and_id(tmp_path: Path) -> None:
    _png(tmp_path / "img", "a.png")
    q = {"question_id": "q1", "image": "a.png", "text": "Is there a dog in the image?",
         "label": "yes"}
    file = _jsonl(tmp_path / "pope.json", [json.dumps(q), "",
                                           json.dumps({**q, "question_id": "q2"}),
                                           json.dumps({**q, "question_id": "q3",
                                                       "image": "gone.png"})])
    with pytest.raises(PublishedInputError) as info:
        load_pope_task(file, tmp_path / "img")
    assert str(info.value) == (f"{file}, line 4 (question_id q3): image not found: "
                               f"{tmp_path / 'img' / 'gone.png'}")
    assert len(load_pope_task(file, tmp_path / "img", limit=1).questions) == 2

    bad = _jsonl(tmp_path / "bad.json", [json.dumps(q), json.dumps({"question_id": 2})])
    with pytest.raises(PopeFormatError, match=r"bad\.json, line 2: missing key"):
        load_pope_task(bad, tmp_path / "img")
    with pytest.raises(PublishedInputError, match="image folder not found"):
        load_pope_task(file, tmp_path / "nowhere")


# --- COCO instances -----------------------------------------------------------------------


def _coco(images: list[tuple[int, str]], categories: list[tuple[int, str]],
          annotations: list[tuple[int, int]]) -> dict[str, Any]:
    return {"info": {"year": 2014},
            "images": [{"id": i, "file_name": f, "width": 8, "height": 8} for i, f in images],
            "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in categories],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1]}
                            for k, (i, c) in enumerate(annotations)]}


GOOD_COCO = _coco([(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")],
                  [(18, "dog"), (1, "person"), (62, "chair")],
                  [(1, 18), (1, 18), (2, 1), (2, 62), (1, 1)])


def test_read_coco_instances(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(GOOD_COCO))
    assert read_coco_instances(path) == {"a.jpg": {"dog", "person"},
                                         "b.jpg": {"person", "chair"}, "c.jpg": set()}


def _broken(key: str, index: int | None, change: dict[str, Any] | None) -> dict[str, Any]:
    """GOOD_COCO with ``change`` merged into ``doc[key][index]`` (or ``key`` removed)."""
    doc = json.loads(json.dumps(GOOD_COCO))
    if index is None:
        del doc[key]
    else:
        doc[key][index] = {k: v for k, v in {**doc[key][index], **change}.items()
                           if v is not None}
    return doc


@pytest.mark.parametrize(("doc", "expected"), [
    (_broken("categories", None, None), "missing top-level key 'categories'"),
    (_broken("annotations", 2, {"image_id": 99}),
     "annotations[2]: image_id 99 is not an id in images"),
    (_broken("annotations", 4, {"category_id": 7}),
     "annotations[4]: category_id 7 is not an id in categories"),
    (_broken("annotations", 1, {"category_id": None}), "annotations[1]: missing key 'category_id'"),
    (_broken("images", 1, {"file_name": None}), "images[1]: missing key 'file_name'"),
    (_broken("images", 2, {"id": 1}), "images[2]: id 1 repeats images[0]"),
    (_broken("images", 2, {"file_name": "a.jpg"}),
     "images[2]: file_name 'a.jpg' repeats images[0]"),
    (_broken("categories", 0, {"name": 5}), "categories[0]: name has the wrong type: 5"),
], ids=["no-categories", "unknown-image", "unknown-category", "no-category-id", "no-file-name",
        "repeated-id", "repeated-file", "bad-name"])
def test_coco_errors_name_file_and_entry(tmp_path: Path, doc: dict[str, Any],
                                         expected: str) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CocoFormatError) as info:
        read_coco_instances(path)
    assert str(info.value) == f"{path}: {expected}"


def test_coco_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    path.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match=r"instances\.json: malformed JSON"):
        read_coco_instances(path)


def test_caption_task_checks_images_and_categories(tmp_path: Path) -> None:
    synonyms = SynonymMap.from_file(_need(COCO_SYNONYMS))
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(GOOD_COCO))
    for name in ("a.jpg", "b.jpg"):
        _png(tmp_path / "img", name)
    with pytest.raises(PublishedInputError) as info:
        load_caption_task(path, tmp_path / "img", synonyms)
    assert str(info.value) == f"{path}, image 'c.jpg': image not found: {tmp_path / 'img/c.jpg'}"
    task = load_caption_task(path, tmp_path / "img", synonyms, limit=2)
    assert dict(task.truth) == {"a.jpg": {"dog", "person"}, "b.jpg": {"person", "chair"}}

    path.write_text(json.dumps(_broken("categories", 2, {"name": "unicorn"})))
    with pytest.raises(PublishedInputError, match=r"instances\.json: categories \['unicorn'\]"):
        load_caption_task(path, tmp_path / "img", synonyms, limit=2)


# --- CHAIR and AMBER on hand-written captions ---------------------------------------------

CAPTIONS = {
    "a.jpg": "Two dogs and a puppy play with a cat.",  # dog, dog, cat: cat hallucinated
    "b.jpg": "A man sits on a sofa next to a table with a dog.",  # person couch table dog
    "c.jpg": "An empty street.",  # no object
}
TRUTH = {"a.jpg": {"dog"}, "b.jpg": {"person", "couch", "dining table", "cup"},
         "c.jpg": {"car"}, "unused.jpg": {"bus"}}
PRONE = {"a.jpg": {"cat", "bird"}, "b.jpg": {"cup", "chair"}, "c.jpg": {"truck"}}


def test_chair_scores_by_hand() -> None:
    scores = chair_scores(CAPTIONS, TRUTH, SynonymMap.from_file(_need(COCO_SYNONYMS)), PRONE)
    # 7 mentions (dog dog cat | person couch "dining table" dog | -), 2 hallucinated (cat;
    # dog in b), in 2 of 3 captions; 4 of 6 ground-truth objects named (dog | person couch
    # table; cup missing | car missing).
    assert scores["n_captions"] == 3 and scores["n_mentions"] == 7
    assert scores["n_hallucinated"] == 2
    assert scores["chair_i"] == pytest.approx(2 / 7)
    assert scores["chair_s"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(4 / 6)
    amber = scores["amber"]
    assert amber["chair"] == pytest.approx(2 / 7)
    assert amber["hal"] == pytest.approx(2 / 3)
    assert amber["cover"] == pytest.approx(4 / 6)
    assert amber["cover_per_image"] == pytest.approx((1 + 3 / 4 + 0) / 3)
    # Prone objects not in the image: {cat, bird} | {chair} (cup is there) | {truck}: cat is
    # named, so Cog = 1/4; of the 2 hallucinated mentions, cat is prone, dog (in b) is not.
    assert amber["cog"] == pytest.approx(1 / 4)
    assert amber["cog_of_hallucinated"] == pytest.approx(1 / 2)
    assert "cog" not in chair_scores(CAPTIONS, TRUTH, SynonymMap.from_file(COCO_SYNONYMS))["amber"]


# COCO ground truth for captions the two CHAIR rule sets read differently.
RULE_CAPTIONS = {
    "1.jpg": "A baby elephant stands next to an adult elephant.",
    "2.jpg": "A toilet seat is up next to a sink.",
    "3.jpg": "A passenger train on the train tracks near a dog.",
    "4.jpg": "Two hot dogs and a cup on a table.",
}
RULE_TRUTH = {"1.jpg": {"elephant"}, "2.jpg": {"toilet", "sink"}, "3.jpg": {"train"},
              "4.jpg": {"hot dog", "dining table"}}


def test_chair_scores_official_rules_by_default() -> None:
    synonyms = SynonymMap.from_file(_need(COCO_SYNONYMS))
    # image  official mentions (hallucinated)        dpalign mentions (hallucinated)
    # 1      elephant, elephant                       person, elephant, person, elephant (2)
    # 2      toilet, sink ("toilet seat": a toilet)   toilet, chair, sink (chair)
    # 3      train, dog (dog; "train track": none)    person, train, train, dog (person, dog)
    # 4      hot dog, cup, dining table (cup)         hot dog, cup, dining table (cup)
    # official: CHAIR_s = 2/4, CHAIR_i = 2/(2+2+2+3) = 2/9; every GT object named: recall 6/6
    # dpalign:  CHAIR_s = 4/4, CHAIR_i = (2+1+2+1)/(4+3+4+3) = 6/14
    official = chair_scores(RULE_CAPTIONS, RULE_TRUTH, synonyms)
    assert official["rules"] == "coco-official"
    assert (official["n_mentions"], official["n_hallucinated"]) == (9, 2)
    assert official["chair_s"] == pytest.approx(2 / 4)
    assert official["chair_i"] == pytest.approx(2 / 9)
    assert official["recall"] == 1.0
    assert official["amber"]["chair"] == pytest.approx(2 / 9)  # AMBER reads the same mentions
    ours = chair_scores(RULE_CAPTIONS, RULE_TRUTH, synonyms, rules="dpalign")
    assert ours["rules"] == "dpalign"
    assert (ours["n_mentions"], ours["n_hallucinated"]) == (14, 6)
    assert ours["chair_s"] == 1.0
    assert ours["chair_i"] == pytest.approx(6 / 14)
    assert ours["amber"]["chair"] == pytest.approx(6 / 14)


def test_chair_scores_errors_name_the_image() -> None:
    synonyms = SynonymMap.from_mapping({"dog": ["puppy"], "cat": []})
    with pytest.raises(ValueError, match=r"without a ground truth: \['z.jpg'\]"):
        chair_scores({"z.jpg": "a dog"}, {"a.jpg": {"dog"}}, synonyms)
    with pytest.raises(ValueError, match=r"ground truth of 'a.jpg': \['unicorn'\] not in"):
        chair_scores({"a.jpg": "a dog"}, {"a.jpg": {"dog", "unicorn"}}, synonyms)
    # A synonym in the ground truth counts as its category.
    scores = chair_scores({"a.jpg": "two dogs"}, {"a.jpg": {"puppy"}}, synonyms)
    assert scores["chair_i"] == 0.0 and scores["recall"] == 1.0


def test_amber_metrics_repeats_and_edge_cases() -> None:
    metrics = amber_metrics([["dog", "dog", "cat", "cat"], []], [{"dog", "bed"}, set()])
    assert metrics.n_mentions == 4 and metrics.n_hallucinated == 2
    assert metrics.chair == 0.5
    assert metrics.cover == 0.5  # dog of {dog, bed}; the empty truth adds nothing
    assert metrics.cover_per_image == 0.5  # images without ground truth are not averaged
    assert metrics.hal == 0.5
    assert metrics.cog is None and metrics.cog_of_hallucinated is None
    assert amber_metrics([[]], [set()], [set()]).to_dict() == {
        "chair": 0.0, "cover": 0.0, "cover_per_image": 0.0, "hal": 0.0, "cog": 0.0,
        "cog_of_hallucinated": 0.0, "n_captions": 1, "n_mentions": 0, "n_hallucinated": 0}
    with pytest.raises(ValueError, match="differ in length"):
        amber_metrics([["dog"]], [{"dog"}, set()])
    with pytest.raises(TypeError, match=r"truths\[0\] is a string"):
        amber_metrics([["dog"]], ["dog"])
    with pytest.raises(ValueError, match="empty"):
        amber_metrics([], [])


def test_default_synonyms_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "syn.txt"
    own.write_text("dog, puppy\n")
    monkeypatch.setenv("DPALIGN_CHAIR_SYNONYMS", str(own))
    assert default_synonyms_file() == own
    monkeypatch.setenv("DPALIGN_CHAIR_SYNONYMS", str(tmp_path / "none.txt"))
    with pytest.raises(PublishedInputError, match="pass --synonyms FILE"):
        default_synonyms_file()
    monkeypatch.delenv("DPALIGN_CHAIR_SYNONYMS")
    packaged = default_synonyms_file()  # shipped in the package: no checkout needed
    assert packaged == PACKAGED_SYNONYMS
    assert (packaged.parent / "LICENSE-coco-synonyms.txt").read_text().count("BSD 2-Clause") == 2
    if COCO_SYNONYMS.is_file():  # the shared reference copy: byte for byte the same list
        assert packaged.read_bytes() == COCO_SYNONYMS.read_bytes()
    assert len(SynonymMap.from_file(packaged).categories) == 80


def test_plan_needs_images_and_distinct_names(tmp_path: Path) -> None:
    assert plan_published(None) is None
    with pytest.raises(PublishedInputError, match="need --images DIR"):
        plan_published(None, [tmp_path / "pope.json"])
    _png(tmp_path / "img", "a.png")
    q = {"question_id": 1, "image": "a.png", "text": "Is there a dog?", "label": "no"}
    (tmp_path / "x").mkdir()
    files = [_jsonl(tmp_path / "pope.json", [json.dumps(q)]),
             _jsonl(tmp_path / "x" / "pope.json", [json.dumps(q)])]
    with pytest.raises(PublishedInputError, match=r"repeated: \['pope'\]"):
        plan_published(tmp_path / "img", files)


def test_plan_chooses_the_chair_rules(tmp_path: Path) -> None:
    _png(tmp_path / "img", "a.png")
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_coco([(1, "a.png")], [(18, "dog")], [(1, 18)])))
    synonyms = _need(COCO_SYNONYMS)
    plan = plan_published(tmp_path / "img", coco_instances=instances, synonyms_file=synonyms)
    assert plan is not None and plan.captions is not None
    assert plan.captions.rules == "coco-official"
    plan = plan_published(tmp_path / "img", coco_instances=instances, synonyms_file=synonyms,
                          chair_rules="dpalign")
    assert plan is not None and plan.captions is not None and plan.captions.rules == "dpalign"
    with pytest.raises(PublishedInputError, match="unknown CHAIR rule set 'official'"):
        plan_published(tmp_path / "img", coco_instances=instances, synonyms_file=synonyms,
                       chair_rules="official")


# --- COCO reference captions join the ground truth ----------------------------------------

# Instances: a.jpg has a person, b.jpg a cat, c.jpg nothing annotated.
REF_INSTANCES = _coco([(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")],
                      [(1, "person"), (17, "cat")], [(1, 1), (2, 17)])
REF_CAPTIONS = {"info": {}, "images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [
    {"id": 10, "image_id": 1, "caption": "A man and his dog on a couch."},
    {"id": 11, "image_id": 2, "caption": "A baby bird next to a cat."},
    {"id": 12, "image_id": 1, "caption": "A puppy beside a person"},
    {"id": 13, "image_id": 2, "caption": "Two cats sleep on a bed."},
    {"id": 14, "image_id": 99, "caption": "A giraffe."},  # not an evaluated image: ignored
]}
GENERATED = {"a.jpg": "A man with a dog on a sofa.",  # person, dog, couch
             "b.jpg": "A person and a cat on a bed.",  # person, cat, bed
             "c.jpg": "A dog in a park."}  # dog
# Reference objects (coco-official): a: person, dog ("puppy"), couch; b: bird ("baby bird"
# is a bird, not a person), cat, bed; c: no reference caption.
#                  instances only              instances + reference captions
# image  mentions  truth     hallucinated      truth                  hallucinated
# a      3         person    dog, couch        person, dog, couch     -
# b      3         cat       person, bed       cat, bird, bed         person
# c      1         -         dog               -                      dog
# instances only:  CHAIR_s = 3/3, CHAIR_i = (2+2+1)/7 = 5/7, recall = (1+1)/(1+1) = 1
# + captions:      CHAIR_s = 2/3, CHAIR_i = (0+1+1)/7 = 2/7, recall = (3+2)/(3+3) = 5/6
# Under the dpalign rules "baby" alone is a person, so b's references also hold a person:
# + captions (dpalign rules): CHAIR_s = 1/3, CHAIR_i = 1/7.


@pytest.fixture
def reference_files(tmp_path: Path) -> dict[str, Path]:
    """REF_INSTANCES and REF_CAPTIONS written out, with the three images."""
    for name in GENERATED:
        _png(tmp_path / "img", name)
    instances, captions = tmp_path / "instances.json", tmp_path / "captions.json"
    instances.write_text(json.dumps(REF_INSTANCES))
    captions.write_text(json.dumps(REF_CAPTIONS))
    return {"instances": instances, "captions": captions, "images": tmp_path / "img"}


def test_read_coco_captions_and_instance_ids(reference_files: dict[str, Path]) -> None:
    assert read_coco_captions(reference_files["captions"]) == {
        1: ["A man and his dog on a couch.", "A puppy beside a person"],
        2: ["A baby bird next to a cat.", "Two cats sleep on a bed."], 99: ["A giraffe."]}
    instances = load_coco_instances(reference_files["instances"])
    assert instances.file_names == {1: "a.jpg", 2: "b.jpg", 3: "c.jpg"}
    assert instances.objects == read_coco_instances(reference_files["instances"])


def test_reference_captions_turn_hallucinations_into_mentions(
        reference_files: dict[str, Path]) -> None:
    synonyms = SynonymMap.from_file(_need(COCO_SYNONYMS))
    files = reference_files
    alone = load_caption_task(files["instances"], files["images"], synonyms)
    assert alone.ground_truth == "instances" and alone.without_references == []
    scores = chair_scores(GENERATED, alone.truth, synonyms, rules=alone.rules)
    assert (scores["n_mentions"], scores["n_hallucinated"]) == (7, 5)
    assert scores["chair_s"] == 1.0
    assert scores["chair_i"] == pytest.approx(5 / 7)
    assert scores["recall"] == 1.0

    task = load_caption_task(files["instances"], files["images"], synonyms,
                             captions_file=files["captions"])
    assert task.ground_truth == "instances+captions"
    assert dict(task.from_captions) == {"a.jpg": {"person", "dog", "couch"},
                                        "b.jpg": {"bird", "cat", "bed"}, "c.jpg": set()}
    assert dict(task.truth) == {"a.jpg": {"person", "dog", "couch"},
                                "b.jpg": {"cat", "bird", "bed"}, "c.jpg": set()}
    assert dict(task.n_references) == {"a.jpg": 2, "b.jpg": 2, "c.jpg": 0}
    assert task.without_references == ["c.jpg"]
    scores = chair_scores(GENERATED, task.truth, synonyms, rules=task.rules)
    assert (scores["n_mentions"], scores["n_hallucinated"]) == (7, 2)
    assert scores["chair_s"] == pytest.approx(2 / 3)
    assert scores["chair_i"] == pytest.approx(2 / 7)
    assert scores["recall"] == pytest.approx(5 / 6)

    # The reference captions are read with the selected rules, as generated ones are.
    ours = load_caption_task(files["instances"], files["images"], synonyms, rules="dpalign",
                             captions_file=files["captions"])
    assert ours.from_captions["b.jpg"] == {"person", "bird", "cat", "bed"}
    scores = chair_scores(GENERATED, ours.truth, synonyms, rules="dpalign")
    assert (scores["n_mentions"], scores["n_hallucinated"]) == (7, 1)
    assert scores["chair_s"] == pytest.approx(1 / 3)
    assert scores["chair_i"] == pytest.approx(1 / 7)

    # --limit keeps the first images by name; only their references are read.
    limited = load_caption_task(files["instances"], files["images"], synonyms, limit=1,
                                captions_file=files["captions"])
    assert dict(limited.truth) == {"a.jpg": {"person", "dog", "couch"}}


def test_plan_warnings(reference_files: dict[str, Path]) -> None:
    files, synonyms = reference_files, _need(COCO_SYNONYMS)
    assert plan_warnings(None) == []
    plan = plan_published(files["images"], coco_instances=files["instances"],
                          synonyms_file=synonyms)
    [warning] = plan_warnings(plan)
    assert "not directly comparable with published CHAIR numbers" in warning
    assert plan_warnings(plan_published(files["images"], coco_instances=files["instances"],
                                        synonyms_file=synonyms, chair_rules="dpalign")) == []
    plan = plan_published(files["images"], coco_instances=files["instances"],
                          synonyms_file=synonyms, coco_captions=files["captions"])
    assert plan_warnings(plan) == [
        f"1 of 3 images have no reference caption in {files['captions']} (e.g. 'c.jpg'); is "
        "it the captions file of the instances file's split?"]
    assert plan_warnings(plan_published(files["images"], coco_instances=files["instances"],
                                        synonyms_file=synonyms, coco_captions=files["captions"],
                                        limit=2)) == []
    with pytest.raises(PublishedInputError, match="--coco-captions needs --coco-instances"):
        plan_published(files["images"], coco_captions=files["captions"])


def _captions_doc(change: Any) -> Any:
    """REF_CAPTIONS changed by ``change(doc)`` (which may return a replacement)."""
    doc = json.loads(json.dumps(REF_CAPTIONS))
    return change(doc) or doc


@pytest.mark.parametrize(("doc", "expected"), [
    (_captions_doc(lambda d: d.pop("annotations") and None),
     "missing top-level key 'annotations'"),
    (_captions_doc(lambda d: d["annotations"][1].pop("caption") and None),
     "annotations[1]: missing key 'caption'"),
    (_captions_doc(lambda d: d["annotations"][3].pop("image_id") and None),
     "annotations[3]: missing key 'image_id'"),
    (_captions_doc(lambda d: d["annotations"][2].update(caption=["a dog"])),
     "annotations[2]: caption has the wrong type: ['a dog']"),
    (_captions_doc(lambda d: d["annotations"][0].update(image_id=True)),
     "annotations[0]: image_id has the wrong type: True"),
    (_captions_doc(lambda d: d["annotations"].__setitem__(4, "A giraffe.")),
     "annotations[4]: expected an object, got str"),
    (_captions_doc(lambda d: {**d, "annotations": {"1": "a dog"}}),
     "annotations: expected a list, got dict"),
    (_captions_doc(lambda d: d["annotations"]), "expected a JSON object, got list"),
], ids=["no-annotations", "no-caption", "no-image-id", "caption-list", "image-id-bool",
        "entry-string", "annotations-dict", "results-list"])
def test_cli_bad_captions_file_names_file_and_entry(reference_files: dict[str, Path], doc: Any,
                                                    expected: str, tmp_path: Path) -> None:
    files, bad = reference_files, tmp_path / "captions_bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(CocoFormatError) as info:
        read_coco_captions(bad)
    assert str(info.value) == f"{bad}: {expected}"
    # The file is checked with the other inputs, before the (missing) model is looked at.
    result = runner.invoke(app, [
        "eval", "--model", str(tmp_path / "no-model"), "--coco-instances", str(files["instances"]),
        "--coco-captions", str(bad), "--images", str(files["images"]),
        "--synonyms", str(_need(COCO_SYNONYMS))])
    assert result.exit_code == 1
    assert f"error: {bad}: {expected}" in result.output


def test_cli_malformed_captions_json_and_captions_without_instances(
        reference_files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "captions_bad.json"
    bad.write_text('{"annotations": [')
    args = ["eval", "--model", str(tmp_path / "m"), "--images", str(reference_files["images"]),
            "--synonyms", str(_need(COCO_SYNONYMS)), "--coco-captions", str(bad)]
    result = runner.invoke(app, [*args, "--coco-instances", str(reference_files["instances"])])
    assert result.exit_code == 1 and f"{bad}: malformed JSON" in result.output
    pope = _jsonl(tmp_path / "p.json", [json.dumps({"question_id": 1, "image": "a.jpg",
                                                    "text": "Is there a cat?", "label": "no"})])
    result = runner.invoke(app, [*args, "--pope-file", str(pope)])
    assert result.exit_code == 1
    assert "--coco-captions needs --coco-instances FILE" in result.output


def test_cli_eval_with_reference_captions(reference_files: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI with a stand-in model that writes GENERATED: the scores worked out above."""
    monkeypatch.setattr("dpalign.models.load.load_model",
                        lambda *args, **kwargs: SimpleNamespace(model=None, processor=None))
    monkeypatch.setattr("dpalign.eval.published.generate",
                        lambda model, processor, images, prompts, **kwargs:
                        [GENERATED[Path(image).name] for image in images])
    files, out = reference_files, tmp_path / "eval.json"
    args = ["eval", "--model", str(tmp_path / "m"), "--coco-instances", str(files["instances"]),
            "--images", str(files["images"]), "--synonyms", str(_need(COCO_SYNONYMS)),
            "--device", "cpu", "--out", str(out), "--json"]

    result = runner.invoke(app, [*args, "--coco-captions", str(files["captions"])])
    assert result.exit_code == 0, result.output
    chair = json.loads(out.read_text())["published"]["chair"]
    assert chair["ground_truth"] == "instances+captions" and chair["rules"] == "coco-official"
    assert chair["chair_s"] == pytest.approx(2 / 3)
    assert chair["chair_i"] == pytest.approx(2 / 7)
    assert chair["recall"] == pytest.approx(5 / 6)
    assert chair["reference_captions"] == {"file": str(files["captions"]), "captions": 4,
                                           "images_without": 1}
    assert {c["image"]: c["from_captions"] for c in chair["captions"]} == {
        "a.jpg": ["couch", "dog", "person"], "b.jpg": ["bed", "bird", "cat"], "c.jpg": []}
    assert {c["image"]: c["objects"] for c in chair["captions"]} == {
        "a.jpg": ["couch", "dog", "person"], "b.jpg": ["bed", "bird", "cat"], "c.jpg": []}
    assert "ground truth: instances+captions" in result.output
    assert "1 of 3 images have no reference caption" in result.output
    assert "not directly comparable" not in result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["published"]["chair"]["ground_truth"] == "instances+captions"

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    chair = json.loads(out.read_text())["published"]["chair"]
    assert chair["ground_truth"] == "instances" and "reference_captions" not in chair
    assert "from_captions" not in chair["captions"][0]
    assert chair["chair_s"] == 1.0
    assert chair["chair_i"] == pytest.approx(5 / 7)
    assert "warning: CHAIR ground truth is the --coco-instances annotations only" in result.output
    assert "not directly comparable with published CHAIR numbers" in result.output


# --- end to end through the CLI -----------------------------------------------------------


@pytest.fixture
def published_files(small_world: Path, tmp_path: Path) -> dict[str, Path]:
    """4 POPE questions on 2 world images and a COCO instances file over 3 caption images,
    all images copied into one folder, plus the world's synonym list."""
    world = World.load(small_world)
    images = tmp_path / "images"
    images.mkdir()
    questions = [json.loads(line) for line in world.pope_file("random").read_text().splitlines()]
    chosen = [q for q in questions if q["image"] in {questions[0]["image"], questions[-1]["image"]}]
    chosen = chosen[:2] + chosen[-2:]
    for q in chosen:
        shutil.copy(world.pope_images / q["image"], images / q["image"])
    pope = _jsonl(tmp_path / "my_pope.json", [json.dumps(q) for q in chosen])

    rows = [json.loads(line) for line in world.captions_file.read_text().splitlines()][:3]
    names = sorted({obj for r in rows for obj in r["objects"]})
    for r in rows:
        shutil.copy(world.captions_file.parent / r["image"], images / Path(r["image"]).name)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_coco(
        [(k + 10, Path(r["image"]).name) for k, r in enumerate(rows)],
        [(k + 1, n) for k, n in enumerate(names)],
        [(k + 10, names.index(obj) + 1) for k, r in enumerate(rows) for obj in r["objects"]])))
    return {"pope": pope, "instances": instances, "images": images,
            "synonyms": world.synonyms_file}


def test_cli_eval_on_published_files(tiny_model: Path, published_files: dict[str, Path],
                                     tmp_path: Path) -> None:
    files, out = published_files, tmp_path / "eval.json"
    result = runner.invoke(app, [
        "eval", "--model", str(tiny_model), "--pope-file", str(files["pope"]),
        "--coco-instances", str(files["instances"]), "--images", str(files["images"]),
        "--synonyms", str(files["synonyms"]), "--caption-prompt", "Describe the image.",
        "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {"published", "model"}
    published = report["published"]
    assert set(published) == {"images", "pope", "chair"}

    pope = published["pope"]["my_pope"]
    questions = [json.loads(line) for line in files["pope"].read_text().splitlines()]
    assert [a["question_id"] for a in pope["answers"]] == [q["question_id"] for q in questions]
    said_yes = [parse_yes_no(a["answer"]) for a in pope["answers"]]
    assert [a["yes"] for a in pope["answers"]] == said_yes
    expected = pope_metrics(said_yes, [q["label"] == "yes" for q in questions]).to_dict()
    assert {k: pope[k] for k in expected} == expected
    assert pope["n"] == 4

    chair = published["chair"]
    truth = read_coco_instances(files["instances"])
    assert {c["image"]: set(c["objects"]) for c in chair["captions"]} == truth
    captions = {c["image"]: c["caption"] for c in chair["captions"]}
    rescored = chair_scores(captions, truth, SynonymMap.from_file(files["synonyms"]))
    assert {k: chair[k] for k in rescored} == rescored
    assert chair["n_captions"] == 3 and chair["prompt"] == "Describe the image."
    assert chair["rules"] == "coco-official"  # the default for --coco-instances
    assert chair["ground_truth"] == "instances"  # no --coco-captions: a warning says so
    assert "not directly comparable with published CHAIR numbers" in result.output
    finder = mention_finder(SynonymMap.from_file(files["synonyms"]), "coco-official")
    assert all(c["mentions"] == finder(c["caption"]) for c in chair["captions"])
    assert chair["n_mentions"] == sum(len(c["mentions"]) for c in chair["captions"]) > 0

    last = json.loads(result.output.strip().splitlines()[-1])
    assert "answers" not in last["published"]["pope"]["my_pope"]
    assert "captions" not in last["published"]["chair"]
    assert last["published"]["chair"]["amber"] == chair["amber"]
    assert "POPE on published files" in result.output and "AMBER cover" in result.output
    assert "CHAIR rules: coco-official" in result.output

    # The library gives the same answers and captions (greedy decoding, one batch).
    vlm = load_model(tiny_model)
    direct = pope_from_file(vlm.model, vlm.processor, files["pope"], files["images"],
                            batch_size=64)
    assert direct["answers"] == pope["answers"]
    direct_chair = chair_from_coco(vlm.model, vlm.processor, files["instances"],
                                   files["images"], files["synonyms"], batch_size=64,
                                   prompt="Describe the image.")
    assert direct_chair["captions"] == chair["captions"]


def test_cli_eval_input_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m")])
    assert result.exit_code == 1 and "nothing to evaluate" in result.output

    q = {"question_id": 7, "image": "gone.png", "text": "Is there a cat?", "label": "no"}
    pope = _jsonl(tmp_path / "p.json", [json.dumps(q)])
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--pope-file", str(pope)])
    assert result.exit_code == 1 and "need --images DIR" in result.output

    (tmp_path / "img").mkdir()
    # The missing image is reported before the (missing) model is even looked at.
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--pope-file", str(pope),
                                 "--images", str(tmp_path / "img")])
    assert result.exit_code == 1
    assert "line 1 (question_id 7): image not found" in result.output
    assert "gone.png" in result.output

    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--pope-file", str(pope),
                                 "--images", str(tmp_path / "img"), "--chair-rules", "nope"])
    assert result.exit_code == 1 and "unknown CHAIR rule set 'nope'" in result.output
