"""Render scenes to RGB images: each category is a distinct glyph filled with its colour.

A scene is drawn on a ``grid x grid`` layout of cells; each object fills most of its cell
with a small, seeded jitter of position, size and colour so that no two images are
pixel-identical, yet every glyph stays recognisable. Rendering is a pure function of the
scene, so the same scene gives byte-identical PNGs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

from dpalign.world.vocab import CATEGORY_BY_NAME, COLOURS, RGB

Box = tuple[float, float, float, float]
GlyphFn = Callable[[ImageDraw.ImageDraw, Box, RGB], None]
BACKGROUND: RGB = (28, 28, 32)


@dataclass(frozen=True)
class PlacedObject:
    """One object of a scene: category, colour name, grid cell and render jitter."""

    category: str
    colour: str
    cell: int
    dx: int = 0
    dy: int = 0
    scale: float = 1.0
    tint: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Scene:
    """Objects at distinct cells of a ``grid x grid`` image of ``size`` pixels."""

    objects: tuple[PlacedObject, ...]
    size: int = 64
    grid: int = 2

    @property
    def categories(self) -> tuple[str, ...]:
        """Categories in reading order (by cell)."""
        return tuple(o.category for o in sorted(self.objects, key=lambda o: o.cell))


def _lerp(box: Box, fx: float, fy: float) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)


def _poly(draw: ImageDraw.ImageDraw, box: Box, fill: RGB, pts: list[tuple[float, float]]) -> None:
    draw.polygon([_lerp(box, fx, fy) for fx, fy in pts], fill=fill)


def _rect(draw: ImageDraw.ImageDraw, box: Box, fill: RGB, fx0: float, fy0: float,
          fx1: float, fy1: float) -> None:
    draw.rectangle([*_lerp(box, fx0, fy0), *_lerp(box, fx1, fy1)], fill=fill)


def _rects(draw: ImageDraw.ImageDraw, box: Box, fill: RGB,
           *parts: tuple[float, float, float, float]) -> None:
    for part in parts:
        _rect(draw, box, fill, *part)


def _width(box: Box, frac: float) -> int:
    return max(1, round((box[2] - box[0]) * frac))


def _star(draw: ImageDraw.ImageDraw, box: Box, fill: RGB) -> None:
    pts = []
    for i in range(10):
        r = 0.5 if i % 2 == 0 else 0.2
        ang = -math.pi / 2 + i * math.pi / 5
        pts.append((0.5 + r * math.cos(ang), 0.52 + r * math.sin(ang)))
    _poly(draw, box, fill, pts)


def _x_cross(draw: ImageDraw.ImageDraw, box: Box, fill: RGB) -> None:
    for (fx0, fy0), (fx1, fy1) in (((0.05, 0.05), (0.95, 0.95)), ((0.95, 0.05), (0.05, 0.95))):
        draw.line([*_lerp(box, fx0, fy0), *_lerp(box, fx1, fy1)], fill=fill,
                  width=_width(box, 0.22))


def _four_dots(draw: ImageDraw.ImageDraw, box: Box, fill: RGB) -> None:
    for cx in (0.27, 0.73):
        for cy in (0.27, 0.73):
            draw.ellipse([*_lerp(box, cx - 0.2, cy - 0.2), *_lerp(box, cx + 0.2, cy + 0.2)],
                         fill=fill)


def _stripes(draw: ImageDraw.ImageDraw, box: Box, fill: RGB) -> None:
    for fy in (0.05, 0.4, 0.75):
        _rect(draw, box, fill, 0.0, fy, 1.0, fy + 0.2)


def _trident(draw: ImageDraw.ImageDraw, box: Box, fill: RGB) -> None:
    for fx in (0.15, 0.42, 0.69):
        _rect(draw, box, fill, fx, 0.0, fx + 0.16, 0.45)
    _rect(draw, box, fill, 0.15, 0.4, 0.85, 0.55)
    _rect(draw, box, fill, 0.42, 0.55, 0.58, 1.0)


def _cup(draw: ImageDraw.ImageDraw, box: Box, fill: RGB) -> None:
    _rect(draw, box, fill, 0.05, 0.2, 0.7, 0.95)
    draw.ellipse([*_lerp(box, 0.55, 0.35), *_lerp(box, 0.98, 0.75)], outline=fill,
                 width=_width(box, 0.1))


GLYPHS: dict[str, GlyphFn] = {
    "circle": lambda d, b, f: d.ellipse([*_lerp(b, 0.05, 0.05), *_lerp(b, 0.95, 0.95)], fill=f),
    "square": lambda d, b, f: _rect(d, b, f, 0.1, 0.1, 0.9, 0.9),
    "triangle_up": lambda d, b, f: _poly(d, b, f, [(0.5, 0.02), (0.98, 0.95), (0.02, 0.95)]),
    "triangle_down": lambda d, b, f: _poly(d, b, f, [(0.02, 0.05), (0.98, 0.05), (0.5, 0.98)]),
    "diamond": lambda d, b, f: _poly(d, b, f, [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]),
    "plus": lambda d, b, f: _rects(d, b, f, (0.35, 0.0, 0.65, 1.0), (0.0, 0.35, 1.0, 0.65)),
    "x_cross": _x_cross,
    "ring": lambda d, b, f: d.ellipse([*_lerp(b, 0.05, 0.05), *_lerp(b, 0.95, 0.95)], outline=f,
                                      width=_width(b, 0.2)),
    "frame": lambda d, b, f: d.rectangle([*_lerp(b, 0.05, 0.05), *_lerp(b, 0.95, 0.95)],
                                         outline=f, width=_width(b, 0.18)),
    "flat_ellipse": lambda d, b, f: d.ellipse([*_lerp(b, 0.0, 0.3), *_lerp(b, 1.0, 0.7)], fill=f),
    "tall_bar": lambda d, b, f: _poly(d, b, f, [(0.38, 0.15), (0.5, 0.0), (0.62, 0.15),
                                                (0.62, 1.0), (0.38, 1.0)]),
    "half_disk": lambda d, b, f: d.pieslice([*_lerp(b, 0.0, 0.2), *_lerp(b, 1.0, 1.2)], 180, 360,
                                            fill=f),
    "hourglass": lambda d, b, f: _poly(d, b, f, [(0.05, 0.02), (0.95, 0.02), (0.05, 0.98),
                                                 (0.95, 0.98)]),
    "l_shape": lambda d, b, f: _rects(d, b, f, (0.1, 0.0, 0.4, 1.0), (0.1, 0.7, 0.95, 1.0)),
    "t_shape": lambda d, b, f: _rects(d, b, f, (0.0, 0.0, 1.0, 0.3), (0.35, 0.0, 0.65, 1.0)),
    "star": _star,
    "four_dots": _four_dots,
    "stripes": _stripes,
    "trident": _trident,
    "cup": _cup,
}


def object_rgb(obj: PlacedObject) -> RGB:
    """The object's colour after its small tint jitter, clipped to [0, 255]."""
    base = COLOURS[obj.colour]
    return tuple(min(255, max(0, c + t)) for c, t in zip(base, obj.tint, strict=True))  # type: ignore[return-value]


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``scene.size`` x ``scene.size`` pixels."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = scene.size / scene.grid
    for obj in scene.objects:
        row, col = divmod(obj.cell, scene.grid)
        half = 0.4 * cell * obj.scale
        cx, cy = (col + 0.5) * cell + obj.dx, (row + 0.5) * cell + obj.dy
        box = (cx - half, cy - half, cx + half, cy + half)
        GLYPHS[CATEGORY_BY_NAME[obj.category].glyph](draw, box, object_rgb(obj))
    return image


def png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG bytes with fixed settings (byte-identical for equal images)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
