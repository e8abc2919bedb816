"""Hallucination figures on published files: POPE question files and COCO-annotated captions.

Two judge-free evaluations of any VLM on benchmark files in their published layouts:

- POPE: an official question file (``coco_pope_{random,popular,adversarial}.json``, one
  JSON object per line) and the folder holding its images. Answers are generated
  greedily, reduced to yes/no by the POPE rule and scored (accuracy, precision, recall,
  F1, yes-ratio); every per-question answer is kept in the result.
- Captions: a COCO instances file (``instances_val2014.json``) and its image folder,
  optionally with the COCO reference captions file (``captions_val2014.json``).
  Captions are generated greedily and scored with CHAIR and AMBER's generative metrics
  (:func:`dpalign.eval.coco.chair_scores`) against each image's ground truth, by default
  under the CHAIR authors' COCO rules (``"coco-official"``); the result's ``"rules"``
  names the rule set used. The ground truth is the annotated categories, plus, when a
  captions file is given, the objects its reference captions for that image mention
  under the same rules -- the CHAIR authors' ground truth, needed for numbers comparable
  with published CHAIR values; the result's ``"ground_truth"`` says which
  (``"instances"`` or ``"instances+captions"``).

Inputs are read and checked first (:func:`plan_published`): a missing image, an unknown
category or a malformed file is reported, naming the file and the entry, before any
generation starts. :func:`run_published` then generates and scores.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, ProcessorMixin

from dpalign.eval.amber import AmberMetrics, amber_metrics
from dpalign.eval.chair import CHAIR_RULES, SynonymMap, mention_finder
from dpalign.eval.coco import (
    COCO_RULES,
    CocoFormatError,
    caption_objects,
    chair_scores,
    load_coco_instances,
    read_coco_captions,
    read_coco_instances,
)
from dpalign.eval.generate import generate
from dpalign.eval.pope import PopeQuestion, parse_yes_no, pope_metrics, read_pope_questions

__all__ = [
    "CAPTION_PROMPT",
    "COCO_RULES",
    "AmberMetrics",
    "CaptionTask",
    "CocoFormatError",
    "PopeTask",
    "PublishedInputError",
    "PublishedPlan",
    "amber_metrics",
    "caption_objects",
    "chair_from_coco",
    "chair_scores",
    "default_synonyms_file",
    "load_caption_task",
    "load_pope_task",
    "plan_published",
    "plan_warnings",
    "pope_from_file",
    "read_coco_captions",
    "read_coco_instances",
    "run_published",
]

CAPTION_PROMPT = "Describe this image."  # AMBER's generative-task prompt
POPE_MAX_NEW_TOKENS = 16  # the POPE rule reads the first sentence only
CAPTION_MAX_NEW_TOKENS = 128
SYNONYMS_ENV = "DPALIGN_CHAIR_SYNONYMS"
# The CHAIR authors' COCO synonym list, shipped inside the package (BSD-2, licence beside it).
PACKAGED_SYNONYMS = Path(__file__).resolve().parent / "data" / "coco_synonyms.txt"


class PublishedInputError(ValueError):
    """Inputs that cannot be evaluated: a missing image or folder, an unknown category,
    an option missing; the message names the file and the entry concerned."""


@dataclass(frozen=True)
class PopeTask:
    """The questions of one POPE file to answer (all of them, or those of the first images)."""

    file: Path
    questions: tuple[PopeQuestion, ...]

    @property
    def label(self) -> str:
        """The name its results go under: the file name without extension."""
        return self.file.stem


@dataclass(frozen=True)
class CaptionTask:
    """Images to caption, with their ground-truth objects, from one COCO instances file
    and, optionally, one COCO captions file (``captions_file``).

    ``truth`` is what captions are scored against: an image's annotated categories, plus
    (with a captions file) ``from_captions``, the objects its reference captions mention
    under ``rules``; ``n_references`` counts those reference captions per image.
    """

    file: Path
    truth: Mapping[str, frozenset[str]]  # image file name -> objects, in caption order
    synonyms: SynonymMap
    prompt: str = CAPTION_PROMPT
    rules: str = COCO_RULES  # the CHAIR rule set, a key of dpalign.eval.chair.CHAIR_RULES
    captions_file: Path | None = None
    from_captions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    n_references: Mapping[str, int] = field(default_factory=dict)

    @property
    def ground_truth(self) -> str:
        """Where ``truth`` comes from: ``"instances"`` or ``"instances+captions"``."""
        return "instances" if self.captions_file is None else "instances+captions"

    @property
    def without_references(self) -> list[str]:
        """Images to caption that have no reference caption (none when no captions file)."""
        if self.captions_file is None:
            return []
        return [name for name in self.truth if not self.n_references[name]]


@dataclass(frozen=True)
class PublishedPlan:
    """Checked inputs of a published-files evaluation: every image exists."""

    images: Path
    pope: tuple[PopeTask, ...] = ()
    captions: CaptionTask | None = None


def _first(names: Iterable[str], limit: int | None) -> list[str]:
    """The distinct names in order of first appearance, at most ``limit`` of them."""
    distinct = list(dict.fromkeys(names))
    return distinct if limit is None else distinct[:limit]


def _check_images(image_dir: Path, entries: Sequence[tuple[str, str]], file: Path) -> None:
    """Raise naming ``file``, the entry and the path of the first missing image, if any."""
    if not image_dir.is_dir():
        raise PublishedInputError(f"{file}: image folder not found: {image_dir}")
    missing = [(where, image_dir / name) for where, name in entries
               if not (image_dir / name).is_file()]
    if missing:
        where, path = missing[0]
        more = f" (and {len(missing) - 1} more entries)" if len(missing) > 1 else ""
        raise PublishedInputError(f"{file}, {where}: image not found: {path}{more}")


def load_pope_task(questions_file: str | os.PathLike[str], image_dir: str | os.PathLike[str],
                   limit: int | None = None) -> PopeTask:
    """Read a POPE file, keep the questions of its first ``limit`` images, check the images.

    Raises:
        PopeFormatError: if the file is malformed (names the file and line).
        PublishedInputError: if an image is missing (names the file, the line, the
            question_id and the path).
    """
    file = Path(questions_file)
    questions = read_pope_questions(file)
    with open(file, encoding="utf-8") as handle:  # the reader skips blank lines; so do we
        lines = [n for n, text in enumerate(handle, start=1) if text.strip()]
    kept = set(_first((q.image for q in questions), limit))
    chosen = [(line, q) for line, q in zip(lines, questions, strict=True) if q.image in kept]
    _check_images(Path(image_dir), [(f"line {line} (question_id {q.question_id})", q.image)
                                    for line, q in chosen], file)
    return PopeTask(file, tuple(q for _, q in chosen))


def _check_rules(rules: str) -> None:
    """Raise :class:`PublishedInputError` naming the known rule sets if ``rules`` is not one."""
    if rules not in CHAIR_RULES:
        raise PublishedInputError(f"unknown CHAIR rule set {rules!r}; known: "
                                  f"{', '.join(sorted(CHAIR_RULES))}")


def load_caption_task(instances_file: str | os.PathLike[str], image_dir: str | os.PathLike[str],
                      synonyms: SynonymMap, *, limit: int | None = None,
                      prompt: str = CAPTION_PROMPT, rules: str = COCO_RULES,
                      captions_file: str | os.PathLike[str] | None = None) -> CaptionTask:
    """Read a COCO instances file, keep its first ``limit`` images (by file name), check them.

    ``rules`` is the CHAIR rule set the captions will be scored with. With
    ``captions_file`` (COCO captions layout), each kept image's ground truth also holds
    the objects its reference captions (joined by image id) mention under ``rules``, as
    the CHAIR authors build it; captions of other image ids are ignored.

    Raises:
        CocoFormatError: if either file is malformed (names the file and entry).
        PublishedInputError: if an image is missing, a category is not in the synonym list
            or ``rules`` is not a known rule set.
    """
    _check_rules(rules)
    file = Path(instances_file)
    instances = load_coco_instances(file)
    references = None if captions_file is None else read_coco_captions(captions_file)
    truth = instances.objects
    names = _first(sorted(truth), limit)
    unknown = sorted({c for name in names for c in truth[name] if synonyms.lookup(c) is None})
    if unknown:
        raise PublishedInputError(f"{file}: categories {unknown} are not in the CHAIR synonym "
                                  f"list ({synonyms!r}); pass a list that has them")
    _check_images(Path(image_dir), [(f"image {name!r}", name) for name in names], file)
    annotated = {name: frozenset(truth[name]) for name in names}
    if references is None or captions_file is None:
        return CaptionTask(file, annotated, synonyms, prompt, rules)
    id_of = {name: image_id for image_id, name in instances.file_names.items()}
    texts = {name: references.get(id_of[name], []) for name in names}
    find_mentions = mention_finder(synonyms, rules)
    found = {name: frozenset(caption_objects(texts[name], find_mentions)) for name in names}
    return CaptionTask(file, {name: annotated[name] | found[name] for name in names}, synonyms,
                       prompt, rules, Path(captions_file), found,
                       {name: len(texts[name]) for name in names})


def _pope_results(model: PreTrainedModel, processor: ProcessorMixin, tasks: Sequence[PopeTask],
                  image_dir: Path, batch_size: int) -> dict[str, dict[str, Any]]:
    """Answer every distinct (image, question) once, then score each file."""
    keys = sorted({(q.image, q.text) for task in tasks for q in task.questions})
    answers = dict(zip(keys, generate(
        model, processor, [image_dir / image for image, _ in keys], [text for _, text in keys],
        batch_size=batch_size, max_new_tokens=POPE_MAX_NEW_TOKENS, description="POPE"),
        strict=True))
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        rows = [{"question_id": q.question_id, "image": q.image, "label": q.label,
                 "answer": answers[(q.image, q.text)],
                 "yes": parse_yes_no(answers[(q.image, q.text)])} for q in task.questions]
        metrics = pope_metrics([r["yes"] for r in rows], [q.label_yes for q in task.questions])
        results[task.label] = {**metrics.to_dict(), "file": str(task.file), "answers": rows}
    return results


def pope_from_file(model: PreTrainedModel, processor: ProcessorMixin,
                   questions_file: str | os.PathLike[str], image_dir: str | os.PathLike[str], *,
                   batch_size: int = 64, limit: int | None = None) -> dict[str, Any]:
    """POPE metrics (accuracy, precision, recall, f1, yes_ratio, n) of a model on one file.

    Also returns ``file`` and ``answers`` (per question: question_id, image, label, the
    generated answer and ``yes``, its parsed value). ``limit`` keeps the questions of the
    first ``limit`` images in file order. Images are checked before generation.
    """
    task = load_pope_task(questions_file, image_dir, limit)
    return _pope_results(model, processor, [task], Path(image_dir), batch_size)[task.label]


def _caption_results(model: PreTrainedModel, processor: ProcessorMixin, task: CaptionTask,
                     image_dir: Path, batch_size: int) -> dict[str, Any]:
    """Caption every image of ``task`` and score the captions with CHAIR and AMBER.

    The result names the rule set (``"rules"``) and the ground truth's source
    (``"ground_truth"``); each caption lists its ground-truth objects and its mentions.
    With reference captions, the result also has ``"reference_captions"`` (file, number
    of captions read, images without any) and each caption the objects its image's
    reference captions name (``"from_captions"``).
    """
    names = list(task.truth)
    texts = generate(model, processor, [image_dir / n for n in names],
                     [task.prompt] * len(names), batch_size=batch_size,
                     max_new_tokens=CAPTION_MAX_NEW_TOKENS, description="captions")
    captions = dict(zip(names, texts, strict=True))
    scores = chair_scores(captions, task.truth, task.synonyms, rules=task.rules)
    find_mentions = mention_finder(task.synonyms, task.rules)
    samples = [{"image": n, "objects": sorted(task.truth[n]), "caption": captions[n],
                "mentions": find_mentions(captions[n])} for n in names]
    result = {**scores, "ground_truth": task.ground_truth, "file": str(task.file),
              "prompt": task.prompt}
    if task.captions_file is not None:
        result["reference_captions"] = {"file": str(task.captions_file),
                                        "captions": sum(task.n_references.values()),
                                        "images_without": len(task.without_references)}
        for sample in samples:
            sample["from_captions"] = sorted(task.from_captions[sample["image"]])
    return {**result, "captions": samples}


def chair_from_coco(model: PreTrainedModel, processor: ProcessorMixin,
                    instances_file: str | os.PathLike[str], image_dir: str | os.PathLike[str],
                    synonyms: SynonymMap | str | os.PathLike[str], *, batch_size: int = 64,
                    limit: int | None = None, prompt: str = CAPTION_PROMPT,
                    rules: str = COCO_RULES,
                    captions_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Caption the images of a COCO instances file and score them (CHAIR and AMBER).

    ``synonyms`` is a :class:`SynonymMap` or the path of a CHAIR synonym list; ``limit``
    keeps the first ``limit`` images by file name; ``rules`` is the CHAIR rule set
    (default: the CHAIR authors' COCO rules); ``captions_file`` a COCO captions file
    whose reference captions add objects to the ground truth (the CHAIR authors' ground
    truth). Returns :func:`chair_scores`'s dict (with ``rules``) plus ``ground_truth``,
    ``file``, ``prompt`` and ``captions`` (per image: objects, caption, mentions), and
    with ``captions_file`` the fields :func:`_caption_results` adds.
    """
    words = synonyms if isinstance(synonyms, SynonymMap) else SynonymMap.from_file(synonyms)
    task = load_caption_task(instances_file, image_dir, words, limit=limit, prompt=prompt,
                             rules=rules, captions_file=captions_file)
    return _caption_results(model, processor, task, Path(image_dir), batch_size)


