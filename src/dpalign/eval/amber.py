"""AMBER's generative-task metrics (Wang et al., 2023, arXiv 2311.07397), judge-free.

AMBER scores image descriptions by the objects they mention against each image's
annotated objects, and optionally against a per-image list of *hallucination-prone*
objects (objects that are absent but likely to be named, e.g. "fork" next to a plate).
The functions here are pure: they take the objects each caption mentions (one entry per
mention, e.g. from :func:`dpalign.eval.chair.extract_objects`) and the ground truth, and
they do not extract nouns themselves. The authors' pipeline extracts nouns with NLTK and
matches near-synonyms with spaCy vectors; with a CHAIR synonym list as the extractor the
numbers are of the same kind but not identical to published AMBER values.

Formulas, for captions k = 1..N with mentions M_k (a list: repeats count), ground truth
T_k (a set) and hallucination-prone objects H_k (a set; those also in T_k are dropped):

- CHAIR = sum_k |{m in M_k : m not in T_k}| / sum_k |M_k|   (micro over all mentions)
- Cover = sum_k |T_k ∩ M_k| / sum_k |T_k|                   (micro over all GT objects)
- cover_per_image = mean over k with T_k non-empty of |T_k ∩ M_k| / |T_k|
- Hal = |{k : some m in M_k is not in T_k}| / N              (per caption)
- Cog = sum_k |H_k ∩ M_k| / sum_k |H_k|                     (micro over prone objects)
- cog_of_hallucinated = sum_k |{m in M_k : m in H_k}| / sum_k |{m in M_k : m not in T_k}|

CHAIR, Cover, Hal and Cog follow the authors' scoring script (``inference.py`` in
junyangwang0410/AMBER), which sums counts over all captions before dividing; the paper
writes Cover per response, which ``cover_per_image`` reports averaged over images. The
paper writes Cog as |M ∩ H| / |M| per response while the script reports the share of
prone objects that were mentioned (Cog above); ``cog_of_hallucinated`` is the share of
hallucinated mentions that were prone ones. A ratio with a zero denominator is 0.0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["AmberMetrics", "amber_metrics"]


@dataclass(frozen=True)
class AmberMetrics:
    """AMBER generative scores (see the module docstring for each formula).

    ``cog`` and ``cog_of_hallucinated`` are ``None`` when no hallucination-prone lists
    were given; :meth:`to_dict` then leaves them out.
    """

    chair: float
    cover: float
    cover_per_image: float
    hal: float
    cog: float | None
    cog_of_hallucinated: float | None
    n_captions: int
    n_mentions: int
    n_hallucinated: int

    def to_dict(self) -> dict[str, float | int]:
        """The scores as a plain dict, without the Cog entries when they were not computed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is zero."""
    return numerator / denominator if denominator else 0.0


def _as_set(objects: Collection[str], name: str, index: int) -> frozenset[str]:
    """``objects`` as a set of names; a bare string is a caller error, not a set of letters."""
    if isinstance(objects, str):
        raise TypeError(f"{name}[{index}] is a string; pass a collection of object names")
    return frozenset(objects)


def amber_metrics(
    mentions: Sequence[Sequence[str]],
    truths: Sequence[Collection[str]],
    prone: Sequence[Collection[str]] | None = None,
) -> AmberMetrics:
    """AMBER CHAIR, Cover, Hal and (with ``prone``) Cog over a set of captions.

    ``mentions[k]`` lists the objects caption k mentions, one entry per mention;
    ``truths[k]`` the objects in its image; ``prone[k]`` (optional) the image's
    hallucination-prone objects. Names are compared exactly, so map synonyms first.

    Raises:
        ValueError: if there are no captions or the sequences differ in length.
        TypeError: if a ground-truth or prone entry is a bare string.
    """
    lengths = {"mentions": len(mentions), "truths": len(truths)}
    if prone is not None:
        lengths["prone"] = len(prone)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sequences differ in length: {lengths}")
    if not mentions:
        raise ValueError("cannot score an empty set of captions")
    prone_sets = [frozenset[str]()] * len(mentions) if prone is None else prone
    n_mentions = n_hallucinated = hal_captions = 0
    gt_total = gt_covered = prone_total = prone_mentioned = hallucinated_prone = 0
    per_image_cover: list[float] = []
    for k, (said, objects, risky) in enumerate(zip(mentions, truths, prone_sets, strict=True)):
        truth = _as_set(objects, "truths", k)
        likely = _as_set(risky, "prone", k) - truth
        wrong = [m for m in said if m not in truth]
        n_mentions += len(said)
        n_hallucinated += len(wrong)
        hal_captions += bool(wrong)
        covered = len(truth.intersection(said))
        gt_total += len(truth)
        gt_covered += covered
        if truth:
            per_image_cover.append(covered / len(truth))
        prone_total += len(likely)
        prone_mentioned += len(likely.intersection(said))
        hallucinated_prone += sum(m in likely for m in wrong)
    with_prone = prone is not None
    return AmberMetrics(
        chair=_ratio(n_hallucinated, n_mentions),
        cover=_ratio(gt_covered, gt_total),
        cover_per_image=_ratio(sum(per_image_cover), len(per_image_cover)),
        hal=hal_captions / len(mentions),
        cog=_ratio(prone_mentioned, prone_total) if with_prone else None,
        cog_of_hallucinated=_ratio(hallucinated_prone, n_hallucinated) if with_prone else None,
        n_captions=len(mentions),
        n_mentions=n_mentions,
        n_hallucinated=n_hallucinated,
    )
