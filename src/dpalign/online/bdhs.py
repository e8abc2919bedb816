"""Bias-Driven Hallucination Sampling (BDHS; Amirloo et al. 2024, "Understanding Alignment in
Multimodal LLMs", DESIGN §5): an annotation-free rejected answer for a good one.

For each record (image(s), prompt, answer):

1. If the answer starts with "yes" / "no", that word is swapped for the opposite with
   probability 1/2 (``swap_yes_no``); the swapped word then opens the first sentence and the
   model has to go on from it.
2. The answer is split into sentences (``split_sentences``). Each sentence is cut at a random
   word boundary (``split_point``); the model, with each image token masked out of attention
   with probability ``mask_rate`` (0.99), continues from the answer's preceding sentences
   plus that start, and the continuation up to its first sentence end completes the sentence.
   With the image all but hidden the model falls back on its language prior: its biases
   write the rest of the sentence.
3. A completed sentence whose all-MiniLM-L6-v2 cosine similarity to the original sentence is
   above ``threshold`` (0.97), or whose continuation is blank, is sampled again (a fresh
   split point and completion) up to ``max_tries`` (5) tries in all; the last try is kept.
   The rejected answer is the completed sentences joined by spaces.

Each try completes every still-pending sentence of every record in one ``complete`` call
(batched generation). The completer is injected (``Complete``), so the text logic is tested
without a model; ``masked_completer`` binds ``dpalign.online.generate.sample``.

Determinism: the yes/no swap and every split point come from numpy Generators seeded by
(seed, record id, sentence, try) alone, so a record's draws do not depend on the other records
of the file. The generated text does depend on the batch a sentence lands in (generation is
seeded per call and batch), so the same file, model and seed give the same output.

Privacy: a BDHS pair built from a private record with the public base model is a function of
that one record (its image, prompt and answer) and of public things only; it inherits the
privacy unit of its source record (the same example, the same ``metadata.user_id``) and must
be counted as that record in DP training, never as an extra public example. Made with a
model trained under DP, the pair is post-processing of that model plus its own source record,
so the same rule holds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import PreTrainedModel, ProcessorMixin

from dpalign.data.records import read_checked_jsonl, write_preference_jsonl
from dpalign.data.schema import (
    IdStr,
    NonEmptyStr,
    PairMetadata,
    PreferenceRecord,
)
from dpalign.online.config import BDHSConfig
from dpalign.online.embed import cosine
from dpalign.online.generate import Query, sample

Complete = Callable[[Sequence[Query], int], list[str]]
"""(queries, try index 0..max_tries-1) -> one continuation per query: the text the model
writes after ``query.prefix`` (not stripped)."""
Embed = Callable[[Sequence[str]], Tensor]
"""texts -> (N, D) sentence embeddings (``SentenceEmbedder.encode``)."""

YES_NO = {"yes": "no", "no": "yes"}
SENTENCE_STOPS = (".", "!", "?")  # a completion is one sentence: generation stops at its end
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_FIRST_END = re.compile(r"[.!?](?=\s|$)|\n")
_LEADING_YES_NO = re.compile(r"^(\s*)(yes|no)\b", re.IGNORECASE)
_WORD = re.compile(r"\w")


# ---- pure text helpers -------------------------------------------------------------------

def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, in order: a sentence ends at ``.``, ``!`` or ``?``
    followed by whitespace, or at a line break; the last may lack an end mark."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def split_point(rng: np.random.Generator, sentence: str) -> str:
    """The start of ``sentence`` kept for the model to continue: its first ``k`` words (with
    their punctuation, original spacing), ``k`` uniform in ``1 .. n_words - 1``, so at least
    the first word is kept and at least one word is left to complete. A one-word sentence
    gives ``""``: the model writes the whole sentence."""
    spans = [m.span() for m in re.finditer(r"\S+", sentence)]
    if len(spans) < 2:
        return ""
    k = int(rng.integers(1, len(spans)))
    return sentence[: spans[k - 1][1]]


def swap_yes_no(rng: np.random.Generator, answer: str) -> tuple[str, bool]:
    """(answer, swapped): an answer whose first word is yes/no (any case) has it replaced by
    the opposite with probability 1/2, keeping its capitalisation and what follows ("Yes,
    there is" -> "No, there is"); other answers come back unchanged and draw nothing."""
    match = _LEADING_YES_NO.match(answer)
    if match is None or rng.random() >= 0.5:
        return answer, False
    word = match.group(2)
    new = YES_NO[word.lower()]
    new = new.upper() if word.isupper() and len(word) > 1 else (
        new.capitalize() if word[0].isupper() else new)
    return answer[: match.start(2)] + new + answer[match.end(2):], True


def complete_sentence(prefix: str, continuation: str) -> str:
    """``prefix`` plus ``continuation`` up to and including its first sentence end (or all of
    it when it has none), stripped: the model's completion of one sentence."""
    end = _FIRST_END.search(continuation)
    cut = continuation if end is None else continuation[: end.end()]
    return (prefix + cut).strip()


def record_rng(seed: int, record_id: str, *keys: int | str) -> np.random.Generator:
    """A numpy Generator that depends on (seed, record id, keys) only (sha256, stable
    across processes and machines)."""
    digest = hashlib.sha256(repr((seed, record_id, *keys)).encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))


