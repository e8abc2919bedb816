"""COCO instance annotations as CHAIR ground truth, and CHAIR + AMBER scores of captions.

:func:`read_coco_instances` reads the standard COCO layout (``instances_val2014.json``):

    {"images": [{"id": 1, "file_name": "a.jpg", ...}],
     "annotations": [{"image_id": 1, "category_id": 18, ...}],
     "categories": [{"id": 18, "name": "dog", ...}]}

and returns, for every listed image, the set of category names annotated in it (an image
with no annotation maps to an empty set). :func:`load_coco_instances` also keeps each
image's id. :func:`read_coco_captions` reads a COCO captions file
(``captions_val2014.json``):

    {"images": [...], "annotations": [{"image_id": 1, "caption": "A dog on a sofa.", ...}]}

The CHAIR authors' ground truth for an image (``utils/chair.py`` in LisaAnne/Hallucination,
``CHAIR.get_annotations``) is the union of its instance categories and of the objects its
reference captions mention, found with the same word rules as the generated captions;
:func:`caption_objects` gives the latter. :func:`chair_scores` scores captions against a
ground truth with a CHAIR synonym list, by default under the CHAIR authors' COCO rules
(:data:`COCO_RULES`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpalign.eval.amber import amber_metrics
from dpalign.eval.chair import MentionFinder, SynonymMap, chair_metrics, mention_finder

__all__ = [
    "COCO_RULES",
    "CocoFormatError",
    "CocoInstances",
    "caption_objects",
    "chair_scores",
    "load_coco_instances",
    "read_coco_captions",
    "read_coco_instances",
]

COCO_RULES = "coco-official"  # the CHAIR rule set for COCO captions unless told otherwise


class CocoFormatError(ValueError):
    """A COCO instances or captions file does not follow the standard layout.

    The message names the file, the entry (e.g. ``annotations[12]``) and the problem;
    the same facts are available as ``path``, ``entry`` and ``problem``.
    """

    def __init__(self, path: str | os.PathLike[str], entry: str | None, problem: str) -> None:
        self.path = Path(path)
        self.entry = entry
        self.problem = problem
        where = f"{self.path}" if entry is None else f"{self.path}: {entry}"
        super().__init__(f"{where}: {problem}")


def _is_id(value: Any) -> bool:
    """COCO ids are integers (strings are accepted too; booleans are not)."""
    return not isinstance(value, bool) and isinstance(value, int | str)


def _is_text(value: Any) -> bool:
    """File names, category names and captions are strings."""
    return isinstance(value, str)


Check = Callable[[Any], bool]
_IMAGE_FIELDS: dict[str, Check] = {"id": _is_id, "file_name": _is_text}
_CATEGORY_FIELDS: dict[str, Check] = {"id": _is_id, "name": _is_text}
_ANNOTATION_FIELDS: dict[str, Check] = {"image_id": _is_id, "category_id": _is_id}
_CAPTION_FIELDS: dict[str, Check] = {"image_id": _is_id, "caption": _is_text}


def _entries(path: Path, doc: Mapping[str, Any], key: str,
             fields: dict[str, Check]) -> list[Mapping[str, Any]]:
    """``doc[key]`` checked to be a list of objects whose ``fields`` pass their checks."""
    if key not in doc:
        raise CocoFormatError(path, None, f"missing top-level key {key!r}")
    items = doc[key]
    if not isinstance(items, list):
        raise CocoFormatError(path, key, f"expected a list, got {type(items).__name__}")
    for index, item in enumerate(items):
        entry = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            raise CocoFormatError(path, entry, f"expected an object, got {type(item).__name__}")
        for field, valid in fields.items():
            if field not in item:
                raise CocoFormatError(path, entry, f"missing key {field!r}")
            if not valid(item[field]):
                raise CocoFormatError(path, entry, f"{field} has the wrong type: {item[field]!r}")
    return items


def _index(path: Path, key: str, items: list[Mapping[str, Any]], field: str,
           value: str) -> dict[Any, str]:
    """``{item[field]: item[value]}``; a repeated ``field`` is an error naming both entries."""
    seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        first = seen.setdefault(item[field], index)
        if first != index:
            raise CocoFormatError(path, f"{key}[{index}]",
                                  f"{field} {item[field]!r} repeats {key}[{first}]")
    return {item[field]: item[value] for item in items}


def _load(path: Path) -> Mapping[str, Any]:
    """The JSON object in ``path``; malformed JSON or another JSON value is an error."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CocoFormatError(path, None, f"malformed JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(doc, Mapping):
        raise CocoFormatError(path, None, f"expected a JSON object, got {type(doc).__name__}")
    return doc


@dataclass(frozen=True)
class CocoInstances:
    """The images of a COCO instances file: ``file_names`` (image id -> file name) and
    ``objects`` (file name -> set of annotated category names)."""

    file_names: Mapping[Any, str]
    objects: Mapping[str, set[str]]


