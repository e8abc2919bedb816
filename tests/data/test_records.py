"""Preference JSONL schema, reader and writer, on real PNG files made with PIL."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.data import records as records_module
from dpalign.data.errors import MAX_LISTED_ISSUES, DataIssue, DataValidationError
from dpalign.data.records import (
    ValidationSummary,
    read_preference_jsonl,
    validate_preference_file,
    write_preference_jsonl,
)
from dpalign.data.schema import PairMetadata, PreferenceRecord

runner = CliRunner()

def make_png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="PNG")
    return path


def row(id_: str | int = "p1", **fields: Any) -> dict[str, Any]:
    """A valid record dict pointing at 'img.png'; ``fields`` override or add keys."""
    base: dict[str, Any] = {
        "id": id_,
        "images": ["img.png"],
        "prompt": "What is on the table?",
        "chosen": "A red cup.",
        "rejected": "A blue cat.",
    }
    return {**base, **fields}


def write_lines(path: Path, lines: list[str | dict[str, Any]]) -> Path:
    """Write raw lines (dicts are JSON-encoded) as a JSONL file."""
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def read_error(path: Path) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        read_preference_jsonl(path)
    return info.value


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A data folder holding one valid image, img.png."""
    make_png(tmp_path / "img.png")
    return tmp_path


# --- valid files --------------------------------------------------------------------------


def test_valid_file_reads_resolves_round_trips_and_summarizes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cup, cat = make_png(data / "img" / "cup.png"), make_png(data / "img" / "cat.png", (0, 0, 9))
    lines = [
        row("a", images=["img/cup.png"], metadata={"user_id": "u1", "error_kind": "object"}),
        row("b", images=["img/cup.png", "img/cat.png"], metadata={"user_id": "u1"}),
        row(
            "c",
            images=["img/cat.png"],
            metadata={
                "user_id": "u2",
                "error_kind": "object",
                "hardness": "hard",
                "hardness_score": 0.75,
                "source": "annotator-3",
            },
        ),
        row("d", images=[str(cat)], metadata={"error_kind": "attribute"}),
    ]
    path = write_lines(data / "pairs.jsonl", lines)

    got = read_preference_jsonl(path)

    assert [r.id for r in got] == ["a", "b", "c", "d"]
    assert got[1].images == (str(cup), str(cat))
    assert got[3].images == (str(cat),)
    assert [r.user_id for r in got] == ["u1", "u1", "u2", None]
    assert got[2].metadata.hardness_score == 0.75
    assert got[2].metadata.model_extra == {"source": "annotator-3"}

    copy = write_preference_jsonl(data / "copy.jsonl", got)
    stored = [json.loads(line) for line in copy.read_text().splitlines()]
    assert [s["images"] for s in stored] == [
        ["img/cup.png"],
        ["img/cup.png", "img/cat.png"],
        ["img/cat.png"],
        ["img/cat.png"],
    ]
    assert "metadata" in stored[3] and "user_id" not in stored[3]["metadata"]
    assert read_preference_jsonl(copy) == got

    summary = validate_preference_file(path)
    assert summary == ValidationSummary(
        path=path,
        n_records=4,
        n_images=2,
        n_users=2,
        error_kinds={"attribute": 1, "object": 2},
    )


def test_writer_keeps_images_outside_the_output_folder_absolute(folder: Path) -> None:
    records = read_preference_jsonl(write_lines(folder / "pairs.jsonl", [row()]))

    out = write_preference_jsonl(folder / "elsewhere" / "pairs.jsonl", records)

    assert json.loads(out.read_text())["images"] == [str(folder / "img.png")]
    assert read_preference_jsonl(out) == records


def test_writer_resolves_relative_images_against_relative_to(folder: Path) -> None:
    record = PreferenceRecord.model_validate(row(images=["../img.png"]))

    unchanged = write_preference_jsonl(folder / "sub" / "as_is.jsonl", [record])
    rebased = write_preference_jsonl(folder / "a.jsonl", [record], relative_to=folder / "sub")

    assert json.loads(unchanged.read_text())["images"] == ["../img.png"]
    assert json.loads(rebased.read_text())["images"] == ["img.png"]
    assert read_preference_jsonl(unchanged) == read_preference_jsonl(rebased)


def test_writer_can_store_images_outside_the_folder_relative(tmp_path: Path) -> None:
    make_png(tmp_path / "shared" / "img.png")
    source = write_lines(tmp_path / "shared" / "pairs.jsonl", [row()])
    records = read_preference_jsonl(source)

    out = write_preference_jsonl(tmp_path / "runs" / "a" / "pairs.jsonl", records,
                                 relative_outside=True)

    assert json.loads(out.read_text())["images"] == ["../../shared/img.png"]
    assert read_preference_jsonl(out) == records


