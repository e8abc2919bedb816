"""COCO instance annotations as CHAIR ground truth, and CHAIR + AMBER scores of captions.

:func:`read_coco_instances` reads the standard COCO layout (``instances_val2014.json``):

    {"images": [{"id": 1, "file_name": "a.jpg", ...}],
     "annotations": [{"image_id": 1, "category_id": 18, ...}],
     "categories": [{"id": 18, "name": "dog", ...}]}

and returns, for every listed image, the set of category names annotated in it (an image
with no annotation maps to an empty set). :func:`chair_scores` scores captions against
that ground truth with a CHAIR synonym list. Ground truth here is the segmentation
annotations only; the CHAIR authors also add objects named in the reference captions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from dpalign.eval.amber import amber_metrics
from dpalign.eval.chair import SynonymMap, chair_metrics, extract_objects

__all__ = ["CocoFormatError", "chair_scores", "read_coco_instances"]


class CocoFormatError(ValueError):
    """A COCO instances file does not follow the standard layout.

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
    """File and category names are strings."""
    return isinstance(value, str)


Check = Callable[[Any], bool]
_IMAGE_FIELDS: dict[str, Check] = {"id": _is_id, "file_name": _is_text}
_CATEGORY_FIELDS: dict[str, Check] = {"id": _is_id, "name": _is_text}
_ANNOTATION_FIELDS: dict[str, Check] = {"image_id": _is_id, "category_id": _is_id}


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


def read_coco_instances(path: str | os.PathLike[str]) -> dict[str, set[str]]:
    """``{image file_name: set of annotated category names}`` from a COCO instances file.

    Raises:
        CocoFormatError: on malformed JSON, a missing top-level key, an entry that is not
            an object or lacks ``id``/``file_name``/``name``/``image_id``/``category_id``,
            a repeated image id, file name or category id, or an annotation whose
            ``image_id`` or ``category_id`` is not listed. The message names the file and
            the entry, e.g. ``annotations[3]: image_id 42 is not an id in images``.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CocoFormatError(path, None, f"malformed JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(doc, Mapping):
        raise CocoFormatError(path, None, f"expected a JSON object, got {type(doc).__name__}")
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
    return truth


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
) -> dict[str, Any]:
    """CHAIR (``chair_s``, ``chair_i``, ``recall``, counts) and AMBER scores of captions.

    ``captions`` maps an image file to its generated caption, ``truth`` the image file to
    its object names (e.g. from :func:`read_coco_instances`), ``prone`` (optional) to its
    hallucination-prone objects for AMBER's Cog. Names in ``truth``/``prone`` may be
    categories or synonyms of the list; both map to the category. Images are scored in
    sorted order; ``truth`` may hold more images than ``captions``.
    Returns the :class:`~dpalign.eval.chair.ChairMetrics` fields plus ``"amber"``, the
    :class:`~dpalign.eval.amber.AmberMetrics` dict (CHAIR, Cover, Hal, Cog).

    Raises:
        ValueError: if there are no captions, a captioned image has no ground truth (or no
            prone list when ``prone`` is given), or a name is not in the synonym list;
            the message names the image.
    """
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
    mentions = [extract_objects(text, synonyms) for text in texts]
    scores: dict[str, Any] = chair_metrics(texts, truths, synonyms).to_dict()
    scores["amber"] = amber_metrics(mentions, truths, likely).to_dict()
    return scores
