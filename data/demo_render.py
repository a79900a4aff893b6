"""Procedural image–caption data for the offline demo: coloured, patterned shapes.

A class is a (shape, colour, fill pattern) combination, e.g. ``red-star-striped``. Every
sample varies position, size, rotation, colour shade, pattern scale and angle, background
tint, clutter lines and pixel noise, so that an ImageNet CNN's features group a class
together without making it trivial (classes share shapes, colours and patterns pairwise).
Captions describe what is drawn in varied wording; the class name itself never appears
verbatim. Everything is a function of (seed, sample index): deterministic and parallel-safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "diamond")
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "four-sided block"),
    "triangle": ("triangle", "three-cornered shape", "triangular shape"),
    "star": ("star", "five-pointed star", "star shape"),
    "cross": ("cross", "plus sign", "cross shape"),
    "hexagon": ("hexagon", "six-sided shape", "hexagonal tile"),
    "ring": ("ring", "hollow circle", "donut shape"),
    "diamond": ("diamond", "rhombus", "lozenge"),
}
COLOURS = {
    "red": (210, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
    "orange": (245, 125, 20),
}
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "navy", "cobalt"),
    "yellow": ("yellow", "golden", "lemon-yellow"),
    "purple": ("purple", "violet", "plum-coloured"),
    "orange": ("orange", "tangerine", "amber"),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
PATTERN_ADJ = {
    "solid": ("solid", "plain", "uniformly coloured"),
    "striped": ("striped", "stripy", "banded"),
    "dotted": ("dotted", "polka-dot", "spotted"),
    "checkered": ("checkered", "chequered", "checkerboard"),
}
PATTERN_NOUN = {
    "solid": ("a single flat colour", "one solid colour", "no pattern"),
    "striped": ("stripes", "parallel bands", "thin lines"),
    "dotted": ("dots", "polka dots", "little spots"),
    "checkered": ("a checkerboard", "checks", "a grid of squares"),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "light grey": (205, 205, 205),
    "cream": (245, 235, 205),
    "pale blue": (210, 225, 245),
    "pale green": (215, 240, 215),
}


@dataclass(frozen=True)
class DemoClass:
    shape: str
    colour: str
    pattern: str

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.shape}-{self.pattern}"


def demo_classes(n_classes: int = 50) -> list[DemoClass]:
    """A fixed list of classes (independent of the seed), spread over shapes/colours/patterns."""
    combos = [DemoClass(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    order = np.random.default_rng(20240611).permutation(len(combos))
    return [combos[i] for i in order[:n_classes]]


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            a = rot + offset + 2 * math.pi * i / (n * len(radii))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [1.0], math.pi / 4)
    if shape == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if shape == "star":
        return ring(5, [1.0, 0.42], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [1.0])
    if shape == "diamond":
        base = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    elif shape == "cross":
        w = 0.34
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w)]
        base += [(-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(shape)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in base]


def _mask(shape: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """Anti-aliased (rendered at 2×) coverage mask in [0, 1]."""
    big = Image.new("L", (SIZE * 2, SIZE * 2), 0)
    d = ImageDraw.Draw(big)
    if shape in ("circle", "ring"):
        d.ellipse([2 * (cx - r), 2 * (cy - r), 2 * (cx + r), 2 * (cy + r)], fill=255)
        if shape == "ring":
            ri = r * 0.55
            d.ellipse([2 * (cx - ri), 2 * (cy - ri), 2 * (cx + ri), 2 * (cy + ri)], fill=0)
    else:
        d.polygon([(2 * x, 2 * y) for x, y in _polygon(shape, cx, cy, r, rot)], fill=255)
    small = big.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


_GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _pattern(pattern: str, rng: np.random.Generator) -> np.ndarray:
    """Pattern in [0, 1] (1 = the class colour, 0 = the light secondary colour)."""
    if pattern == "solid":
        return np.ones((SIZE, SIZE), dtype=np.float32)
    period = rng.uniform(7.0, 13.0)
    a = rng.uniform(0, math.pi)
    yy, xx = _GRID
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    if pattern == "striped":
        return ((u / period) % 1.0 < 0.55).astype(np.float32)
    if pattern == "checkered":
        return (((u // period) + (v // period)) % 2 == 0).astype(np.float32)
    if pattern == "dotted":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return 1.0 - (du * du + dv * dv < 0.09).astype(np.float32)  # class colour with light dots
    raise ValueError(pattern)


def _where(cx: float, cy: float) -> str:
    col = "left" if cx < SIZE * 0.4 else "right" if cx > SIZE * 0.6 else "centre"
    row = "top" if cy < SIZE * 0.4 else "bottom" if cy > SIZE * 0.6 else "middle"
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"in the {row} {col} corner"


def render_sample(cls: DemoClass, seed: int, index: int) -> tuple[Image.Image, str, dict]:
    """Image, caption and extra metadata of sample ``index`` of ``cls`` (deterministic)."""
    rng = np.random.default_rng([seed, index, 7919])
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    bg = np.array(BACKGROUNDS[bg_name], dtype=np.float32) + rng.normal(0, 6, 3)
    r = rng.uniform(0.2, 0.38) * SIZE
    cx = rng.uniform(r * 0.9, SIZE - r * 0.9)
    cy = rng.uniform(r * 0.9, SIZE - r * 0.9)
    rot = rng.uniform(0, 2 * math.pi)
    colour = np.clip(np.array(COLOURS[cls.colour], dtype=np.float32) + rng.normal(0, 12, 3), 0, 255)
    light = np.clip(colour * 0.25 + 190 + rng.normal(0, 5, 3), 0, 255)

    yy, xx = _GRID
    grad = rng.normal(0, 12) * (xx / SIZE - 0.5) + rng.normal(0, 12) * (yy / SIZE - 0.5)
    img = np.broadcast_to(bg, (SIZE, SIZE, 3)) + grad[..., None]

    cover = _mask(cls.shape, cx, cy, r, rot)[..., None]
    pat = _pattern(cls.pattern, rng)[..., None]
    fill = pat * colour + (1 - pat) * light
    img = img * (1 - cover) + fill * cover

    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 3)):  # clutter: a few thin grey lines
        x0, y0, x1, y1 = rng.uniform(0, SIZE, 4)
        g = int(rng.integers(80, 170))
        d.line([(x0, y0), (x1, y1)], fill=(g, g, g), width=1)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    sigma = np.float32(rng.uniform(2, 9))
    out = np.asarray(canvas, dtype=np.float32)
    out = out + sigma * rng.standard_normal((SIZE, SIZE, 3), dtype=np.float32)
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))

    size_word = "small" if r < 0.26 * SIZE else "large" if r > 0.32 * SIZE else "medium-sized"
    caption = _caption(cls, rng, size_word, _where(cx, cy), bg_name, math.degrees(rot) % 360)
    meta = {
        "shape": cls.shape,
        "colour": cls.colour,
        "pattern": cls.pattern,
        "background": bg_name,
        "size_px": round(2 * r, 1),
    }
    return image, caption, meta


def _caption(
    cls: DemoClass, rng: np.random.Generator, size: str, where: str, bg: str, deg: float
) -> str:
    def pick(words: tuple[str, ...]) -> str:
        return words[rng.integers(len(words))]

    shape, col = pick(SHAPE_WORDS[cls.shape]), pick(COLOUR_WORDS[cls.colour])
    adj, noun = pick(PATTERN_ADJ[cls.pattern]), pick(PATTERN_NOUN[cls.pattern])
    templates = (
        f"a {size} {adj} {col} {shape} on a {bg} background",
        f"a {col} {shape} filled with {noun}, {where}",
        f"photo of a {shape} in {col} with {noun}",
        f"{adj} {col} {shape} {where} of the picture",
        f"there is a {size} {col} {shape} decorated with {noun} on {bg}",
        f"a {col} {adj} {shape} rotated by about {int(deg) // 15 * 15} degrees",
        f"clip of a {shape}, colour {col}, pattern: {noun}",
        f"an image showing one {adj} {shape} in {col}, {where}",
    )
    return templates[rng.integers(len(templates))]