# ---- the resampling loop -----------------------------------------------------------------

@dataclass(frozen=True)
class BDHSInput:
    """One answer to make a rejection for: absolute image paths, prompt, the good answer."""

    id: str
    images: tuple[str, ...]
    prompt: str
    answer: str
    metadata: PairMetadata = field(default_factory=PairMetadata)


@dataclass(frozen=True)
class BDHSResult:
    """The BDHS answer of one input. ``tries``: the most tries any of its sentences took
    (1..max_tries); ``similarity``: cosine of the whole rejected answer to the whole original;
    ``sentence_tries``: tries per sentence (1 where nothing was left to complete)."""

    id: str
    rejected: str
    tries: int
    similarity: float
    swapped: bool
    sentence_tries: tuple[int, ...]


@dataclass
class _Sentence:
    record: int  # index into the inputs
    index: int  # sentence number within its answer
    original: str  # the sentence of the good answer (before any yes/no swap)
    context: str  # the answer's preceding sentences (+ space), given to the model
    fixed_start: str | None  # the swapped yes/no opening, kept on every try
    text: str = ""  # the latest completion
    tries: int = 0
    reference: Tensor | None = None  # the embedding of ``original``


def _plan(item: BDHSInput, k: int, seed: int) -> tuple[list[_Sentence], bool]:
    """The sentences of one input to complete, and whether its yes/no was swapped."""
    swapped_answer, swapped = swap_yes_no(record_rng(seed, item.id, "swap"), item.answer)
    originals = split_sentences(item.answer)
    swapped_first = split_sentences(swapped_answer)[0] if originals else ""
    sentences = []
    for i, original in enumerate(originals):
        fixed = None
        if i == 0 and swapped:
            first_word = re.match(r"\s*\S+", swapped_first)
            fixed = first_word.group(0).strip() if first_word else swapped_first
        context = " ".join(originals[:i]) + (" " if i else "")
        sentences.append(_Sentence(k, i, original, context, fixed))
    return sentences, swapped


def _start(sentence: _Sentence, seed: int, record_id: str) -> str:
    """The start of the sentence the model continues on its next try."""
    if sentence.fixed_start is not None:
        return sentence.fixed_start
    rng = record_rng(seed, record_id, "split", sentence.index, sentence.tries)
    return split_point(rng, sentence.original)


