"""The world's splits as rows (dicts) plus the scenes their images show.

Each split draws from its own child of the world's ``SeedSequence``, so growing one split
never changes another. Rows name their image as ``images/<stem>.png`` relative to the
split's folder; ``build.py`` renders and writes them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpalign.world import text
from dpalign.world.config import WorldConfig
from dpalign.world.render import Scene
from dpalign.world.scenes import absent_partners, sample_scene
from dpalign.world.vocab import CATEGORY_NAMES, COLOUR_NAMES, strength_of

Row = dict[str, object]


@dataclass(frozen=True)
class Split:
    """Rows of one split file and the scenes to render, keyed by image stem."""

    rows: list[Row]
    scenes: dict[str, Scene]


def _image(stem: str) -> str:
    return f"images/{stem}.png"


def _other_colour(rng: np.random.Generator, colour: str) -> str:
    options = [c for c in COLOUR_NAMES if c != colour]
    return options[int(rng.integers(len(options)))]


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


# --------------------------------------------------------------------------- pretraining


def _biased_partner(rng: np.random.Generator, cfg: WorldConfig, scene: Scene) -> str | None:
    """An absent partner that a biased annotator mentions, or None (probability
    ``hallucination_rate * strength`` per absent partner, first hit wins)."""
    for partner in absent_partners(scene.categories):
        if rng.random() < cfg.hallucination_rate * strength_of(partner):
            return partner
    return None


def pretrain_rows(rng: np.random.Generator, cfg: WorldConfig, stem: str, scene: Scene) -> list[Row]:
    """Supervised examples for one image: a biased caption, existence questions (present ->
    yes; random absent -> no; absent partner -> biased) and a colour question."""
    rate = cfg.synonym_rate
    mentions = text.scene_mentions(rng, scene, rate)
    hallucinated = _biased_partner(rng, cfg, scene)
    if hallucinated is not None:
        mentions.append(text.mention(_pick(rng, list(COLOUR_NAMES)),
                                     text.noun(rng, hallucinated, rate)))
    absent = [c for c in CATEGORY_NAMES if c not in scene.categories]
    # Existence questions, balanced: up to two present objects (yes), two random absent
    # objects (no), then one absent partner answered by the biased annotator.
    asked = [scene.objects[int(j)] for j in rng.permutation(len(scene.objects))[:2]]
    qa: list[tuple[str, str, str, bool]] = [
        ("caption", text.CAPTION_PROMPT, text.join_caption(mentions), hallucinated is not None)]
    for obj in asked:
        word = text.noun(rng, obj.category, rate)
        qa.append(("existence", text.existence_question(word), text.yes_answer(obj.colour, word),
                   False))
    for j in rng.permutation(len(absent))[:2]:
        word = text.noun(rng, absent[int(j)], rate)
        qa.append(("existence", text.existence_question(word), text.no_answer(word), False))
    partners = absent_partners(scene.categories)
    if partners:
        partner = _pick(rng, partners)
        word = text.noun(rng, partner, rate)
        says_yes = bool(rng.random() < cfg.hallucination_rate * strength_of(partner))
        answer = (text.yes_answer(_pick(rng, list(COLOUR_NAMES)), word) if says_yes
                  else text.no_answer(word))
        qa.append(("existence", text.existence_question(word), answer, says_yes))
    colour_obj = scene.objects[int(rng.integers(len(scene.objects)))]
    colour_word = text.noun(rng, colour_obj.category, rate)
    qa.append(("colour", text.colour_question(colour_word),
               text.colour_answer(colour_word, colour_obj.colour), False))
    return [
        {"id": f"{stem}-{i}", "image": _image(stem), "task": task, "prompt": p, "response": r,
         "hallucinated": h}
        for i, (task, p, r, h) in enumerate(qa)
    ]


def pretrain_split(rng: np.random.Generator, cfg: WorldConfig) -> Split:
    rows: list[Row] = []
    scenes: dict[str, Scene] = {}
    for i in range(cfg.n_pretrain_images):
        stem = f"pre_{i:05d}"
        scenes[stem] = sample_scene(rng, cfg)
        rows.extend(pretrain_rows(rng, cfg, stem, scenes[stem]))
    return Split(rows, scenes)


# --------------------------------------------------------------------------- preference pairs
# Each builder returns (prompt, chosen, rejected, error_kind, hardness, hardness_score).
# hardness_score in [0, 1]: the pair's co-occurrence strength for a hallucinated partner
# (the prior pulls hardest there), 0.1 for a random absent object, 0.3 for a wrong colour.
PairParts = tuple[str, str, str, str, str, float]


def _caption_hallucination(rng: np.random.Generator, cfg: WorldConfig, scene: Scene,
                           hard: bool) -> PairParts:
    mentions = text.scene_mentions(rng, scene, cfg.synonym_rate)
    absent = [c for c in CATEGORY_NAMES if c not in scene.categories]
    partners = absent_partners(scene.categories)
    extra = _pick(rng, partners) if hard else _pick(rng, [c for c in absent if c not in partners])
    wrong = text.mention(_pick(rng, list(COLOUR_NAMES)), text.noun(rng, extra, cfg.synonym_rate))
    score = strength_of(extra) if hard else 0.1
    return (text.CAPTION_PROMPT, text.join_caption(mentions), text.join_caption([*mentions, wrong]),
            "hallucinated_object", "hard" if hard else "easy", score)


def _caption_colour(rng: np.random.Generator, cfg: WorldConfig, scene: Scene) -> PairParts:
    ordered = sorted(scene.objects, key=lambda o: o.cell)
    words = [text.noun(rng, o.category, cfg.synonym_rate) for o in ordered]
    k = int(rng.integers(len(ordered)))
    colours = [o.colour for o in ordered]
    bad = [*colours[:k], _other_colour(rng, colours[k]), *colours[k + 1:]]
    chosen = text.join_caption([text.mention(c, w) for c, w in zip(colours, words, strict=True)])
    rejected = text.join_caption([text.mention(c, w) for c, w in zip(bad, words, strict=True)])
    return text.CAPTION_PROMPT, chosen, rejected, "wrong_colour", "medium", 0.3


def _existence(rng: np.random.Generator, cfg: WorldConfig, scene: Scene, hard: bool) -> PairParts:
    partners = absent_partners(scene.categories)
    others = [c for c in CATEGORY_NAMES if c not in scene.categories and c not in partners]
    target = _pick(rng, partners) if hard else _pick(rng, others)
    word = text.noun(rng, target, cfg.synonym_rate)
    score = strength_of(target) if hard else 0.1
    return (text.existence_question(word), text.no_answer(word),
            text.yes_answer(_pick(rng, list(COLOUR_NAMES)), word),
            "hallucinated_object", "hard" if hard else "easy", score)


def _colour_question(rng: np.random.Generator, cfg: WorldConfig, scene: Scene) -> PairParts:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    word = text.noun(rng, obj.category, cfg.synonym_rate)
    return (text.colour_question(word), text.colour_answer(word, obj.colour),
            text.colour_answer(word, _other_colour(rng, obj.colour)), "wrong_colour", "medium", 0.3)


PairBuilder = Callable[[np.random.Generator, WorldConfig, Scene], PairParts]
PAIR_BUILDERS: dict[str, tuple[float, PairBuilder]] = {
    "caption_partner": (0.35, lambda r, c, s: _caption_hallucination(r, c, s, hard=True)),
    "caption_random": (0.15, lambda r, c, s: _caption_hallucination(r, c, s, hard=False)),
    "caption_colour": (0.15, _caption_colour),
    "existence_partner": (0.15, lambda r, c, s: _existence(r, c, s, hard=True)),
    "existence_random": (0.05, lambda r, c, s: _existence(r, c, s, hard=False)),
    "colour_question": (0.15, _colour_question),
}


def _assign_users(rng: np.random.Generator, cfg: WorldConfig, n: int, prefix: str) -> list[str]:
    """User ids for ``n`` pairs: consecutive blocks of ``pairs_per_user`` (inclusive) sizes."""
    low, high = cfg.pairs_per_user
    users: list[str] = []
    while len(users) < n:
        size = int(rng.integers(low, high + 1))
        users.extend([f"{prefix}-u{len(set(users)):04d}"] * size)
    return users[:n]


def preference_split(rng: np.random.Generator, cfg: WorldConfig, name: str, n: int) -> Split:
    """``n`` preference pairs, one per fresh image, in the dpalign preference schema."""
    kinds = list(PAIR_BUILDERS)
    weights = np.array([PAIR_BUILDERS[k][0] for k in kinds])
    rows: list[Row] = []
    scenes: dict[str, Scene] = {}
    for i in range(n):
        stem = f"{name}_{i:05d}"
        scenes[stem] = sample_scene(rng, cfg, require_absent_partner=True)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        prompt, chosen, rejected, error, hardness, score = PAIR_BUILDERS[kind][1](rng, cfg,
                                                                                  scenes[stem])
        rows.append({
            "id": f"{name}-{i:05d}", "images": [_image(stem)], "prompt": prompt,
            "chosen": chosen, "rejected": rejected,
            "metadata": {"error_kind": error, "hardness": hardness, "hardness_score": score,
                         "task": kind, "objects": list(scenes[stem].categories),
                         "colours": [o.colour for o in sorted(scenes[stem].objects,
                                                                key=lambda o: o.cell)]},
        })
    for row, user in zip(rows, _assign_users(rng, cfg, n, name), strict=True):
        row["metadata"]["user_id"] = user  # type: ignore[index]
    return Split(rows, scenes)


# --------------------------------------------------------------------------- evaluation


def object_frequencies(scenes: dict[str, Scene]) -> Counter[str]:
    """How many scenes hold each category (POPE's 'popular' ranking)."""
    return Counter(c for scene in scenes.values() for c in scene.categories)


def _negatives(rng: np.random.Generator, scene: Scene, m: int,
               popularity: Counter[str]) -> dict[str, list[str]]:
    absent = [c for c in CATEGORY_NAMES if c not in scene.categories]
    by_popularity = sorted(absent, key=lambda c: (-popularity[c], c))
    partners = absent_partners(scene.categories)
    return {
        "random": [absent[int(j)] for j in rng.permutation(len(absent))[:m]],
        "popular": by_popularity[:m],
        "adversarial": [partners[int(j)] for j in rng.permutation(len(partners))[:m]],
    }


def pope_splits(rng: np.random.Generator, cfg: WorldConfig,
                popularity: Counter[str]) -> tuple[dict[str, list[Row]], dict[str, Scene]]:
    """POPE questions in the official layout for the three negative-sampling settings.

    Per image, the same m = min(3, #present, #absent partners) present objects are asked
    (label yes) in all three splits, each followed by one negative (label no): a random
    absent object, the most frequent absent objects, or absent partners of present objects.
    """
    splits: dict[str, list[Row]] = {"random": [], "popular": [], "adversarial": []}
    scenes: dict[str, Scene] = {}
    for i in range(cfg.n_pope_images):
        stem = f"pope_{i:05d}"
        scene = scenes[stem] = sample_scene(rng, cfg, require_absent_partner=True)
        m = min(3, len(scene.categories), len(absent_partners(scene.categories)))
        positives = [scene.categories[int(j)] for j in rng.permutation(len(scene.categories))[:m]]
        for split, negatives in _negatives(rng, scene, m, popularity).items():
            for yes, no in zip(positives, negatives, strict=True):
                for obj, label in ((yes, "yes"), (no, "no")):
                    splits[split].append({
                        "question_id": len(splits[split]) + 1, "image": f"{stem}.png",
                        "text": text.existence_question(obj), "label": label,
                    })
    return splits, scenes


def caption_split(rng: np.random.Generator, cfg: WorldConfig) -> Split:
    """Caption-evaluation images with their ground-truth objects and colours."""
    rows: list[Row] = []
    scenes: dict[str, Scene] = {}
    for i in range(cfg.n_caption_images):
        stem = f"cap_{i:05d}"
        scene = scenes[stem] = sample_scene(rng, cfg, require_absent_partner=True)
        ordered = sorted(scene.objects, key=lambda o: o.cell)
        rows.append({"id": stem, "image": _image(stem), "prompt": text.CAPTION_PROMPT,
                     "objects": [o.category for o in ordered],
                     "colours": [o.colour for o in ordered]})
    return Split(rows, scenes)
