"""Toyworld: a procedural world of coloured shapes with captions, deterministic by seed.

Scenes hold 1-3 objects, each with a colour (8), a shape (6), a pattern (plain, striped, dotted, hollow), a size and
a side (left / middle / right). Images are drawn 4x super-sampled and box-filtered (anti-aliased) on a light,
slightly tinted, noisy background. Captions read like "a red circle on the left and a striped blue square on the
right". A fixed set of colour-shape combinations (:data:`HELD_OUT`) never appears in training scenes, and the
placeholder words (:data:`PLACEHOLDERS`) are in the vocabulary but never in a training caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "PATTERNS", "SIDES", "SIZES", "PLACEHOLDERS", "HELD_OUT", "VOCABULARY", "Obj", "Scene",
    "sample_scene", "make_scene", "render", "caption_of", "shape_polygon", "side_centre", "object_mask", "IMAGE_SIZE",
]

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (230, 205, 25),
    "green": (35, 155, 55),
    "cyan": (25, 185, 200),
    "blue": (35, 75, 215),
    "purple": (135, 55, 195),
    "pink": (235, 105, 175),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PATTERNS = ("plain", "striped", "dotted", "hollow")
SIDES = ("left", "middle", "right")
SIZES = ("small", "big")
PLACEHOLDERS = ("sks", "zwx", "qrv")
#: colour-shape pairs never drawn in training (the benchmark's held-out captions use them)
HELD_OUT = frozenset({
    ("red", "star"), ("orange", "cross"), ("yellow", "diamond"), ("green", "triangle"), ("cyan", "square"),
    ("blue", "circle"), ("purple", "star"), ("pink", "diamond"),
})
_GLUE = ("a", "an", "and", "on", "in", "the", "of", "with", "plain", "picture", "photo", "image", "shape", "shapes",
         "one", "two", "three", "next", "to")
VOCABULARY = tuple(dict.fromkeys(
    [*_GLUE, *COLOURS, *SHAPES, *PATTERNS, *SIDES, *SIZES, "large", "tiny", *PLACEHOLDERS]
))
_SIDE_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_SHADE = 0.45  # dark tone of striped / dotted patterns, as a fraction of the colour


@dataclass
class Obj:
    colour: str
    shape: str
    pattern: str = "plain"
    side: str = "middle"
    size: float = 20.0  # bounding-box side in pixels at 64 x 64
    cx: float = 32.0
    cy: float = 32.0
    size_word: str | None = None
    look_said: bool = True  # False: the caption names the shape only (a look-alike scene's copies)
    pattern_shift: tuple[float, float] = (0.0, 0.0)  # moves the stripes / dots with the object (motion.py's clips)


@dataclass
class Scene:
    objects: list[Obj]
    caption: str = ""
    background: tuple[int, int, int] = (232, 230, 226)
    seed: int = 0
    said_sides: bool = True
    extra: dict = field(default_factory=dict)


def side_centre(side: str, width: int = IMAGE_SIZE) -> float:
    return {"left": width / 6, "middle": width / 2, "right": 5 * width / 6}[side]


def _combo_ok(colour: str, shape: str, held_out: bool) -> bool:
    return held_out or (colour, shape) not in HELD_OUT


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, held_out: bool = False,
                 look_alike: bool = False) -> Scene:
    """A random scene (1-3 objects, mostly 1-2) and its caption. ``held_out=True`` also allows held-out combos.

    ``look_alike=True``: 1-3 objects of one colour and pattern (shapes free) whose caption names no look ("a star on
    the left and a square on the right"; a quarter of the time one object's look is named): objects whose look the
    caption leaves out look like the others, so the model must copy looks from what it sees -- the skill FreeCustom,
    MagicFace, IR-Diffusion and PrimeComposer rely on (docs/toyworld.md). A lone look-free object has a random look.
    """
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3] if look_alike else [0.4, 0.45, 0.15]))
    sides = [str(s) for s in rng.choice(SIDES, size=n_objects, replace=False)]
    if rng.random() < 0.5:  # half of the captions name the objects left to right
        sides.sort(key=SIDES.index)
    crowded = n_objects == 3 or (n_objects == 2 and "middle" in sides)
    objects = []
    said = int(rng.integers(n_objects)) if look_alike and rng.random() < 0.25 else -1
    for i, side in enumerate(sides):
        first = objects[0] if look_alike and objects else None  # a look-alike scene's later objects copy its look
        while True:
            colour = first.colour if first else str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            if first and first.pattern == "hollow" and shape == "star":
                continue
            if _combo_ok(colour, shape, held_out):
                break
        if first:
            pattern = first.pattern
        else:
            pattern = str(rng.choice(PATTERNS, p=[0.55, 0.15, 0.15, 0.15]))
            if pattern == "hollow" and shape == "star":  # a star's outline leaves no inside to see
                pattern = "plain"
        lo, hi = (13, 17) if crowded else (13, 27)
        size = float(rng.uniform(lo, hi))
        if pattern == "hollow":  # outlines need room inside
            size = max(size, hi if crowded else 19.0)
        size_word = None
        if not crowded and rng.random() < 0.3:
            size_word = "small" if size < 18 else "big" if size > 22 else None
        jitter = 1.5 if crowded else 4.0
        cx = side_centre(side) + float(rng.uniform(-jitter, jitter))
        cx = min(max(cx, size / 2 + 2), IMAGE_SIZE - size / 2 - 2)  # whole object inside the image
        cy = float(rng.uniform(size / 2 + 3, IMAGE_SIZE - size / 2 - 3))
        objects.append(Obj(colour, shape, pattern, side, size, cx, cy, size_word, look_said=not look_alike or i == said))
    background = tuple(int(c) for c in rng.integers(218, 246, size=3))
    scene = Scene(objects, background=background, said_sides=bool(n_objects > 1 or rng.random() < 0.75))
    scene.caption = caption_of(scene, rng)
    return scene


def make_scene(seed: int, n_objects: int | None = None, held_out: bool = False, look_alike: bool = False) -> Scene:
    """The scene of ``seed`` (same seed, same scene, caption and image)."""
    scene = sample_scene(np.random.default_rng(seed), n_objects, held_out, look_alike)
    scene.seed = seed
    return scene


def caption_of(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The caption of a scene: one phrase per object joined with "and"."""
    phrases = []
    for obj in scene.objects:
        words = []
        if obj.size_word:
            words.append(obj.size_word)
        if obj.look_said and obj.pattern != "plain":
            words.append(obj.pattern)
        elif obj.look_said and rng is not None and rng.random() < 0.1:
            words.append("plain")
        words += [obj.colour, obj.shape] if obj.look_said else [obj.shape]
        phrase = "a " + " ".join(words)
        if scene.said_sides:
            phrase += " " + _SIDE_PHRASE[obj.side]
        phrases.append(phrase)
    return " and ".join(phrases)


def shape_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in [-1, 1]^2 (y down) of a shape; None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.9, 0.0), (0.0, 1.0), (-0.9, 0.0)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.1))
        return pts
    if shape == "cross":
        w = 0.34
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
                (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, cx: float, cy: float, size: float, box: tuple[int, int, int, int], scale: int,
                outline: float = 0) -> np.ndarray:
    """Hard mask (0/1) of a shape at ``scale``x resolution, on the pixel window ``box`` = (x0, y0, x1, y1)."""
    bx0, by0, bx1, by1 = box
    mask = Image.new("L", (bx1 - bx0, by1 - by0), 0)
    draw = ImageDraw.Draw(mask)
    half = size / 2 * scale
    x0, y0 = cx * scale - bx0, cy * scale - by0
    width = max(1, int(round(outline * scale))) if outline else 0
    poly = shape_polygon(shape)
    if poly is None:
        ellipse = [x0 - half, y0 - half, x0 + half, y0 + half]
        draw.ellipse(ellipse, fill=None if width else 255, outline=255 if width else None, width=width or 1)
    else:
        pts = [(x0 + px * half, y0 + py * half) for px, py in poly]
        draw.polygon(pts, fill=None if width else 255, outline=255 if width else None, width=width or 1)
    return np.asarray(mask, dtype=np.float32) / 255.0


