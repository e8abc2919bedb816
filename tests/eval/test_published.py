"""Published-format evaluation: POPE files, COCO instances, CHAIR/AMBER scores and the CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.eval.amber import amber_metrics
from dpalign.eval.chair import SynonymMap
from dpalign.eval.coco import CocoFormatError, chair_scores, read_coco_instances
from dpalign.eval.pope import PopeFormatError, parse_yes_no, pope_metrics
from dpalign.eval.published import (
    PublishedInputError,
    chair_from_coco,
    default_synonyms_file,
    load_caption_task,
    load_pope_task,
    plan_published,
    pope_from_file,
)
from dpalign.models.load import load_vlm
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
    if COCO_SYNONYMS.is_file():
        assert default_synonyms_file().read_text() == COCO_SYNONYMS.read_text()


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
    assert chair["n_mentions"] == sum(len(c["mentions"]) for c in chair["captions"]) > 0

    last = json.loads(result.output.strip().splitlines()[-1])
    assert "answers" not in last["published"]["pope"]["my_pope"]
    assert "captions" not in last["published"]["chair"]
    assert last["published"]["chair"]["amber"] == chair["amber"]
    assert "POPE on published files" in result.output and "AMBER cover" in result.output

    # The library gives the same answers and captions (greedy decoding, one batch).
    vlm = load_vlm(tiny_model)
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
