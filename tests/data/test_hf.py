"""`datasets.Dataset` input (dpalign.data.hf): each layout built in memory and read record by
record; the same records as the equivalent JSONL file; saved-to-disk folders wherever a JSONL
path goes (reader, `check_run`, `dpalign data validate`); materializing is atomic and
idempotent; bad rows name the dataset, the row index and what is wrong."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.data.errors import DataValidationError
from dpalign.data.hf import (
    materialize,
    materialize_config_data,
    read_records,
    records_from_dataset,
    validate_source,
)
from dpalign.data.records import read_preference_jsonl, write_preference_jsonl
from dpalign.data.schema import PreferenceRecord

runner = CliRunner()


def _image(seed: int, size: tuple[int, int] = (5, 3)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return Image.fromarray(pixels)


def _pixels(source: Path | Image.Image) -> np.ndarray:
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"))
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def _assistant(content: Any) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": content}]


def _record(id: str, prompt: str, chosen: str, rejected: str, images: tuple[str, ...] = (),
            **metadata: Any) -> PreferenceRecord:
    return PreferenceRecord(id=id, images=images, prompt=prompt, chosen=chosen,
                            rejected=rejected, metadata=metadata)


def _issues(error: pytest.ExceptionInfo[DataValidationError]) -> list[str]:
    return [str(issue) for issue in error.value.issues]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# --- layouts -------------------------------------------------------------------------------

def test_dpalign_fields_equal_the_jsonl_records(tmp_path: Path) -> None:
    """dpalign's own fields (path images, ids, metadata, a text-only row) give the records the
    JSONL reader gives for the same rows."""
    (tmp_path / "img").mkdir()
    _image(0).save(tmp_path / "img" / "a.png")
    _image(1).save(tmp_path / "img" / "b.png")
    rows = [
        {"id": "p1", "images": ["img/a.png", "img/b.png"], "prompt": "What is it?",
         "chosen": "A cup.", "rejected": "A cat.",
         "metadata": {"user_id": "u1", "error_kind": "object", "note": "kept"}},
        {"id": "p2", "images": [], "prompt": "Say hi.", "chosen": "Hi.", "rejected": "No.",
         "metadata": {"user_id": "u2", "hardness_score": 0.5}},
        {"id": "p3", "images": ["img/a.png"], "prompt": "Colour?", "chosen": "Mixed.",
         "rejected": "Plain red.", "metadata": None},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = read_preference_jsonl(jsonl)

    got = records_from_dataset(datasets.Dataset.from_list(rows), image_root=tmp_path,
                               images_dir=tmp_path / "embedded")
    assert got == expected
    assert got[0].images == (str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png"))
    assert got[0].metadata.model_extra == {"note": "kept"}  # Arrow's null-filled keys dropped
    assert got[1].text_only and got[1].metadata.hardness_score == 0.5
    assert not (tmp_path / "embedded").exists()  # nothing embedded, nothing written


def test_trl_standard_text_layout(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["The sky is", "Grass is"],
                                     "chosen": [" blue.", " green."],
                                     "rejected": [" green.", " blue."]})
    assert records_from_dataset(ds, images_dir=tmp_path / "i") == [
        _record("0", "The sky is", " blue.", " green."),
        _record("1", "Grass is", " green.", " blue.")]


def test_trl_conversational_layouts(tmp_path: Path) -> None:
    """Explicit prompt; implicit prompt (the shared user turn); a string prompt beside whole
    conversations (TRL takes the shared turn then too); content as a list of text parts."""
    sky = _user("What color is the sky?")
    explicit = datasets.Dataset.from_list([
        {"prompt": sky, "chosen": _assistant("It is blue."),
         "rejected": _assistant("It is green.")}])
    implicit = datasets.Dataset.from_list([
        {"chosen": sky + _assistant("It is blue."), "rejected": sky + _assistant("It is green.")}])
    string_prompt = implicit.add_column("prompt", ["What color is the sky?"])
    parts = datasets.Dataset.from_list([
        {"prompt": _user([{"type": "text", "text": "What color"},
                          {"type": "text", "text": "is the sky?"}]),
         "chosen": _assistant([{"type": "text", "text": "It is blue."}]),
         "rejected": _assistant([{"type": "text", "text": "It is green."}])}])
    want = [_record("0", "What color is the sky?", "It is blue.", "It is green.")]
    for ds in (explicit, implicit, string_prompt):
        assert records_from_dataset(ds, images_dir=tmp_path / "i") == want
    assert records_from_dataset(parts, images_dir=tmp_path / "i") == [
        _record("0", "What color\nis the sky?", "It is blue.", "It is green.")]


def test_trl_vision_layout_writes_the_images(tmp_path: Path) -> None:
    """PIL images in an `images` column, image placeholders in the prompt: the images are
    written once each (content-addressed) with the original pixels."""
    red, blue = _image(2), _image(3, (4, 4))
    question = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    ds = datasets.Dataset.from_list([
        {"images": [red], "prompt": _user(question),
         "chosen": _assistant([{"type": "text", "text": "Noise."}]),
         "rejected": _assistant([{"type": "text", "text": "A cat."}])},
        {"images": [red, blue], "prompt": _user([{"type": "image"}, *question]),
         "chosen": _assistant([{"type": "text", "text": "Two noises."}]),
         "rejected": _assistant([{"type": "text", "text": "Two cats."}])},
    ])
    assert isinstance(ds.features["images"], datasets.List)
    images_dir = tmp_path / "images"
    got = records_from_dataset(ds, images_dir=images_dir)
    red_file = images_dir / (hashlib.sha256(_png(red)).hexdigest()[:20] + ".png")
    assert [r.id for r in got] == ["0", "1"]
    assert got[0].images == (str(red_file),)
    assert got[1].images[0] == str(red_file)
    assert (got[0].prompt, got[0].chosen, got[0].rejected) == ("What is shown?", "Noise.",
                                                               "A cat.")
    assert got[1].prompt == "What is shown?" and got[1].chosen == "Two noises."
    assert _files(images_dir) == {Path(got[1].images[0]).name, Path(got[1].images[1]).name}
    np.testing.assert_array_equal(_pixels(Path(got[0].images[0])), _pixels(red))
    np.testing.assert_array_equal(_pixels(Path(got[1].images[1])), _pixels(blue))


def test_image_column_of_paths_resolves_like_datasets(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An `image` column cast to datasets.Image from path strings holds paths, relative to
    the working directory as datasets reads them; the record points at the file itself."""
    monkeypatch.chdir(tmp_path)
    _image(4).save(tmp_path / "one.png")
    ds = datasets.Dataset.from_dict({"id": [7], "image": ["one.png"], "prompt": ["Q"],
                                     "chosen": ["A"], "rejected": ["B"]}
                                    ).cast_column("image", datasets.Image())
    assert records_from_dataset(ds, images_dir=tmp_path / "i") == [
        _record("7", "Q", "A", "B", (str(tmp_path / "one.png"),))]