def test_writer_refuses_duplicate_ids(tmp_path: Path) -> None:
    record = PreferenceRecord.model_validate(row())
    with pytest.raises(ValueError, match="duplicate id 'p1'"):
        write_preference_jsonl(tmp_path / "pairs.jsonl", [record, record])
    assert not (tmp_path / "pairs.jsonl").exists()


def test_image_alias_int_id_blank_lines_and_null_metadata(folder: Path) -> None:
    line = row(7, metadata=None)
    del line["images"]
    line["image"] = "img.png"
    path = write_lines(folder / "pairs.jsonl", ["", "  ", line, ""])

    (record,) = read_preference_jsonl(path)

    assert record.id == "7"
    assert record.images == (str(folder / "img.png"),)
    assert record.metadata == PairMetadata()
    assert record.user_id is None


def test_numeric_user_id_is_coerced_to_str() -> None:
    record = PreferenceRecord.model_validate(row(metadata={"user_id": 42}))
    assert record.user_id == "42"


def test_check_images_false_skips_image_checks(folder: Path) -> None:
    path = write_lines(folder / "pairs.jsonl", [row(images=["nope.png"])])
    (record,) = read_preference_jsonl(path, check_images=False)
    assert record.images == (str(folder / "nope.png"),)


# --- bad files: each names the file, the 1-based line and the problem ----------------------

GARBAGE = b"\x89not really a png\x00\x01\x02" * 4

