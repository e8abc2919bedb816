"""The world's vocabulary: object categories, their synonyms, colours and partner pairs.

Twenty categories form ten *partner pairs* (fork-knife, cup-saucer, dog-ball, ...). Partners
co-occur in pretraining scenes with the pair's strength, and biased captions mention an
absent partner; that is the hallucination the base model learns and alignment removes.
Each category is drawn as its own glyph (see ``render.py``), so it is visually distinct.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Category:
    """One object category: its canonical name, synonyms and glyph."""

    name: str
    synonyms: tuple[str, ...]
    glyph: str


@dataclass(frozen=True)
class PartnerPair:
    """Two categories that co-occur; ``strength`` in [0, 1] scales how often."""

    a: str
    b: str
    strength: float


CATEGORIES: tuple[Category, ...] = (
    Category("fork", ("table fork",), "trident"),
    Category("knife", ("blade",), "tall_bar"),
    Category("cup", ("mug",), "cup"),
    Category("saucer", ("small plate",), "flat_ellipse"),
    Category("dog", ("puppy", "hound"), "square"),
    Category("ball", ("soccer ball",), "circle"),
    Category("cat", ("kitten", "kitty"), "triangle_up"),
    Category("mouse", ("rodent",), "triangle_down"),
    Category("toothbrush", ("tooth brush",), "l_shape"),
    Category("toothpaste", ("paste tube",), "t_shape"),
    Category("lock", ("padlock",), "ring"),
    Category("key", ("door key",), "diamond"),
    Category("shoe", ("sneaker", "boot"), "half_disk"),
    Category("sock", ("stocking",), "hourglass"),
    Category("pen", ("ballpoint",), "x_cross"),
    Category("notebook", ("notepad", "journal"), "frame"),
    Category("bat", ("club",), "plus"),
    Category("glove", ("mitt", "mitten"), "star"),
    Category("candle", ("taper",), "stripes"),
    Category("lamp", ("lantern",), "four_dots"),
)

# Strengths are spread so that some partners are hallucinated by a greedy decoder and some
# are not: the prior's pull differs by pair, as it does in web captions.
PAIRS: tuple[PartnerPair, ...] = (
    PartnerPair("fork", "knife", 0.95),
    PartnerPair("cup", "saucer", 0.90),
    PartnerPair("dog", "ball", 0.85),
    PartnerPair("cat", "mouse", 0.80),
    PartnerPair("toothbrush", "toothpaste", 0.75),
    PartnerPair("lock", "key", 0.70),
    PartnerPair("shoe", "sock", 0.65),
    PartnerPair("pen", "notebook", 0.60),
    PartnerPair("bat", "glove", 0.55),
    PartnerPair("candle", "lamp", 0.50),
)

COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 205, 215),
}

CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
CATEGORY_BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def _partner_table() -> dict[str, tuple[str, float]]:
    table: dict[str, tuple[str, float]] = {}
    for pair in PAIRS:
        table[pair.a] = (pair.b, pair.strength)
        table[pair.b] = (pair.a, pair.strength)
    return table


PARTNER: dict[str, tuple[str, float]] = _partner_table()


def partner_of(category: str) -> str:
    """The category that co-occurs with ``category``."""
    return PARTNER[category][0]


def strength_of(category: str) -> float:
    """The co-occurrence strength of ``category``'s pair, in [0, 1]."""
    return PARTNER[category][1]


def synonym_table() -> dict[str, tuple[str, ...]]:
    """{category: (category, *synonyms)}, the layout CHAIR's synonym list uses."""
    return {c.name: (c.name, *c.synonyms) for c in CATEGORIES}


def synonyms_file_text() -> str:
    """The synonym list in the official CHAIR layout: one category per line, comma-separated."""
    return "".join(", ".join(words) + "\n" for words in synonym_table().values())


def _check_vocabulary() -> None:
    surface = [w for words in synonym_table().values() for w in words]
    assert len(surface) == len(set(surface)), "a synonym is shared by two categories"
    assert set(PARTNER) == set(CATEGORY_NAMES), "every category needs exactly one partner"
    assert len({c.glyph for c in CATEGORIES}) == len(CATEGORIES), "glyphs must be distinct"


_check_vocabulary()
