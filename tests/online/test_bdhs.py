"""BDHS: the text helpers, the resampling loop with injected completers, the real
all-MiniLM-L6-v2 embedder, input errors, and the CLI end to end on the tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.data.errors import DataValidationError
from dpalign.data.records import read_preference_jsonl
from dpalign.online.bdhs import (
    BDHSInput,
    bdhs_rejections,
    complete_sentence,
    read_bdhs_inputs,
    record_rng,
    split_point,
    split_sentences,
    swap_yes_no,
    write_bdhs_pairs,
)
from dpalign.online.generate import Query
from dpalign.world.load import World

runner = CliRunner()


def bag_of_words(texts: Sequence[str]) -> torch.Tensor:
    """A stand-in embedder for the loop's logic: unit-norm word counts hashed into 4096 bins
    (equal texts -> cosine 1; texts sharing no word -> cosine 0)."""
    rows = torch.zeros(len(texts), 4096)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            rows[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % 4096] += 1
    return torch.nn.functional.normalize(rows, dim=1)


def item(i: int | str, answer: str) -> BDHSInput:
    return BDHSInput(str(i), ("/img/a.png",), "Describe the image.", answer)


class Copier:
    """A completer that writes the rest of the original sentence (what a model that copies
    its reference does) until try ``differ_from`` (0-based), then ``" zebra giraffe."``;
    it records every call."""

    def __init__(self, originals: dict[str, str], differ_from: int | None = None) -> None:
        self.originals = originals  # prompt-free lookup: query prefix -> the original text
        self.differ_from = differ_from
        self.calls: list[tuple[int, list[Query]]] = []

    def __call__(self, queries: Sequence[Query], attempt: int) -> list[str]:
        self.calls.append((attempt, list(queries)))
        if self.differ_from is not None and attempt >= self.differ_from:
            return [" zebra giraffe." for _ in queries]
        return [self._rest(q.prefix) for q in queries]

    def _rest(self, prefix: str) -> str:
        for text in self.originals.values():
            if text.startswith(prefix):
                return text[len(prefix):]
        raise AssertionError(f"no original starts with {prefix!r}")


# ---- text helpers ---------------------------------------------------------------------------

def test_split_sentences() -> None:
    assert split_sentences("A red cup. A blue pen!  Is it? yes") == [
        "A red cup.", "A blue pen!", "Is it?", "yes"]
    assert split_sentences("First line\nsecond line.") == ["First line", "second line."]
    assert split_sentences("A 3.5 cm pen.") == ["A 3.5 cm pen."]  # no space after the point
    assert split_sentences("  ") == []


SENTENCES = ["A red cup and a blue pen on the table.", "Two words.", "A  cup,   a pen.",
             "An orange notebook, a yellow lock and a red door key."]


@pytest.mark.parametrize("sentence", SENTENCES)
def test_split_point_is_a_word_boundary_inside_the_sentence(sentence: str) -> None:
    n_words = len(sentence.split())
    seen = set()
    for s in range(400):
        prefix = split_point(np.random.default_rng(s), sentence)
        assert sentence.startswith(prefix) and prefix == prefix.rstrip()
        rest = sentence[len(prefix):]
        assert rest[0].isspace(), (prefix, rest)  # cut between words, never inside one
        kept = len(prefix.split())
        assert 1 <= kept <= n_words - 1  # the first word kept, at least one word left
        seen.add(kept)
    assert seen == set(range(1, n_words))  # every allowed cut is drawn


def test_split_point_of_one_word_is_empty() -> None:
    assert split_point(np.random.default_rng(0), "Yes.") == ""


def test_swap_yes_no_keeps_case_and_punctuation() -> None:
    swaps = {"Yes, there is a cup.": "No, there is a cup.", "no.": "yes.", "YES": "NO",
             "No": "Yes", " Yes it is": " No it is"}
    for answer, swapped in swaps.items():
        results = {swap_yes_no(np.random.default_rng(s), answer) for s in range(40)}
        assert results == {(answer, False), (swapped, True)}
    for answer in ["Yesterday a cup.", "Nothing here.", "Not a cup.", "A cup, yes.", "Noah"]:
        for s in range(40):
            assert swap_yes_no(np.random.default_rng(s), answer) == (answer, False)


def test_swap_rate_is_one_half_over_records() -> None:
    n = 4000
    swapped = sum(swap_yes_no(record_rng(0, f"r{i}", "swap"), "Yes, a cup.")[1]
                  for i in range(n))
    # Binomial(4000, 1/2): sd = sqrt(4000)/2 = 31.6; 4 sd = 126 (fails w.p. ~6e-5 per seed).
    assert abs(swapped - n / 2) <= 126, swapped


def test_complete_sentence_stops_at_the_first_sentence_end() -> None:
    assert complete_sentence("A red", " cup. And more.") == "A red cup."
    assert complete_sentence("A red", " cup and") == "A red cup and"
    assert complete_sentence("A 3", ".5 cm pen! x") == "A 3.5 cm pen!"
    assert complete_sentence("", " A dog\nmore") == "A dog"


# ---- the resampling loop ---------------------------------------------------------------------

def test_a_copying_model_uses_every_try() -> None:
    answers = {"a": "A red cup and a blue pen.", "b": "The fork is green."}
    copier = Copier(answers)
    results = bdhs_rejections([item(k, v) for k, v in answers.items()], copier, bag_of_words,
                              seed=0, max_tries=5, threshold=0.97)
    for result, (key, answer) in zip(results, answers.items(), strict=True):
        assert result.id == key and result.rejected == answer
        assert result.tries == 5 and result.sentence_tries == (5,)
        assert result.similarity == pytest.approx(1.0, abs=1e-6)
        assert not result.swapped
    # one call per try, each with both records' pending sentences
    assert [(attempt, len(queries)) for attempt, queries in copier.calls] == [
        (t, 2) for t in range(5)]


def test_a_different_sentence_on_try_three_stops_the_loop() -> None:
    answers = {"a": "A red cup and a blue pen."}
    copier = Copier(answers, differ_from=2)
    (result,) = bdhs_rejections([item("a", answers["a"])], copier, bag_of_words, seed=1,
                                max_tries=5, threshold=0.97)
    assert result.tries == 3 and len(copier.calls) == 3
    prefix = copier.calls[2][1][0].prefix
    assert result.rejected == prefix + " zebra giraffe."
    expected = torch.dot(*bag_of_words([result.rejected, answers["a"]])).item()
    assert result.similarity == pytest.approx(expected, abs=1e-6) and result.similarity < 0.97


def test_each_sentence_is_completed_and_resampled_alone() -> None:
    answer = "A red cup. The pen is blue and long. A dog."
    calls: list[list[Query]] = []

    def complete(queries: Sequence[Query], attempt: int) -> list[str]:
        calls.append(list(queries))
        # the second sentence is copied on tries 0 and 1, the others differ at once
        return [answer.split(". ")[1][len(q.prefix) - len("A red cup. "):] + "."
                if q.prefix.startswith("A red cup. The") and "long." not in q.prefix
                and attempt < 2 else " zebra."
                for q in queries]

    (result,) = bdhs_rejections([item(0, answer)], complete, bag_of_words, seed=3)
    assert result.sentence_tries == (1, 3, 1) and result.tries == 3
    assert [len(c) for c in calls] == [3, 1, 1]
    # sentence i is continued from the original sentences before it plus its own start
    first_try = calls[0]
    assert first_try[1].prefix.startswith("A red cup. The")
    assert first_try[2].prefix.startswith("A red cup. The pen is blue and long. A")
    sentences = split_sentences(result.rejected)
    assert len(sentences) == 3 and all(s.endswith("zebra.") for s in sentences)


def test_blank_continuations_are_resampled() -> None:
    def complete(queries: Sequence[Query], attempt: int) -> list[str]:
        return [" ." if attempt < 3 else " zebra." for _ in queries]

    (result,) = bdhs_rejections([item(0, "A red cup and a pen.")], complete, bag_of_words,
                                seed=0)
    assert result.tries == 4 and result.rejected.endswith(" zebra.")


def test_swapped_yes_no_opens_the_rejection() -> None:
    answers = [item(f"q{i}", "Yes, there is a red cup.") for i in range(40)]
    answers += [item(f"s{i}", "No.") for i in range(40)]
    calls: list[list[Query]] = []

    def complete(queries: Sequence[Query], attempt: int) -> list[str]:
        calls.append(list(queries))
        return [" zebra." for _ in queries]

    results = bdhs_rejections(answers, complete, bag_of_words, seed=0)
    long, short = results[:40], results[40:]
    assert {r.swapped for r in long} == {True, False} == {r.swapped for r in short}
    for r in long:
        if r.swapped:  # the model goes on from the swapped word, nothing else kept
            assert r.rejected == "No, zebra."
        else:
            assert r.rejected.startswith("Yes,") and r.rejected.endswith(" zebra.")
    for r in short:  # "No." swapped is "Yes." with no model call; unswapped is rewritten
        assert r.rejected == ("Yes." if r.swapped else "zebra.") and r.tries == 1
    swapped_short = sum(r.swapped for r in short)
    assert len(calls[0]) == 80 - swapped_short


def test_results_depend_on_the_seed_and_record_not_on_the_other_records() -> None:
    answers = [item(i, f"A red cup, a blue pen and a green shoe number {i}.")
               for i in range(12)]

    def complete(queries: Sequence[Query], attempt: int) -> list[str]:  # a function of the query
        return [f" zebra {len(q.prefix)}." for q in queries]

    full = bdhs_rejections(answers, complete, bag_of_words, seed=5)
    assert full == bdhs_rejections(answers, complete, bag_of_words, seed=5)
    alone = bdhs_rejections(answers[7:8], complete, bag_of_words, seed=5)
    assert alone[0] == full[7]
    other_seed = bdhs_rejections(answers, complete, bag_of_words, seed=6)
    assert [r.rejected for r in other_seed] != [r.rejected for r in full]


def test_max_tries_is_checked() -> None:
    with pytest.raises(ValueError, match="max_tries"):
        bdhs_rejections([item(0, "A cup.")], lambda q, t: [], bag_of_words, seed=0,
                        max_tries=0)


# ---- the real embedder ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from dpalign.online.embed import sentence_embedder

    return sentence_embedder()


def test_minilm_shapes_norms_and_similarities(minilm) -> None:
    from dpalign.online.embed import EMBED_DIM, cosine

    texts = ["A red cup on the table.", "A red mug on a table.", "The stock market fell today.",
             "A red cup on the table."]
    emb = minilm.encode(texts, batch_size=3)  # two batches
    assert emb.shape == (4, EMBED_DIM) == (4, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sims = cosine(emb[:1].expand(4, -1), emb)
    assert sims[0] == pytest.approx(1.0, abs=1e-6) and sims[3] == pytest.approx(1.0, abs=1e-6)
    assert sims[1] > 0.8 > 0.2 > sims[2]  # paraphrase 0.865, unrelated -0.007 (measured)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_matches_sentence_transformers(minilm) -> None:
    """The reference implementation the wheel declares (sentence-transformers, which reads the
    same folder's modules.json: BERT -> mean pooling -> Normalize) gives the same vectors."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from dpalign.online.embed import minilm_path

    texts = ["This is an example sentence", "Each sentence is converted",
             "Yes, there is a purple lock in the picture, next to a very long red pen."]
    reference = sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu")
    expected = torch.from_numpy(reference.encode(texts))
    assert torch.allclose(minilm.encode(texts), expected, atol=1e-5)
    # the first components of the model card's example sentence, as both compute them
    first = minilm.encode(["This is an example sentence"])[0, :5]
    assert torch.allclose(first, torch.tensor([0.067657, 0.063496, 0.048713, 0.079305,
                                               0.037448]), atol=2e-6)


# ---- files and the CLI ------------------------------------------------------------------------

def _write(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_input_names_the_file_and_lines(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "prompt": "What is it?", "answer": "A cup."}
    pair = {"id": "p", "images": ["a.png"], "prompt": "p", "chosen": "c", "rejected": "r"}
    bad = _write(tmp_path / "in.jsonl", [good, "{oops", {"image": "a.png", "prompt": "p"},
                                         {**good, "image": "gone.png"}, pair, {**pair}])
    with pytest.raises(DataValidationError) as info:
        read_bdhs_inputs(bad)
    found = {(issue.line, issue.field) for issue in info.value.issues}
    assert found == {(2, None), (3, "answer"), (4, "image"), (6, "id")}
    text = str(info.value)
    assert f"{bad}:2: malformed JSON" in text and f"{bad}:3: missing field 'answer'" in text
    assert "gone.png" in text and "duplicate id 'p'" in text

    items = read_bdhs_inputs(_write(tmp_path / "ok.jsonl", [good, pair]))
    assert [(i.id, i.answer) for i in items] == [("line1", "A cup."), ("p", "c")]
    assert items[0].images == (str(tmp_path / "a.png"),)

    result = runner.invoke(app, ["data", "bdhs", "--model", str(tmp_path / "no-model"),
                                 "--in", str(bad), "--out", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 1
    assert "in.jsonl:2:" in result.output and "in.jsonl:3:" in result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_pairs_written_with_metadata_and_identical_ones_left_out(tmp_path: Path) -> None:
    from dpalign.data.schema import PairMetadata
    from dpalign.online.bdhs import BDHSResult

    image = tmp_path / "img" / "a.png"
    image.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    meta = PairMetadata(user_id="u1", error_kind="object", hardness="hard", task="t")
    items = [BDHSInput("a", (str(image),), "p", "A cup.", meta),
             BDHSInput("b", (str(image),), "p", "A pen.", meta)]
    results = [BDHSResult("a", "A dog.", 2, 0.5, False, (2,)),
               BDHSResult("b", "A pen.", 5, 1.0, False, (5,))]
    summary = write_bdhs_pairs(tmp_path / "out" / "pairs.jsonl", items, results, max_tries=5)
    assert (summary.n_pairs, summary.n_identical) == (1, 1)
    assert summary.mean_tries == 3.5 and summary.share_max_tries == 0.5
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").open()]
    assert row["images"] == [os.path.relpath(image, tmp_path / "out")] or \
        row["images"] == [str(image)]
    assert row["id"] == "a-bdhs" and row["chosen"] == "A cup." and row["rejected"] == "A dog."
    assert row["metadata"] == {"user_id": "u1", "task": "t", "error_kind": "bdhs",
                               "bdhs": {"tries": 2, "similarity": 0.5, "swapped": False,
                                        "source_id": "a"}}


def test_cli_end_to_end_on_the_tiny_model(small_world: Path, tiny_model: Path,
                                          tmp_path: Path) -> None:
    pool = World.load(small_world).pool_file
    rows = [json.loads(line) for line in pool.read_text().splitlines()[:6]]
    for row in rows:  # relative to the new file's folder
        row["images"] = [os.path.relpath(pool.parent / i, tmp_path) for i in row["images"]]
    source = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "bdhs.jsonl"
    args = ["data", "bdhs", "--model", str(tiny_model), "--in", str(source), "--out", str(out),
            "--device", "cpu", "--batch-size", "8", "--seed", "0", "--max-new-tokens", "12"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote \d pairs to .*mean tries", result.output)
    pairs = read_preference_jsonl(out)  # images resolve from the output's folder
    by_source = {row["id"]: row for row in rows}
    assert 1 <= len(pairs) <= 6
    for pair in pairs:
        src = by_source[pair.metadata.bdhs["source_id"]]
        assert pair.id == f"{src['id']}-bdhs" and pair.chosen == src["chosen"]
        assert pair.rejected != pair.chosen and pair.prompt == src["prompt"]
        assert [Path(i).resolve() for i in pair.images] == \
            [(tmp_path / i).resolve() for i in src["images"]]
        bdhs = pair.metadata.bdhs
        assert 1 <= bdhs["tries"] <= 5 and -1 <= bdhs["similarity"] <= 1
        assert isinstance(bdhs["swapped"], bool)
        assert pair.user_id == src["metadata"]["user_id"]
        assert pair.metadata.error_kind == "bdhs"
        assert pair.metadata.objects == src["metadata"]["objects"]
    first = out.read_text()
    assert runner.invoke(app, args).exit_code == 0
    assert out.read_text() == first  # same seed, same file


def test_cli_help_lists_the_options() -> None:
    result = runner.invoke(app, ["data", "bdhs", "--help"])
    assert result.exit_code == 0, result.output
    for option in ["--model", "--in", "--out", "--seed", "--mask-rate", "--max-tries",
                   "--threshold", "--batch-size", "--max-new-tokens", "--temperature"]:
        assert option in result.output
