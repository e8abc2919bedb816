"""`dpalign data convert`: each public layout written as a small fixture, converted, and
checked value by value; bad inputs name the file, the row and the field and write nothing."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.data.convert import FORMATS, OutputExistsError, convert_file
from dpalign.data.errors import DataValidationError
from dpalign.data.records import read_preference_jsonl, validate_preference_file

runner = CliRunner()


def _png(color: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE, GREEN = _png((255, 0, 0)), _png((0, 0, 255)), _png((0, 255, 0), (3, 5))


def _pixels(source: Path | bytes) -> np.ndarray:
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(handle) as image:
        return np.asarray(image.convert("RGB"))


def _stored_name(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20] + ".png"


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _nothing_written(folder: Path, *inputs: Path) -> None:
    """Only the input files (and image folders the test made) are in ``folder``."""
    left = {p.name for p in folder.iterdir()} - {p.name for p in inputs}
    assert left <= {"img"}, left


def _rlaif_row(idx: str, image: dict[str, Any] | None, **texts: str) -> dict[str, Any]:
    base = {"ds_name": "RLAIF-V", "image": image, "question": "What colour is it?",
            "chosen": "It is red.", "rejected": "It is blue.", "origin_dataset": "OK-VQA",
            "origin_split": '{"model": "OmniLMM-12B", "type": "question_answering"}',
            "idx": idx, "image_path": f"OK-VQA/{idx}.jpg"}
    return {**base, **texts}


def test_registry_names_the_five_formats() -> None:
    assert list(FORMATS) == ["rlhf-v", "rlaif-v", "vlfeedback", "povid", "trl"]
    assert all(FORMATS[name].name == name for name in FORMATS)


def test_rlaif_v_parquet_with_embedded_images(tmp_path: Path) -> None:
    source = _parquet(tmp_path / "rlaif.parquet", [
        _rlaif_row("OmniLMM_0", {"bytes": RED, "path": "a.jpg"}),
        _rlaif_row("OmniLMM_1", {"bytes": RED, "path": "a.jpg"}, question="Is it red?",
                   chosen="Yes.", rejected="No."),
        _rlaif_row("OmniLMM_2", {"bytes": BLUE, "path": None}, chosen="Blue.",
                   rejected="Red."),
    ])
    out = tmp_path / "out" / "rlaif.jsonl"
    summary = convert_file(source, "rlaif-v", out)

    assert (summary.n_rows, summary.n_records, summary.n_embedded_images) == (3, 3, 2)
    assert summary.images_dir == (tmp_path / "out" / "rlaif_images").absolute()
    assert summary.skipped == {}
    rows = _lines(out)
    assert rows[0] == {
        "id": "OmniLMM_0", "images": [f"rlaif_images/{_stored_name(RED)}"],
        "prompt": "What colour is it?", "chosen": "It is red.", "rejected": "It is blue.",
        "metadata": {"source_format": "rlaif-v", "source_id": "OmniLMM_0",
                     "ds_name": "RLAIF-V", "origin_dataset": "OK-VQA",
                     "origin_split": '{"model": "OmniLMM-12B", "type": "question_answering"}'},
    }
    assert rows[1]["images"] == rows[0]["images"]  # same bytes, stored once
    assert (rows[1]["prompt"], rows[1]["chosen"]) == ("Is it red?", "Yes.")
    assert rows[2]["images"] == [f"rlaif_images/{_stored_name(BLUE)}"]
    assert sorted(p.name for p in (out.parent / "rlaif_images").iterdir()) == sorted(
        [_stored_name(RED), _stored_name(BLUE)])

    records = read_preference_jsonl(out)
    assert np.array_equal(_pixels(Path(records[0].images[0])), _pixels(RED))
    assert np.array_equal(_pixels(Path(records[2].images[0])), _pixels(BLUE))
    assert validate_preference_file(out).n_records == 3
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_conversion_is_deterministic_and_rerunnable(tmp_path: Path) -> None:
    source = _parquet(tmp_path / "rlaif.parquet",
                      [_rlaif_row("a", {"bytes": RED, "path": None}),
                       _rlaif_row("b", {"bytes": GREEN, "path": None})])
    out = tmp_path / "out.jsonl"
    convert_file(source, "rlaif-v", out)
    first = out.read_bytes()
    summary = convert_file(source, "rlaif-v", out, force=True)  # images folder exists
    assert out.read_bytes() == first
    assert summary.n_embedded_images == 2
    assert len(list((tmp_path / "out_images").iterdir())) == 2


def test_rlhf_v_parquet_text_json_and_image_path_fallback(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "vg_7.png").write_bytes(GREEN)
    text = {"question": "Describe the image.", "chosen": "A green patch.",
            "rejected": "A green patch with a dog."}
    source = _parquet(tmp_path / "rlhf.parquet", [
        {"ds_name": "RLHF-V", "image": {"bytes": RED, "path": "x.jpg"},
         "text": json.dumps(text), "origin_dataset": "VG", "origin_split": "llava",
         "idx": 41, "image_path": "vg_41.jpg"},
        {"ds_name": "RLHF-V", "image": {"bytes": None, "path": "vg_7.png"},
         "text": json.dumps({**text, "chosen": "Green."}), "origin_dataset": "VG",
         "origin_split": "llava", "idx": 7, "image_path": "vg_7.png"},
    ])
    out = tmp_path / "rlhf.jsonl"
    summary = convert_file(source, "rlhf-v", out, images=tmp_path / "img")

    assert (summary.n_records, summary.n_embedded_images) == (2, 1)
    rows = _lines(out)
    assert rows[0] == {
        "id": "41", "images": [f"rlhf_images/{_stored_name(RED)}"],
        "prompt": "Describe the image.", "chosen": "A green patch.",
        "rejected": "A green patch with a dog.",
        "metadata": {"source_format": "rlhf-v", "source_id": "41", "ds_name": "RLHF-V",
                     "origin_dataset": "VG", "origin_split": "llava"},
    }
    assert rows[1]["id"] == "7" and rows[1]["chosen"] == "Green."
    assert rows[1]["images"] == ["img/vg_7.png"]  # under the output folder: relative
    records = read_preference_jsonl(out)
    assert np.array_equal(_pixels(Path(records[1].images[0])), _pixels(GREEN))
    validate_preference_file(out)


@pytest.mark.parametrize("name", ["rlaif.jsonl", "rlaif.json"])
def test_rlaif_v_json_lines_with_paths_under_images(tmp_path: Path, name: str) -> None:
    images = tmp_path / "coco"
    (images / "train").mkdir(parents=True)
    (images / "train" / "1.png").write_bytes(BLUE)
    row = _rlaif_row("q1", None, image_path="train/1.png")
    del row["image"]
    source = _jsonl(tmp_path / name, [row])  # datasets' to_json writes JSON Lines to .json
    out = tmp_path / "out" / "pairs.jsonl"
    summary = convert_file(source, "rlaif-v", out, images=images)

    assert summary.n_embedded_images == 0 and summary.images_dir is None
    (record,) = read_preference_jsonl(out)
    assert record.images == (str(images / "train" / "1.png"),)
    assert _lines(out)[0]["images"] == ["../coco/train/1.png"]  # relative to out's folder
    assert not (tmp_path / "out" / "pairs_images").exists()


def _completion(model: str, response: str, ratings: tuple[str, str, str]) -> dict[str, Any]:
    aspects = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
    return {"model": model, "response": response,
            "annotations": {a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings,
                                                                                  strict=True)}}


def test_vlfeedback_best_vs_worst_by_mean_rating(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "svit-1.png")
    rows = [
        {"id": "svit-1", "prompt": "What is shown?", "models": ["m1", "m2", "m3", "m4"],
         "completions": [
             _completion("m1", "A cat on a mat.", ("4", "5", "5")),    # 14/3
             _completion("m2", "A dog in a car.", ("2", "1", "5")),    # 8/3
             _completion("m3", "A cat.", ("N/A", "3", "5")),          # (3+5)/2 = 4
             _completion("m4", "", ("5", "5", "5")),                  # no response: left out
         ], "img_path": "svit-1.png"},
        {"id": "tie", "prompt": "Count.", "models": ["a", "b"],
         "completions": [_completion("a", "Two.", ("3", "3", "3")),
                         _completion("b", "Three.", ("3", "4", "2"))], "img_path": "svit-1.png"},
        {"id": "few", "prompt": "Count.", "models": ["a", "b"],
         "completions": [_completion("a", "Two.", ("3", "3", "3")),
                         _completion("b", "Three.", ("N/A", "N/A", "N/A"))],
         "img_path": "svit-1.png"},
        # a struct of lists (how `datasets` returns a Sequence of structs); best tie -> earlier
        {"id": "cols", "prompt": "Colour?", "models": ["x", "y", "z"],
         "completions": {"model": ["x", "y", "z"], "response": ["Red.", "Crimson.", "Blue."],
                         "annotations": [_completion("", "", r)["annotations"]
                                         for r in (("4", "4", "4"), ("5", "4", "3"),
                                                   ("1", "2", "3"))]},
         "img_path": "svit-1.png"},
    ]
    out = tmp_path / "vlf_pairs.jsonl"
    summary = convert_file(_jsonl(tmp_path / "vlf.jsonl", rows), "vlfeedback", out)

    assert summary.n_rows == 4 and summary.n_records == 2
    assert summary.skipped == {"all rated completions tie": 1,
                               "fewer than two rated completions": 1}
    first, second = _lines(out)
    assert first == {
        "id": "svit-1", "images": ["svit-1.png"], "prompt": "What is shown?",
        "chosen": "A cat on a mat.", "rejected": "A dog in a car.",
        "metadata": {"source_format": "vlfeedback", "source_id": "svit-1",
                     "chosen_model": "m1", "rejected_model": "m2",
                     "chosen_score": 14 / 3, "rejected_score": 8 / 3},
    }
    assert (second["chosen"], second["rejected"]) == ("Red.", "Blue.")
    assert second["metadata"]["chosen_model"] == "x"
    assert (second["metadata"]["chosen_score"], second["metadata"]["rejected_score"]) == (4, 2)
    validate_preference_file(out)


def test_povid_json_array_conversations(tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (5, 5), (9, 9, 9)).save(tmp_path / "coco" / "COCO_1.jpg")

    def conv(question: str, answer: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    rows = [
        {"image": "COCO_1.jpg", "conversations": conv("<image>\nDescribe it.", "A grey box."),
         "rejected_conversations": conv("<image>\nDescribe it.", "A grey box and a cat.")},
        {"image": "COCO_1.jpg",
         "conversations": [*conv("<image>\nQ1", "A1"), *conv("Q2", "A2")],
         "rejected_conversations": [*conv("<image>\nQ1", "A1"), *conv("Q2", "B2")]},
        {"id": "flat-9", "image": "COCO_1.jpg", "question": "Is it grey?", "chosen": "Yes.",
         "rejected": "No, red."},
    ]
    source = tmp_path / "povid.json"
    source.write_text(json.dumps(rows, indent=1))
    out = tmp_path / "povid.jsonl"
    summary = convert_file(source, "povid", out, images=tmp_path / "coco")

    assert summary.skipped == {"multi-turn conversation (dpalign pairs are single-turn)": 1}
    first, flat = _lines(out)
    assert first == {"id": "0", "images": ["coco/COCO_1.jpg"], "prompt": "Describe it.",
                     "chosen": "A grey box.", "rejected": "A grey box and a cat.",
                     "metadata": {"source_format": "povid"}}
    assert flat["id"] == "flat-9" and flat["metadata"] == {"source_format": "povid",
                                                            "source_id": "flat-9"}
    validate_preference_file(out)


def test_trl_conversational_parquet_and_standard_jsonl(tmp_path: Path) -> None:
    prompt = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "What is it?"}]}]

    def answer(text: str) -> list[dict[str, Any]]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    source = _parquet(tmp_path / "trl.parquet", [
        {"images": [{"bytes": GREEN, "path": None}], "prompt": prompt,
         "chosen": answer("A green bar."), "rejected": answer("A red bar.")},
        {"images": [{"bytes": RED, "path": None}], "prompt": prompt,
         "chosen": answer("Red."), "rejected": answer("Red.")},
    ])
    out = tmp_path / "trl.jsonl"
    summary = convert_file(source, "trl", out)
    assert summary.skipped == {"chosen and rejected are identical": 1}
    (row,) = _lines(out)
    assert row == {"id": "0", "images": [f"trl_images/{_stored_name(GREEN)}"],
                   "prompt": "What is it?", "chosen": "A green bar.", "rejected": "A red bar.",
                   "metadata": {"source_format": "trl"}}
    (record,) = read_preference_jsonl(out)
    assert np.array_equal(_pixels(Path(record.images[0])), _pixels(GREEN))

    (tmp_path / "b.png").write_bytes(BLUE)
    standard = _jsonl(tmp_path / "std.jsonl", [
        {"id": 5, "images": ["b.png", "b.png"], "prompt": "Same?", "chosen": "Yes.",
         "rejected": "No."}])
    convert_file(standard, "trl", tmp_path / "std_out.jsonl")
    assert _lines(tmp_path / "std_out.jsonl")[0]["images"] == ["b.png", "b.png"]
    assert _lines(tmp_path / "std_out.jsonl")[0]["id"] == "5"


def test_jsonl_errors_name_file_line_and_field_and_write_nothing(tmp_path: Path) -> None:
    # JSON cannot hold bytes; an embedded image may come as a list of byte values
    good = _rlaif_row("a", {"bytes": list(RED), "path": None})
    no_chosen = {k: v for k, v in _rlaif_row("b", None).items() if k != "chosen"}
    source = _jsonl(tmp_path / "bad.jsonl", [
        good, no_chosen, {**good, "idx": "c", "rejected": ["x"]}, [1, 2],
        {**good, "idx": "a"}, {**good, "idx": "e", "image": None, "image_path": "gone.jpg"},
    ])
    source.write_text(source.read_text() + "{oops\n")
    out = tmp_path / "out.jsonl"

    with pytest.raises(DataValidationError) as caught:
        convert_file(source, "rlaif-v", out)
    message = str(caught.value)
    assert f"{source}:2: missing field 'chosen'" in message
    assert f"{source}:3: field 'rejected' must be a string, got array" in message
    assert f"{source}:4: line is not a JSON object (got array)" in message
    assert f"{source}:5: duplicate id 'a' (first at line 1)" in message
    assert f"{source}:6: image 'gone.jpg' (field 'image_path') not found under the image " \
           f"folder {tmp_path}" in message
    assert f"{source}:7: malformed JSON" in message
    assert len(caught.value.issues) == 6
    _nothing_written(tmp_path, source)


def test_parquet_and_json_errors_name_the_index(tmp_path: Path) -> None:
    source = _parquet(tmp_path / "bad.parquet", [
        _rlaif_row("a", {"bytes": RED, "path": None}),
        _rlaif_row("b", {"bytes": b"not an image", "path": None}),
        _rlaif_row("c", {"bytes": BLUE, "path": None}, question=" "),
    ])
    with pytest.raises(DataValidationError) as caught:
        convert_file(source, "rlaif-v", tmp_path / "out.jsonl")
    message = str(caught.value)
    assert f"{source}: index 1: field 'image' holds bytes that are not a readable image " \
           "(unknown format, 12 bytes)" in message
    assert f"{source}: index 2: field 'question' is empty" in message
    _nothing_written(tmp_path, source)  # row 0's staged image is gone too

    povid = tmp_path / "povid.json"
    povid.write_text(json.dumps([
        {"image": "COCO_1.jpg", "question": "Q?", "chosen": "A.", "rejected": "B."},
        {"image": 3, "question": "Q?", "chosen": "A.", "rejected": "B."},
        {"image": "COCO_1.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"}],
         "rejected_conversations": []},
    ]))
    with pytest.raises(DataValidationError) as caught:
        convert_file(povid, "povid", tmp_path / "p.jsonl")
    message = str(caught.value)
    assert f"{povid}: index 0: image 'COCO_1.jpg' (field 'image') not found" in message
    assert f"{povid}: index 1: field 'image' must be an image path" in message
    assert f"{povid}: index 2: field 'conversations' must be one 'human' turn then one " \
           "'gpt' turn" in message
    _nothing_written(tmp_path, source, povid)


def test_vlfeedback_and_trl_layout_errors(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    vlf = _jsonl(tmp_path / "vlf.jsonl", [
        {"id": "1", "prompt": "Q", "img_path": "a.png", "completions": "none"},
        {"id": "2", "instruction": "Q", "img_path": "a.png",
         "completions": [_completion("m", "A", ("1", "1", "1")), "oops"]},
        {"id": "3", "img_path": "a.png", "completions": []},
    ])
    with pytest.raises(DataValidationError) as caught:
        convert_file(vlf, "vlfeedback", tmp_path / "o.jsonl")
    message = str(caught.value)
    assert f"{vlf}:1: field 'completions' must be a list, got string" in message
    assert f"{vlf}:2: field 'completions[1]' must be an object, got string" in message
    assert f"{vlf}:3: missing field 'prompt' (also accepted: 'instruction')" in message

    user = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Q"}]}]
    trl = _jsonl(tmp_path / "trl.jsonl", [
        {"images": ["a.png"], "prompt": user, "chosen": "A", "rejected": "B"},
        {"images": ["a.png"], "prompt": [{"role": "assistant", "content": "Q"}],
         "chosen": "A", "rejected": "B"},
        {"images": ["a.png"], "chosen": [{"role": "user", "content": "Q"},
                                         {"role": "assistant", "content": "A"}],
         "rejected": "B"},
    ])
    with pytest.raises(DataValidationError) as caught:
        convert_file(trl, "trl", tmp_path / "o.jsonl")
    message = str(caught.value)
    assert f"{trl}:1: field 'prompt' has 2 image placeholders but 'images' holds 1" in message
    assert f"{trl}:2: field 'prompt[0].role' must be 'user', got 'assistant'" in message
    assert f"{trl}:3: missing field 'prompt' (the implicit-prompt layout" in message
    _nothing_written(tmp_path, vlf, trl, tmp_path / "a.png")


def test_file_level_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataValidationError, match=r"empty\.jsonl: file is empty"):
        convert_file(empty, "rlaif-v", tmp_path / "o.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataValidationError, match=r"empty\.json: file is empty"):
        convert_file(tmp_path / "empty.json", "povid", tmp_path / "o.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataValidationError, match=r"d\.csv: unsupported file type '\.csv'"):
        convert_file(tmp_path / "d.csv", "rlaif-v", tmp_path / "o.jsonl")
    with pytest.raises(DataValidationError, match=r"nope\.parquet: file not found"):
        convert_file(tmp_path / "nope.parquet", "rlaif-v", tmp_path / "o.jsonl")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataValidationError, match=r"junk\.parquet: cannot read Parquet"):
        convert_file(tmp_path / "junk.parquet", "rlaif-v", tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=r"image folder .*nowhere not found"):
        convert_file(empty, "rlaif-v", tmp_path / "o.jsonl", images=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown format 'rlaifv' \(did you mean 'rlaif-v'\?\)"):
        convert_file(empty, "rlaifv", tmp_path / "o.jsonl")
    ties = _jsonl(tmp_path / "ties.jsonl", [
        {"id": "1", "prompt": "Q", "img_path": "x.png",
         "completions": [_completion("a", "A", ("3", "3", "3")),
                         _completion("b", "B", ("3", "3", "3"))]}])
    with pytest.raises(DataValidationError, match=r"no pairs to write: all 1 rows were skipped"):
        convert_file(ties, "vlfeedback", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_convert_summary_and_errors(tmp_path: Path) -> None:
    source = _parquet(tmp_path / "rlaif.parquet",
                      [_rlaif_row("a", {"bytes": RED, "path": None}),
                       _rlaif_row("b", {"bytes": RED, "path": None}, rejected="It is red.")])
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["data", "convert", str(source), "--format", "rlaif-v",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 pairs from 2 rows" in result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary == {"ok": True, "source": str(source), "out": str(out), "format": "rlaif-v",
                       "rows": 2,
                       "records": 1, "embedded_images": 1,
                       "images_dir": str((tmp_path / "pairs_images").absolute()),
                       "skipped": {"chosen and rejected are identical": 1}}
    assert runner.invoke(app, ["data", "validate", str(out)]).exit_code == 0

    bad = _jsonl(tmp_path / "bad.jsonl", [{"idx": "1", "question": "Q"}])
    result = runner.invoke(app, ["data", "convert", str(bad), "--format", "rlaif-v",
                                 "--out", str(tmp_path / "bad_out.jsonl")])
    assert result.exit_code == 1
    assert "bad.jsonl:1:" in result.output and "missing field 'image'" in result.output
    assert not (tmp_path / "bad_out.jsonl").exists()

    result = runner.invoke(app, ["data", "convert", str(bad), "--format", "llava",
                                 "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 1 and "unknown format 'llava'" in result.output
    assert runner.invoke(app, ["data", "convert", "--help"]).exit_code == 0


def test_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    source = _parquet(tmp_path / "rlaif.parquet", [_rlaif_row("a", {"bytes": RED, "path": None})])
    out = tmp_path / "pairs.jsonl"
    out.write_bytes(b"precious, not even JSONL\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    with pytest.raises(OutputExistsError, match="already exists; use --force") as caught:
        convert_file(source, "rlaif-v", out)
    assert caught.value.out == out
    result = runner.invoke(app, ["data", "convert", str(source), "--format", "rlaif-v",
                                 "--out", str(out)])

    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {out} already exists; use --force to overwrite it"
    assert out.read_bytes() == b"precious, not even JSONL\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no images folder either

    result = runner.invoke(app, ["data", "convert", str(source), "--format", "rlaif-v",
                                 "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in _lines(out)] == ["a"]
    assert validate_preference_file(out).n_records == 1

    with pytest.raises(ValueError, match="is a folder"):
        convert_file(source, "rlaif-v", tmp_path, force=True)


def test_image_paths_are_relative_so_the_folder_can_move(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "coco" / "train").mkdir(parents=True)
    (project / "coco" / "train" / "1.png").write_bytes(BLUE)
    (project / "raw").mkdir()
    rows = [_rlaif_row("p", None, image_path="train/1.png"),
            _rlaif_row("e", {"bytes": list(GREEN), "path": None})]
    del rows[0]["image"]
    source = _jsonl(project / "raw" / "rlaif.jsonl", rows)
    out = project / "converted" / "pairs.jsonl"

    result = runner.invoke(app, ["data", "convert", str(source), "--format", "rlaif-v",
                                 "--images", str(project / "coco"), "--out", str(out)])

    assert result.exit_code == 0, result.output
    stored = [row["images"] for row in _lines(out)]
    assert stored == [["../coco/train/1.png"], [f"pairs_images/{_stored_name(GREEN)}"]]
    assert not any(Path(image).is_absolute() for images in stored for image in images)
    assert (out.parent / "pairs_images" / _stored_name(GREEN)).read_bytes() == GREEN

    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    shutil.move(project, moved)
    assert not project.exists()

    result = runner.invoke(app, ["data", "validate", str(moved / "converted" / "pairs.jsonl"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["images"] == 2
    first, second = read_preference_jsonl(moved / "converted" / "pairs.jsonl")
    assert first.images == (str(moved / "coco" / "train" / "1.png"),)
    assert np.array_equal(_pixels(Path(first.images[0])), _pixels(BLUE))
    assert np.array_equal(_pixels(Path(second.images[0])), _pixels(GREEN))