def default_synonyms_file() -> Path:
    """The COCO CHAIR synonym list used when none is given.

    ``$DPALIGN_CHAIR_SYNONYMS`` when set; otherwise the list shipped in the package
    (``dpalign/eval/data/coco_synonyms.txt``, the CHAIR authors' ``data/synonyms.txt``
    unchanged, with its BSD-2 licence in ``LICENSE-coco-synonyms.txt``).

    Raises:
        PublishedInputError: if that file does not exist.
    """
    candidate = Path(os.environ.get(SYNONYMS_ENV, PACKAGED_SYNONYMS))
    if not candidate.is_file():
        raise PublishedInputError(f"no CHAIR synonym list at {candidate}; pass --synonyms FILE")
    return candidate


def plan_published(images: str | os.PathLike[str] | None,
                   pope_files: Sequence[str | os.PathLike[str]] = (),
                   coco_instances: str | os.PathLike[str] | None = None,
                   synonyms_file: str | os.PathLike[str] | None = None, *,
                   limit: int | None = None, prompt: str | None = None,
                   chair_rules: str = COCO_RULES,
                   coco_captions: str | os.PathLike[str] | None = None) -> PublishedPlan | None:
    """Read and check the published inputs; ``None`` when neither POPE nor COCO is given.

    ``prompt`` is the caption prompt (default :data:`CAPTION_PROMPT`, AMBER's);
    ``chair_rules`` the CHAIR rule set for the captions (default: the authors' COCO rules);
    ``coco_captions`` a COCO captions file whose reference captions join the ground truth.

    Raises:
        PublishedInputError: if ``images`` is missing, two POPE files share a name, an
            image or category is missing, ``chair_rules`` is unknown, or
            ``coco_captions`` comes without ``coco_instances``;
            PopeFormatError / CocoFormatError on bad files.
    """
    _check_rules(chair_rules)
    if coco_captions is not None and coco_instances is None:
        raise PublishedInputError("--coco-captions needs --coco-instances FILE")
    if not pope_files and coco_instances is None:
        return None
    if images is None:
        raise PublishedInputError("--pope-file and --coco-instances need --images DIR")
    tasks = tuple(load_pope_task(f, images, limit) for f in pope_files)
    labels = [t.label for t in tasks]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise PublishedInputError(f"POPE files must have distinct names; repeated: {repeated}")
    captions = None
    if coco_instances is not None:
        synonyms = SynonymMap.from_file(synonyms_file or default_synonyms_file())
        captions = load_caption_task(coco_instances, images, synonyms, limit=limit,
                                     prompt=prompt or CAPTION_PROMPT, rules=chair_rules,
                                     captions_file=coco_captions)
    return PublishedPlan(Path(images), tasks, captions)