def test_datasets_share_an_images_folder(tmp_path: Path) -> None:
    """A second dataset adds its images to the folder the first made; both stay valid."""
    first = datasets.Dataset.from_list([{"images": [_image(8)], "prompt": "Q", "chosen": "A",
                                         "rejected": "B"}])
    second = datasets.Dataset.from_list([{"images": [_image(8), _image(9)], "prompt": "Q",
                                          "chosen": "A", "rejected": "B"}])
    a = records_from_dataset(first, images_dir=tmp_path / "images")
    b = records_from_dataset(second, images_dir=tmp_path / "images")
    assert b[0].images[0] == a[0].images[0]
    assert _files(tmp_path) == {"images", *(f"images/{Path(i).name}" for i in b[0].images)}


def test_records_round_trip_through_jsonl(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list([
        {"images": [_image(5)], "prompt": "Q1", "chosen": "A", "rejected": "B"},
        {"images": [], "prompt": "Q2", "chosen": "C", "rejected": "D"}])
    records = records_from_dataset(ds, images_dir=tmp_path / "pairs_images")
    jsonl = write_preference_jsonl(tmp_path / "pairs.jsonl", records)
    assert read_preference_jsonl(jsonl) == records


# --- saved folders, materializing, configs -------------------------------------------------

def _vision_rows() -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "images": [_image(10 + i)], "prompt": f"Question {i}?",
             "chosen": f"Right {i}.", "rejected": f"Wrong {i}.",
             "metadata": {"user_id": f"u{i % 2}"}} for i in range(4)]


