"""Hallucination figures of a VLM on a world: POPE per split, CHAIR and object recall.

POPE questions are answered by greedy generation and parsed with the POPE rule; the three
splits share their positive questions, so each distinct (image, question) is generated once.
Captions for the caption-eval images are generated greedily and scored with CHAIR against
the ground-truth objects, using the world's synonym list. Partner hallucinations (a
mentioned object that is the partner of a present one) are counted apart, because that is
the error the world's biased captions teach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, ProcessorMixin

from dpalign.eval.chair import SynonymMap, chair_metrics, extract_objects
from dpalign.eval.generate import generate
from dpalign.eval.pope import parse_yes_no, pope_metrics, read_pope_questions
from dpalign.io import read_jsonl
from dpalign.world.build import POPE_SPLITS
from dpalign.world.load import World
from dpalign.world.vocab import partner_of


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 64
    max_new_tokens: int = 40
    limit: int | None = None  # at most this many images per part (quick checks)
    splits: tuple[str, ...] = POPE_SPLITS  # the POPE splits answered


def _pope(model: PreTrainedModel, processor: ProcessorMixin, world: World,
          settings: EvalSettings) -> dict[str, dict[str, float | int]]:
    questions = {s: read_pope_questions(world.pope_file(s)) for s in settings.splits}
    if settings.limit is not None:
        images = sorted({q.image for qs in questions.values() for q in qs})[: settings.limit]
        questions = {s: [q for q in qs if q.image in images] for s, qs in questions.items()}
    keys = sorted({(q.image, q.text) for qs in questions.values() for q in qs})
    answers = generate(model, processor, [world.pope_images / img for img, _ in keys],
                       [text for _, text in keys], batch_size=settings.batch_size,
                       max_new_tokens=settings.max_new_tokens, description="POPE")
    said_yes = {key: parse_yes_no(a) for key, a in zip(keys, answers, strict=True)}
    return {s: pope_metrics([said_yes[(q.image, q.text)] for q in qs],
                            [q.label_yes for q in qs]).to_dict()
            for s, qs in questions.items()}


def _partner_rate(captions: list[str], truths: list[list[str]], synonyms: SynonymMap) -> float:
    """Fraction of captions that mention an absent partner of a present object."""
    hits = 0
    for caption, truth in zip(captions, truths, strict=True):
        partners = {partner_of(c) for c in truth} - set(truth)
        hits += any(obj in partners for obj in extract_objects(caption, synonyms))
    return hits / max(1, len(captions))


def _captions(model: PreTrainedModel, processor: ProcessorMixin, world: World,
              settings: EvalSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = read_jsonl(world.captions_file)[: settings.limit]
    folder = world.captions_file.parent
    captions = generate(model, processor, [folder / r["image"] for r in rows],
                        [r["prompt"] for r in rows], batch_size=settings.batch_size,
                        max_new_tokens=settings.max_new_tokens, description="captions")
    synonyms = SynonymMap.from_file(world.synonyms_file)
    truths = [list(r["objects"]) for r in rows]
    chair = chair_metrics(captions, truths, synonyms).to_dict()
    chair["partner_hallucination_rate"] = _partner_rate(captions, truths, synonyms)
    samples = [{"id": r["id"], "objects": r["objects"], "caption": c}
               for r, c in zip(rows, captions, strict=True)]
    return chair, samples


def evaluate_world(model: PreTrainedModel, processor: ProcessorMixin, world: World,
                   settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """POPE metrics per split, CHAIR (with recall) and generated captions, as one dict."""
    pope = _pope(model, processor, world, settings)
    chair, samples = _captions(model, processor, world, settings)
    return {"pope": pope, "chair": chair, "recall": chair["recall"], "captions": samples,
            "world": str(Path(world.root).resolve())}