def plan_warnings(plan: PublishedPlan | None) -> list[str]:
    """Why a plan's CHAIR numbers may not compare with published ones (empty if no reason).

    Under the ``coco-official`` rules without reference captions the ground truth lacks
    the objects the CHAIR authors take from them, so hallucination counts run higher;
    with reference captions, images that have none get no such objects.
    """
    task = None if plan is None else plan.captions
    if task is None:
        return []
    if task.captions_file is None:
        if task.rules != COCO_RULES:
            return []
        return ["CHAIR ground truth is the --coco-instances annotations only; the CHAIR "
                "authors also count objects named in the COCO reference captions "
                "(--coco-captions FILE), so hallucination counts here run higher and are "
                "not directly comparable with published CHAIR numbers"]
    missing = task.without_references
    if not missing:
        return []
    return [f"{len(missing)} of {len(task.truth)} images have no reference caption in "
            f"{task.captions_file} (e.g. {missing[0]!r}); is it the captions file of the "
            f"instances file's split?"]


def run_published(model: PreTrainedModel, processor: ProcessorMixin, plan: PublishedPlan, *,
                  batch_size: int = 64) -> dict[str, Any]:
    """``{"images", "pope": {file name: results}, "chair": results}`` for a checked plan.

    ``"pope"`` is present when the plan has POPE files, ``"chair"`` when it has captions.
    """
    report: dict[str, Any] = {"images": str(plan.images.resolve())}
    if plan.pope:
        report["pope"] = _pope_results(model, processor, plan.pope, plan.images, batch_size)
    if plan.captions is not None:
        report["chair"] = _caption_results(model, processor, plan.captions, plan.images,
                                           batch_size)
    return report