def load_coco_instances(path: str | os.PathLike[str]) -> CocoInstances:
    """Image ids, file names and annotated category names of a COCO instances file.

    Raises:
        CocoFormatError: on malformed JSON, a missing top-level key, an entry that is not
            an object or lacks ``id``/``file_name``/``name``/``image_id``/``category_id``,
            a repeated image id, file name or category id, or an annotation whose
            ``image_id`` or ``category_id`` is not listed. The message names the file and
            the entry, e.g. ``annotations[3]: image_id 42 is not an id in images``.
    """
    path = Path(path)
    doc = _load(path)
    images = _entries(path, doc, "images", _IMAGE_FIELDS)
    categories = _entries(path, doc, "categories", _CATEGORY_FIELDS)
    annotations = _entries(path, doc, "annotations", _ANNOTATION_FIELDS)
    file_of = _index(path, "images", images, "id", "file_name")
    _index(path, "images", images, "file_name", "id")
    name_of = _index(path, "categories", categories, "id", "name")
    truth: dict[str, set[str]] = {name: set() for name in file_of.values()}
    for index, ann in enumerate(annotations):
        for field, known, listed in (("image_id", file_of, "images"),
                                     ("category_id", name_of, "categories")):
            if ann[field] not in known:
                raise CocoFormatError(path, f"annotations[{index}]",
                                      f"{field} {ann[field]!r} is not an id in {listed}")
        truth[file_of[ann["image_id"]]].add(name_of[ann["category_id"]])
    return CocoInstances(file_of, truth)


def read_coco_instances(path: str | os.PathLike[str]) -> dict[str, set[str]]:
    """``{image file_name: set of annotated category names}`` from a COCO instances file.

    Raises:
        CocoFormatError: as :func:`load_coco_instances`.
    """
    return dict(load_coco_instances(path).objects)


def read_coco_captions(path: str | os.PathLike[str]) -> dict[Any, list[str]]:
    """``{image_id: [reference captions, in file order]}`` from a COCO captions file.

    Only ``annotations`` is read (each entry needs an ``image_id`` and a string
    ``caption``); the ``images`` list is not needed, since captions join instance images
    by id, as in the CHAIR authors' script. Image ids are not checked against anything
    here: ids of images that are not evaluated are simply never looked up.

    Raises:
        CocoFormatError: on malformed JSON, no ``annotations`` list, or an entry that is
            not an object or lacks a valid ``image_id``/``caption``; the message names the
            file and the entry, e.g. ``annotations[3]: missing key 'caption'``.
    """
    path = Path(path)
    captions: dict[Any, list[str]] = {}
    for ann in _entries(path, _load(path), "annotations", _CAPTION_FIELDS):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return captions


def caption_objects(captions: Iterable[str], find_mentions: MentionFinder) -> set[str]:
    """The categories any of ``captions`` mentions (reference captions -> ground truth).

    This is the CHAIR authors' ``get_annotations_from_captions``: each reference caption
    goes through the same word rules as a generated one and its categories join the
    image's ground truth.
    """
    return {category for caption in captions for category in find_mentions(caption)}


def _categories(names: Collection[str], synonyms: SynonymMap, where: str) -> set[str]:
    """Ground-truth names mapped to synonym-list categories; unknown names are an error."""
    mapped = {name: synonyms.lookup(name) for name in names}
    unknown = sorted(name for name, category in mapped.items() if category is None)
    if unknown:
        raise ValueError(f"{where}: {unknown} not in the synonym list ({synonyms!r})")
    return {category for category in mapped.values() if category is not None}


def chair_scores(
    captions: Mapping[str, str],
    truth: Mapping[str, Collection[str]],
    synonyms: SynonymMap,
    prone: Mapping[str, Collection[str]] | None = None,
    *,
    rules: str = COCO_RULES,
) -> dict[str, Any]:
    """CHAIR (``chair_s``, ``chair_i``, ``recall``, counts) and AMBER scores of captions.

    ``captions`` maps an image file to its generated caption, ``truth`` the image file to
    its object names (e.g. from :func:`read_coco_instances`), ``prone`` (optional) to its
    hallucination-prone objects for AMBER's Cog. Names in ``truth``/``prone`` may be
    categories or synonyms of the list; both map to the category. Images are scored in
    sorted order; ``truth`` may hold more images than ``captions``. ``rules`` names the
    CHAIR rule set (:data:`dpalign.eval.chair.CHAIR_RULES`) that finds the mentions for
    both CHAIR and AMBER.
    Returns the :class:`~dpalign.eval.chair.ChairMetrics` fields (``rules`` included) plus
    ``"amber"``, the :class:`~dpalign.eval.amber.AmberMetrics` dict (CHAIR, Cover, Hal, Cog).

    Raises:
        ValueError: if there are no captions, a captioned image has no ground truth (or no
            prone list when ``prone`` is given), a name is not in the synonym list (the
            message names the image), or ``rules`` is unknown.
    """
    find_mentions = mention_finder(synonyms, rules)
    files = sorted(captions)
    for name, table in (("ground truth", truth), ("hallucination-prone list", prone)):
        missing = [f for f in files if table is not None and f not in table]
        if missing:
            raise ValueError(f"captioned images without a {name}: {missing[:5]}"
                             f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    truths = [_categories(truth[f], synonyms, f"ground truth of {f!r}") for f in files]
    texts = [captions[f] for f in files]
    likely = None if prone is None else [
        _categories(prone[f], synonyms, f"prone list of {f!r}") for f in files]
    mentions = [find_mentions(text) for text in texts]
    scores: dict[str, Any] = chair_metrics(texts, truths, synonyms, rules=rules).to_dict()
    scores["amber"] = amber_metrics(mentions, truths, likely).to_dict()
    return scores