def bdhs_rejections(items: Sequence[BDHSInput], complete: Complete, embed: Embed, *,
                    seed: int, max_tries: int = 5, threshold: float = 0.97) -> list[BDHSResult]:
    """A BDHS rejected answer per input (same order), resampling each sentence while its
    cosine to the original sentence is above ``threshold`` or its continuation is blank, at
    most ``max_tries`` tries; each try is one ``complete`` call over all pending sentences."""
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    plans = [_plan(item, k, seed) for k, item in enumerate(items)]
    sentences = [s for plan, _ in plans for s in plan]
    pending = []
    for s in sentences:  # a swapped one-word sentence ("Yes." -> "No.") has nothing to write
        if s.fixed_start is not None and len(s.original.split()) == 1:
            s.text, s.tries = s.fixed_start, 1
        else:
            pending.append(s)
    for s, row in zip(pending, _rows(embed, [s.original for s in pending]), strict=True):
        s.reference = row
    for attempt in range(max_tries):
        if not pending:
            break
        starts = [_start(s, seed, items[s.record].id) for s in pending]
        queries = [Query(tuple(Path(p) for p in items[s.record].images), items[s.record].prompt,
                         s.context + start) for s, start in zip(pending, starts, strict=True)]
        continuations = complete(queries, attempt)
        if len(continuations) != len(queries):
            raise ValueError(f"complete returned {len(continuations)} texts for "
                             f"{len(queries)} queries")
        for s, start, cont in zip(pending, starts, continuations, strict=True):
            s.text, s.tries = complete_sentence(start, cont), attempt + 1
        sims = _similarities(embed, [s.text for s in pending],
                             [s.reference for s in pending])
        pending = [s for s, sim, cont in zip(pending, sims, continuations, strict=True)
                   if sim > threshold or not _WORD.search(cont)]
    rejected = [" ".join(s.text for s in plan if s.text) for plan, _ in plans]
    sims = _similarities(embed, rejected, _rows(embed, [item.answer for item in items]))
    return [BDHSResult(item.id, text, max((s.tries for s in plan), default=1), sim, swapped,
                       tuple(s.tries for s in plan))
            for item, (plan, swapped), text, sim in zip(items, plans, rejected, sims,
                                                        strict=True)]


def _rows(embed: Embed, texts: list[str]) -> list[Tensor]:
    """The (D,) embedding of each text."""
    return list(embed(texts)) if texts else []


def _similarities(embed: Embed, texts: list[str], originals: Sequence[Tensor | None]
                  ) -> list[float]:
    """Cosine of each text's embedding to its row of ``originals``."""
    if not texts:
        return []
    return cosine(embed(texts), torch.stack([o for o in originals if o is not None])).tolist()


# ---- the model-bound completer -----------------------------------------------------------

def masked_completer(model: PreTrainedModel, processor: ProcessorMixin, cfg: BDHSConfig, *,
                     batch_size: int = 16) -> Complete:
    """``Complete`` with ``model``: one sampled continuation per query, each image token
    masked from attention with probability ``cfg.mask_rate``; try ``t`` uses seed
    ``cfg.seed * 1000 + t``."""

    def complete(queries: Sequence[Query], attempt: int) -> list[str]:
        answers = sample(model, processor, queries, n=1, sampling=cfg.sampling,
                         seed=cfg.seed * 1000 + attempt, image_mask_rate=cfg.mask_rate,
                         batch_size=batch_size, stop=SENTENCE_STOPS,
                         description=f"BDHS try {attempt + 1}/{cfg.max_tries} "
                                     f"({len(queries)} sentences)")
        return [texts[0] for texts in answers]

    return complete


# ---- files -------------------------------------------------------------------------------