def test_saved_dataset_folder_reads_like_a_jsonl_path(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list(_vision_rows())
    folder = tmp_path / "saved"
    ds.save_to_disk(str(folder))
    in_memory = records_from_dataset(ds, images_dir=tmp_path / "mem")

    got = read_records(folder)
    assert [r.model_copy(update={"images": ()}) for r in got] == [
        r.model_copy(update={"images": ()}) for r in in_memory]
    assert [Path(r.images[0]).name for r in got] == [Path(r.images[0]).name
                                                     for r in in_memory]
    assert all(Path(r.images[0]).parent == tmp_path / "saved_images" for r in got)
    for record, row in zip(got, _vision_rows(), strict=True):
        np.testing.assert_array_equal(_pixels(Path(record.images[0])), _pixels(row["images"][0]))
    assert read_records(folder) == got  # again: the same files

    summary = validate_source(folder)
    assert (summary.n_records, summary.n_images, summary.n_users) == (4, 4, 2)
    jsonl = write_preference_jsonl(tmp_path / "p.jsonl", got)
    assert read_records(jsonl) == got


def test_folders_that_are_not_one_saved_dataset(tmp_path: Path) -> None:
    rows = {"prompt": ["Q"], "chosen": ["A"], "rejected": ["B"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dict"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataValidationError) as info:
        read_records(tmp_path / "dict")
    assert str(info.value) == (f"{tmp_path / 'dict'}: a saved DatasetDict (splits: train, "
                               f"test): give one split's folder, e.g. {tmp_path / 'dict/train'}")
    assert len(read_records(tmp_path / "dict" / "train")) == 1
    with pytest.raises(DataValidationError, match="a folder, but not a saved dataset"):
        read_records(tmp_path / "plain")
    with pytest.raises(DataValidationError, match="file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_materialize_is_atomic_and_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "run" / "data" / "train.jsonl"
    ds = datasets.Dataset.from_list(_vision_rows())
    assert materialize(ds, out) == out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    names = [hashlib.sha256(_png(row["images"][0])).hexdigest()[:20] + ".png"
             for row in _vision_rows()]
    assert lines[0] == {"id": "r0", "images": [f"train_images/{names[0]}"],
                        "prompt": "Question 0?", "chosen": "Right 0.", "rejected": "Wrong 0.",
                        "metadata": {"user_id": "u0"}}
    assert read_preference_jsonl(out) == records_from_dataset(
        ds, images_dir=out.parent / "train_images")
    before, listing = out.read_bytes(), _files(out.parent)
    assert listing == {"train.jsonl", "train_images", *(f"train_images/{n}" for n in names)}
    materialize(ds, out)
    assert out.read_bytes() == before and _files(out.parent) == listing

    bad = datasets.Dataset.from_list([*_vision_rows()[:2],
                                      {**_vision_rows()[2], "chosen": "Same.",
                                       "rejected": "Same."}])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(DataValidationError, match="index 2: 'chosen' and 'rejected' are"):
        materialize(bad, fresh / "train.jsonl")
    assert list(fresh.iterdir()) == []  # no file, no images, no staging folder


def test_materialize_config_data(tmp_path: Path) -> None:
    from dpalign.train.config import TrainConfig

    train = datasets.Dataset.from_dict({"prompt": ["Q1", "Q2"], "chosen": ["A", "C"],
                                        "rejected": ["B", "D"]})
    heldout = tmp_path / "held.jsonl"
    write_preference_jsonl(heldout, [_record("h", "Q", "A", "B")])
    raw = {"model": "some/model", "data": {"train": train, "heldout": str(heldout), "k": 2},
           "eval": {"validation": train.select([1])}, "train": {"steps": 1, "batch_size": 1}}
    out = tmp_path / "run"
    config = materialize_config_data(raw, out)
    assert config["data"] == {"train": str(out / "data" / "train.jsonl"),
                              "heldout": str(heldout), "k": 2}
    assert config["eval"] == {"validation": str(out / "data" / "validation.jsonl")}
    assert raw["data"]["train"] is train  # the input is left as it was
    assert read_records(config["data"]["train"]) == [_record("0", "Q1", "A", "B"),
                                                     _record("1", "Q2", "C", "D")]
    assert read_records(config["eval"]["validation"]) == [_record("0", "Q2", "C", "D")]
    TrainConfig.model_validate(config)
    assert materialize_config_data({"model": "m", "data": {"train": "a.jsonl"}}, out) == {
        "model": "m", "data": {"train": "a.jsonl"}}

    bad = {**raw, "data": {"train": train.remove_columns(["chosen"])}}
    with pytest.raises(DataValidationError) as info:
        materialize_config_data(bad, tmp_path / "bad")
    assert _issues(info) == ["data.train: index 0: missing field 'chosen'",
                             "data.train: index 1: missing field 'chosen'"]
    assert not (tmp_path / "bad").exists()


def test_check_run_reads_a_saved_dataset(tmp_path: Path, tiny_model: Path) -> None:
    from dpalign.train.checks import check_run
    from dpalign.train.config import TrainConfig

    datasets.Dataset.from_list(_vision_rows()).save_to_disk(str(tmp_path / "train"))
    write_preference_jsonl(tmp_path / "held.jsonl", [_record("h", "Q", "A", "B")])
    cfg = TrainConfig.model_validate({
        "model": str(tiny_model), "data": {"train": str(tmp_path / "train"),
                                         "heldout": str(tmp_path / "held.jsonl")},
        "train": {"steps": 1, "batch_size": 2}})
    data = check_run(cfg)
    assert sorted(r.id for r in data.records) == ["r0", "r1", "r2", "r3"]
    assert [r.id for r in data.held] == ["h"]


def test_cli_data_validate_a_saved_dataset(tmp_path: Path) -> None:
    datasets.Dataset.from_list(_vision_rows()).save_to_disk(str(tmp_path / "ok"))
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "ok"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary == {"ok": True, "path": str(tmp_path / "ok"), "records": 4, "images": 4,
                       "users": 2, "error_kinds": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # validate wrote nothing

    rows = _vision_rows()
    rows[1] = {**rows[1], "rejected": rows[1]["chosen"]}
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "bad"), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["errors"] == [{"file": str(tmp_path / "bad"), "line": None,
                                 "message": "index 1: 'chosen' and 'rejected' are identical: "
                                            "no preference signal"}]


# --- errors --------------------------------------------------------------------------------

def test_bad_rows_name_the_dataset_row_and_problem(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png(_image(6)))
    ds = datasets.Dataset.from_list([
        {"id": "a", "images": None, "prompt": "Q", "chosen": None, "rejected": "B"},
        {"id": "b", "images": None, "prompt": "Q", "chosen": "Same", "rejected": "Same"},
        {"id": "c", "images": [{"bytes": b"not an image", "path": None}], "prompt": "Q",
         "chosen": "A", "rejected": "B"},
        {"id": "d", "images": [{"bytes": None, "path": "gone.png"}], "prompt": "Q",
         "chosen": "A", "rejected": "B"},
        {"id": "a", "images": [{"bytes": None, "path": "ok.png"}], "prompt": "Q",
         "chosen": "A", "rejected": "B"},
        {"id": "e", "images": None, "prompt": " ", "chosen": "A", "rejected": "B"},
    ])
    images_dir = tmp_path / "images"
    with pytest.raises(DataValidationError) as info:
        records_from_dataset(ds, images_dir=images_dir, name="mine", image_root=tmp_path)
    assert _issues(info) == [
        "mine: index 0: missing field 'chosen'",
        "mine: index 1: 'chosen' and 'rejected' are identical: no preference signal",
        "mine: index 2: field 'images[0]' holds bytes that are not a readable image "
        "(unknown format, 12 bytes)",
        f"mine: index 3: image 'gone.png' (field 'images[0].path') not found under the image "
        f"folder {tmp_path} (looked at {tmp_path / 'gone.png'})",
        "mine: index 4: duplicate id 'a' (first at index 0)",
        "mine: index 5: field 'prompt' must be a non-empty string",
    ]
    assert [issue.field for issue in info.value.issues] == ["chosen", None, "images[0]",
                                                            "images[0]", "id", "prompt"]
    assert not images_dir.exists()


def test_schema_errors_read_as_the_jsonl_readers(tmp_path: Path) -> None:
    """The same bad rows in a JSONL file and a Dataset: the same messages, the line number
    replaced by the row index."""
    rows = [{"id": "a", "prompt": "Q", "chosen": "A", "rejected": "A", "metadata": None},
            {"id": "b", "prompt": "Q", "chosen": "", "rejected": "B", "metadata": None},
            {"id": "c", "prompt": "Q", "chosen": "A", "rejected": "B",
             "metadata": {"hardness_score": 2.0}}]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataValidationError) as from_file:
        read_preference_jsonl(jsonl)
    with pytest.raises(DataValidationError) as from_dataset:
        records_from_dataset(datasets.Dataset.from_list(rows), images_dir=tmp_path / "i")
    assert [i.message for i in from_file.value.issues] == [
        i.message.split(": ", 1)[1] for i in from_dataset.value.issues]
    assert [i.field for i in from_file.value.issues] == [
        i.field for i in from_dataset.value.issues]


def test_type_and_layout_errors(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"prompt": [1, 2], "chosen": ["a", "b"],
                                     "rejected": ["c", "d"], "chosen_score": [1.0, 2.0]})
    with pytest.raises(DataValidationError) as info:
        records_from_dataset(ds, images_dir=tmp_path / "i")
    assert _issues(info) == [
        "dataset: unknown column 'chosen_score'; 'chosen_score': did you mean 'chosen'? "
        "(dpalign reads id, images, image, prompt, chosen, rejected, metadata; drop the "
        "others with ds.remove_columns(['chosen_score']))",
        "dataset: index 0: field 'prompt' must be a string, got integer",
        "dataset: index 1: field 'prompt' must be a string, got integer",
    ]

    sky = _user("Sky?")
    image_q = _user([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}])
    conversations = datasets.Dataset.from_list([
        {"prompt": sky, "chosen": _assistant("Blue.") + _user("Sure?") + _assistant("Yes."),
         "rejected": _assistant("Green."), "images": []},
        {"prompt": _assistant("Sky?"), "chosen": _assistant("Blue."),
         "rejected": _assistant("Green."), "images": []},
    ])
    with pytest.raises(DataValidationError) as info:
        records_from_dataset(conversations, images_dir=tmp_path / "i")
    assert _issues(info) == [
        "dataset: index 0: field 'chosen' holds 3 messages: a dpalign pair is single-turn "
        "(one 'assistant' message here)",
        "dataset: index 1: field 'prompt[0].role' must be 'user', got 'assistant'",
    ]
    placeholders = datasets.Dataset.from_list([
        {"prompt": image_q, "chosen": "Blue.", "rejected": "Green.", "images": [_image(7)]}])
    with pytest.raises(DataValidationError) as info:
        records_from_dataset(placeholders, images_dir=tmp_path / "i")
    assert _issues(info) == [
        "dataset: index 0: field 'prompt' has 2 image placeholders but the row holds 1 image"]
    assert not (tmp_path / "i").exists()
    implicit = datasets.Dataset.from_list([
        {"chosen": sky + _assistant("Blue."), "rejected": sky + _assistant("Blue.")},
        {"chosen": _assistant("Blue."), "rejected": _assistant("Green.")}])
    with pytest.raises(DataValidationError) as info:
        records_from_dataset(implicit, images_dir=tmp_path / "i")
    assert _issues(info) == [
        "dataset: index 0: 'chosen' and 'rejected' are identical: no preference signal",
        "dataset: index 1: missing field 'prompt' (and 'chosen' and 'rejected' share no "
        "first turn to take it from)",
    ]

    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(DataValidationError, match=r"^dataset: empty dataset: no rows$"):
        records_from_dataset(empty, images_dir=tmp_path / "i")
    splits = datasets.DatasetDict({"train": empty})
    with pytest.raises(DataValidationError, match=r"a DatasetDict \(splits: train\): give one "
                                                  r"split, e.g. ds\['train'\]"):
        records_from_dataset(splits, images_dir=tmp_path / "i")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a datasets\.Dataset, got list"):
        records_from_dataset([{"prompt": "Q"}], images_dir=tmp_path / "i")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs images_dir"):
        read_records(empty)


def test_importing_the_reader_does_not_import_datasets() -> None:
    code = ("import sys, dpalign.data.hf, dpalign.cli; "
            "assert 'datasets' not in sys.modules, 'datasets imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