BAD_CASES: dict[str, tuple[list[str | dict[str, Any]], int, str]] = {
    "malformed json": (
        [row("a"), '{"id": "b", "images": ["img.png"],', row("c")],
        2,
        "malformed JSON: Expecting property name enclosed in double quotes",
    ),
    "missing field": (
        [{k: v for k, v in row().items() if k != "chosen"}],
        1,
        "missing field 'chosen'",
    ),
    "unknown field": (
        [row("a"), row("b", choosen="x")],
        2,
        "unknown field 'choosen' (did you mean 'chosen'?)",
    ),
    "blank prompt": ([row(prompt="   ")], 1, "field 'prompt' must be a non-empty string"),
    "prompt not a string": ([row(prompt=3)], 1, "field 'prompt' must be a string, got integer"),
    "images is a string": ([row(images="img.png")], 1, "field 'images' must be a list, got string"),
    "both image and images": (
        [row(image="img.png")],
        1,
        "give either 'image' or 'images', not both",
    ),
    "image not a string": (
        [{**{k: v for k, v in row().items() if k != "images"}, "image": ["img.png"]}],
        1,
        "field 'image' must be one path string, got array",
    ),
    "chosen equals rejected": (
        [row(rejected="A red cup. ")],
        1,
        "'chosen' and 'rejected' are identical: no preference signal",
    ),
    "non-object line": ([row("a"), "[1, 2]"], 2, "line is not a JSON object (got array)"),
    "hardness score out of range": (
        [row(metadata={"hardness_score": 1.5})],
        1,
        "field 'metadata.hardness_score' must be <= 1.0, got 1.5",
    ),
    "boolean id": ([row(True)], 1, "field 'id' must be a string, got boolean"),
    "missing image": (
        [row("a"), row("b", images=["img.png", "gone/b.png"])],
        2,
        "image 'gone/b.png' not found (looked at {folder}/gone/b.png)",
    ),
    "unreadable image": ([row(images=["x.png"])], 1, "image 'x.png' cannot be read: "),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_is_reported_with_file_line_and_problem(folder: Path, case: str) -> None:
    lines, line_no, problem = BAD_CASES[case]
    (folder / "x.png").write_bytes(GARBAGE)
    path = write_lines(folder / "pairs.jsonl", lines)

    error = read_error(path)

    assert [issue.line for issue in error.issues] == [line_no]
    assert str(error).startswith(f"{path}:{line_no}: ")
    assert problem.format(folder=folder) in str(error)
    assert path.name in str(error)


@pytest.mark.parametrize(
    "content", ["", "\n\n", "  \n\t\n \n"], ids=["empty", "newlines", "spaces"]
)
def test_file_without_records_is_reported(tmp_path: Path, content: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)

    error = read_error(path)

    assert error.issues == [DataIssue(path, 0, "file is empty: no records")]
    assert str(error) == f"{path}: file is empty: no records"


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    assert str(read_error(path)) == f"{path}: file not found"
    assert str(read_error(tmp_path)) == f"{tmp_path}: not a regular file"


def test_misspelled_key_reports_missing_and_unknown_field(folder: Path) -> None:
    line = {k: v for k, v in row().items() if k != "chosen"} | {"choosen": "A red cup."}
    path = write_lines(folder / "pairs.jsonl", [line])

    error = read_error(path)

    assert [str(issue) for issue in error.issues] == [
        f"{path}:1: missing field 'chosen'",
        f"{path}:1: unknown field 'choosen' (did you mean 'chosen'?)",
    ]


def test_duplicate_id_names_both_lines(folder: Path) -> None:
    path = write_lines(folder / "pairs.jsonl", [row("a"), row("b"), row("a", chosen="Two cups.")])

    error = read_error(path)

    assert str(error) == f"{path}:3: duplicate id 'a' (first on line 1)"


def test_invalid_utf8_line_is_reported(folder: Path) -> None:
    path = folder / "pairs.jsonl"
    path.write_bytes(json.dumps(row("a")).encode() + b"\n\xff\xfe\n")

    error = read_error(path)

    assert [(i.line, i.message.split(":")[0]) for i in error.issues] == [
        (2, "line is not valid UTF-8")
    ]


def test_every_problem_in_a_file_is_reported_in_line_order(folder: Path) -> None:
    (folder / "x.png").write_bytes(GARBAGE)
    lines: list[str | dict[str, Any]] = [
        row("a"),
        "{oops",
        row("c", choosen="typo"),
        "",
        row("a"),
        row("e", images=["x.png", "missing.png"]),
    ]
    path = write_lines(folder / "pairs.jsonl", lines)

    error = read_error(path)

    assert [(i.line, i.message.split(" ")[0]) for i in error.issues] == [
        (2, "malformed"),
        (3, "unknown"),
        (5, "duplicate"),
        (6, "image"),
        (6, "image"),
    ]
    text = str(error)
    assert text.startswith("5 problems found:\n")
    for fragment in (
        f"{path}:2: malformed JSON",
        f"{path}:3: unknown field 'choosen'",
        f"{path}:5: duplicate id 'a' (first on line 1)",
        f"{path}:6: image 'x.png' cannot be read",
        f"{path}:6: image 'missing.png' not found",
    ):
        assert fragment in text


def test_shared_image_is_opened_once_but_reported_per_line(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder / "x.png").write_bytes(GARBAGE)
    opened: list[str] = []
    real_open = records_module.Image.open

    def counting_open(fp: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(records_module.Image, "open", counting_open)
    lines: list[str | dict[str, Any]] = [row(str(i), images=["x.png", "img.png"]) for i in range(5)]
    path = write_lines(folder / "pairs.jsonl", lines)

    error = read_error(path)

    assert sorted(opened) == sorted([str(folder / "x.png"), str(folder / "img.png")])
    assert [issue.line for issue in error.issues] == [1, 2, 3, 4, 5]


# --- the error type ----------------------------------------------------------------------


def test_error_lists_at_most_fifty_issues_and_pickles(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    error = DataValidationError(DataIssue(path, n, f"problem {n}") for n in range(1, 121))

    lines = str(error).splitlines()

    assert MAX_LISTED_ISSUES == 50
    assert lines[0] == "120 problems found:"
    assert lines[1] == f"  {path}:1: problem 1"
    assert lines[50] == f"  {path}:50: problem 50"
    assert lines[51:] == ["  ... and 70 more problems"]
    assert len(error.issues) == 120
    assert isinstance(error, ValueError)
    assert pickle.loads(pickle.dumps(error)).issues == error.issues


def test_error_as_dict_lists_every_issue_with_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    error = DataValidationError([DataIssue(path, 0, "file is empty: no records"),
                                 DataIssue(path, 3, "missing field 'chosen'", "chosen")])

    assert error.as_dict() == {"count": 2, "errors": [
        {"file": str(path), "line": None, "message": "file is empty: no records"},
        {"file": str(path), "line": 3, "field": "chosen", "message": "missing field 'chosen'"},
    ]}


def test_error_needs_an_issue() -> None:
    with pytest.raises(ValueError, match="at least one issue"):
        DataValidationError([])


# --- one pass: every kind of problem of a file in one run (library and CLI) -----------------


@pytest.fixture
def three_problems(folder: Path) -> Path:
    """Line 2: a schema error; line 4: a duplicate id (of line 1); line 5: a missing image."""
    lines: list[str | dict[str, Any]] = [
        row("a"),
        row("b", prompt=""),
        row("c"),
        row("a", chosen="Two cups."),
        row("e", images=["gone.png"]),
    ]
    return write_lines(folder / "pairs.jsonl", lines)


def test_schema_error_duplicate_id_and_missing_image_are_found_in_one_run(
    three_problems: Path,
) -> None:
    path, folder = three_problems, three_problems.parent

    error = read_error(path)

    assert error.issues == [
        DataIssue(path, 2, "field 'prompt' must be a non-empty string", "prompt"),
        DataIssue(path, 4, "duplicate id 'a' (first on line 1)", "id"),
        DataIssue(path, 5, f"image 'gone.png' not found (looked at {folder / 'gone.png'})",
                  "images[0]"),
    ]
    text = str(error)
    assert text.startswith("3 problems found:\n")
    for line_no in (2, 4, 5):
        assert f"  {path}:{line_no}: " in text
    with pytest.raises(DataValidationError) as caught:
        validate_preference_file(path)
    assert caught.value.issues == error.issues


def test_a_line_that_breaks_the_schema_still_has_its_id_and_images_checked(
    folder: Path,
) -> None:
    broken = {k: v for k, v in row("a", images=["img.png", "gone.png"]).items() if k != "chosen"}
    alias = {**{k: v for k, v in row(9).items() if k != "images"}, "image": "lost.png",
             "rejected": 5}
    lines: list[str | dict[str, Any]] = [broken, row("a"), alias, row(9, prompt="Other?")]
    path = write_lines(folder / "pairs.jsonl", lines)

    error = read_error(path)

    assert [(i.line, i.field, i.message.split(" (")[0]) for i in error.issues] == [
        (1, "chosen", "missing field 'chosen'"),
        (1, "images[1]", "image 'gone.png' not found"),
        (2, "id", "duplicate id 'a'"),
        (3, "rejected", "field 'rejected' must be a string, got integer"),
        (3, "image", "image 'lost.png' not found"),
        (4, "id", "duplicate id '9'"),
    ]


def test_cli_validate_prints_every_problem_as_file_line_message(three_problems: Path) -> None:
    path = three_problems

    result = runner.invoke(app, ["data", "validate", str(path)])

    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[:3] == [
        f"{path}:2: field 'prompt' must be a non-empty string",
        f"{path}:4: duplicate id 'a' (first on line 1)",
        f"{path}:5: image 'gone.png' not found (looked at {path.parent / 'gone.png'})",
    ]
    assert lines[3:] == [f"error: 3 problems in {path}"]


def test_cli_validate_json_lists_the_problems(three_problems: Path) -> None:
    path = three_problems

    result = runner.invoke(app, ["data", "validate", str(path), "--json"])

    assert result.exit_code == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is False and report["path"] == str(path)
    assert report["count"] == 3
    assert [(e["file"], e["line"], e.get("field")) for e in report["errors"]] == [
        (str(path), 2, "prompt"), (str(path), 4, "id"), (str(path), 5, "images[0]")]
    assert report["errors"][1]["message"] == "duplicate id 'a' (first on line 1)"
    assert f"{path}:5: image 'gone.png' not found" in result.stderr

    (path.parent / "gone.png").write_bytes((path.parent / "img.png").read_bytes())
    fixed = write_lines(path.parent / "fixed.jsonl", [row("a"), row("c"), row("e")])
    result = runner.invoke(app, ["data", "validate", str(fixed), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["ok"] is True


def test_cli_validate_caps_the_listing_and_counts_the_rest(folder: Path) -> None:
    lines: list[str | dict[str, Any]] = [row(str(n), prompt=" ") for n in range(1, 121)]
    path = write_lines(folder / "pairs.jsonl", lines)

    result = runner.invoke(app, ["data", "validate", str(path)])
    as_json = runner.invoke(app, ["data", "validate", str(path), "--json"])

    assert result.exit_code == as_json.exit_code == 1
    shown = result.stderr.splitlines()
    assert shown[0] == f"{path}:1: field 'prompt' must be a non-empty string"
    assert shown[49] == f"{path}:50: field 'prompt' must be a non-empty string"
    assert shown[50:] == ["... and 70 more problems", f"error: 120 problems in {path}"]
    report = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert report["count"] == 120 and len(report["errors"]) == 120
    assert report["errors"][-1]["line"] == 120


def test_cli_validate_missing_file_and_markup_like_text(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "absent.jsonl")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"{tmp_path / 'absent.jsonl'}: file not found",
                                          f"error: 1 problem in {tmp_path / 'absent.jsonl'}"]

    path = write_lines(tmp_path / "pairs.jsonl", [row(images=["[bold]/x.png"])])
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:1: image '[bold]/x.png' not found" in result.stderr


def test_text_only_records_round_trip(tmp_path: Path) -> None:
    """A pair with no images (key absent or an empty list) is a text-only record; it is
    written back without an ``images`` key and reads back equal."""
    absent = {k: v for k, v in row("t1").items() if k != "images"}
    path = write_lines(tmp_path / "text.jsonl", [absent, row("t2", images=[])])
    got = read_preference_jsonl(path)
    assert [r.images for r in got] == [(), ()]
    assert all(r.text_only for r in got)
    copy = write_preference_jsonl(tmp_path / "copy.jsonl", got)
    assert all("images" not in json.loads(line) for line in copy.read_text().splitlines())
    assert read_preference_jsonl(copy) == got