class AnswerRecord(BaseModel):
    """A line holding a good answer only: ``{"id"?, "image"|"images", "prompt", "answer",
    "metadata"?}`` (a preference line, with ``chosen`` and ``rejected``, works too)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: IdStr | None = None
    images: tuple[NonEmptyStr, ...] = Field(min_length=1)
    prompt: NonEmptyStr
    answer: NonEmptyStr
    metadata: PairMetadata = PairMetadata()


def _as_images(obj: dict[str, Any]) -> dict[str, Any]:
    """``"image": "a.png"`` -> ``"images": ["a.png"]`` (when only ``image`` is given)."""
    if "image" in obj and "images" not in obj and isinstance(obj["image"], str):
        return {**{k: v for k, v in obj.items() if k != "image"}, "images": [obj["image"]]}
    return obj


def _input(obj: dict[str, Any], line_no: int) -> BDHSInput:
    """The input a line describes (a preference line when it has ``chosen`` or
    ``rejected``, else an answer line); raises ValidationError when it breaks its schema."""
    if "chosen" not in obj and "rejected" not in obj:
        record = AnswerRecord.model_validate(_as_images(
            {k: v for k, v in obj.items() if k != "metadata" or v is not None}))
        return BDHSInput(record.id or f"line{line_no}", record.images, record.prompt,
                         record.answer, record.metadata)
    pref = PreferenceRecord.model_validate(obj)
    return BDHSInput(pref.id, pref.images, pref.prompt, pref.chosen, pref.metadata)


def read_bdhs_inputs(path: str | Path, *, check_images: bool = True) -> list[BDHSInput]:
    """The answers of a JSONL file of answer lines (``AnswerRecord``) or preference lines
    (their ``chosen``), image paths made absolute against the file's folder. Every problem
    (bad JSON, schema, duplicate ids, missing or unreadable images) is raised together as one
    ``DataValidationError`` naming the file and line (``read_checked_jsonl``)."""
    return [BDHSInput(item.id, images, item.prompt, item.answer, item.metadata)
            for item, images in read_checked_jsonl(path, _input, check_images=check_images)]


def bdhs_record(item: BDHSInput, result: BDHSResult) -> PreferenceRecord:
    """The preference pair (chosen = the good answer, rejected = BDHS's). Metadata is the
    source's, with ``error_kind: "bdhs"`` (the source's error_kind / hardness described its
    own rejected answer and are dropped) and ``bdhs: {tries, similarity, swapped,
    source_id}``; the id is ``<source id>-bdhs``."""
    kept = {k: v for k, v in item.metadata.model_dump().items()
            if k not in ("error_kind", "hardness", "hardness_score")}
    bdhs = {"tries": result.tries, "similarity": round(result.similarity, 6),
            "swapped": result.swapped, "source_id": item.id}
    return PreferenceRecord(id=f"{item.id}-bdhs", images=item.images, prompt=item.prompt,
                            chosen=item.answer, rejected=result.rejected,
                            metadata=PairMetadata(**kept, error_kind="bdhs", bdhs=bdhs))


@dataclass(frozen=True)
class BDHSSummary:
    """What ``make_bdhs_pairs`` wrote."""

    out: Path
    n_inputs: int
    n_pairs: int
    n_identical: int  # rejected came out equal to chosen: no pair written
    mean_tries: float
    share_max_tries: float  # of inputs whose some sentence used every try
    mean_similarity: float
    n_swapped: int

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "inputs": self.n_inputs, "pairs": self.n_pairs,
                "identical": self.n_identical, "mean_tries": self.mean_tries,
                "share_max_tries": self.share_max_tries,
                "mean_similarity": self.mean_similarity, "swapped": self.n_swapped}


def write_bdhs_pairs(out: str | Path, items: Sequence[BDHSInput],
                     results: Sequence[BDHSResult], *, max_tries: int) -> BDHSSummary:
    """Write the pairs atomically (images relative to OUT's folder when under it, else
    absolute); an input whose rejected answer equals its answer is left out and counted."""
    pairs = [bdhs_record(item, r) for item, r in zip(items, results, strict=True)
             if r.rejected.strip() != item.answer.strip()]
    path = write_preference_jsonl(out, pairs)
    n = max(len(results), 1)
    return BDHSSummary(
        out=path, n_inputs=len(items), n_pairs=len(pairs), n_identical=len(items) - len(pairs),
        mean_tries=sum(r.tries for r in results) / n,
        share_max_tries=sum(r.tries == max_tries for r in results) / n,
        mean_similarity=sum(r.similarity for r in results) / n,
        n_swapped=sum(r.swapped for r in results))


def make_bdhs_pairs(model: PreTrainedModel, processor: ProcessorMixin,
                    items: Sequence[BDHSInput], out: str | Path, cfg: BDHSConfig, *,
                    batch_size: int = 16, embed: Embed | None = None) -> BDHSSummary:
    """A BDHS rejection for every input (``read_bdhs_inputs``) made with ``model``, written
    to ``out`` as preference pairs (all or nothing). ``embed`` defaults to the installed
    all-MiniLM-L6-v2, loaded before any generation."""
    from dpalign.online.embed import sentence_embedder

    embed = embed or sentence_embedder().encode
    results = bdhs_rejections(items, masked_completer(model, processor, cfg,
                                                      batch_size=batch_size),
                              embed, seed=cfg.seed, max_tries=cfg.max_tries,
                              threshold=cfg.threshold)
    return write_bdhs_pairs(out, items, results, max_tries=cfg.max_tries)