def render(scene: Scene, size: int = IMAGE_SIZE, noise: float = 3.0, scale: int = 4) -> Image.Image:
    """Draw a scene as an RGB image (deterministic: noise is seeded by ``scene.seed``)."""
    k = size / IMAGE_SIZE
    big = size * scale
    canvas = np.empty((big, big, 3), np.float32)
    canvas[:] = np.asarray(scene.background, np.float32)
    for obj in scene.objects:
        cx, cy, side = obj.cx * k, obj.cy * k, obj.size * k
        reach = side * 0.6 + 2 * k
        box = (max(0, int((cx - reach) * scale)), max(0, int((cy - reach) * scale)),
               min(big, int((cx + reach) * scale) + 1), min(big, int((cy + reach) * scale) + 1))
        bx0, by0, bx1, by1 = box
        colour = np.asarray(COLOURS[obj.colour], np.float32)
        region = canvas[by0:by1, bx0:bx1]
        if obj.pattern == "hollow":
            mask = _shape_mask(obj.shape, cx, cy, side, box, scale, outline=2.0 * k)
            layer = colour
        else:
            mask = _shape_mask(obj.shape, cx, cy, side, box, scale)
            yy, xx = np.mgrid[by0:by1, bx0:bx1].astype(np.float32) / (scale * k)  # in 64-px units
            xx, yy = xx - obj.pattern_shift[0], yy - obj.pattern_shift[1]
            if obj.pattern == "striped":
                dark = ((xx + yy) % 6.0) < 2.6
            elif obj.pattern == "dotted":
                dark = ((xx % 6.0 - 3.0) ** 2 + (yy % 6.0 - 3.0) ** 2) < 1.6**2
            else:
                dark = np.zeros(mask.shape, bool)
            layer = np.where(dark[..., None], colour * _SHADE, colour)
        region[:] = region * (1 - mask[..., None]) + layer * mask[..., None]
    small = canvas.reshape(size, scale, size, scale, 3).mean(axis=(1, 3))
    rng = np.random.default_rng(scene.seed + 7919)
    small = small + rng.normal(0.0, noise, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8))


def object_mask(scene: Scene, index: int, size: int = IMAGE_SIZE, scale: int = 4) -> Image.Image:
    """The silhouette of object ``index`` of a scene as an 8-bit mask image (255 inside, 0 outside)."""
    obj = scene.objects[index]
    k = size / IMAGE_SIZE
    big = size * scale
    mask = _shape_mask(obj.shape, obj.cx * k, obj.cy * k, obj.size * k, (0, 0, big, big), scale)
    small = mask.reshape(size, scale, size, scale).mean(axis=(1, 3))
    return Image.fromarray(((small > 0.5) * 255).astype(np.uint8))
