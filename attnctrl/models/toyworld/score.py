"""Pixel-rule checker for toyworld images: finds the shapes and scores colour, shape, pattern and side per object.

Detection: the background colour is the median of the border pixels; foreground pixels differ from it by more than
a threshold in some channel; 8-connected components of at least ``min_area`` pixels are objects (hollow outlines
are filled to get the silhouette). Per object:

* colour: the mean of the brighter half of its interior pixels (skipping anti-aliased edges and the dark pattern
  tone), nearest colour prototype;
* shape: the silhouette, cropped and resized to 32 x 32, against a template of each shape (best IoU);
* pattern: hollow if over 15 % of the silhouette is background (a filled-in outline); plain if few pixels have the
  dark pattern tone; else dotted when the dark blobs are small and separate, striped when they join into long ones;
* side: the third of the image width holding the centroid.

Objects named in the caption are matched to components by side when the caption gives one (falling back to the
best colour match, with the side then wrong), else by colour. :func:`score` returns per-object booleans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .world import COLOURS, PATTERNS, SHAPES, SIDES, shape_polygon

__all__ = ["Detected", "detect", "parse_caption", "score", "CaptionError"]

_TEMPLATE = 32
_PROTOS = np.asarray(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)


class CaptionError(ValueError):
    """A caption that does not describe toyworld objects."""


def _template(shape: str) -> np.ndarray:
    img = Image.new("L", (_TEMPLATE * 4, _TEMPLATE * 4), 0)
    draw = ImageDraw.Draw(img)
    n = _TEMPLATE * 4 - 1
    poly = shape_polygon(shape)
    if poly is None:
        draw.ellipse([0, 0, n, n], fill=255)
    else:
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        draw.polygon([((x - x0) / (x1 - x0) * n, (y - y0) / (y1 - y0) * n) for x, y in poly], fill=255)
    return np.asarray(img.resize((_TEMPLATE, _TEMPLATE), Image.BOX), np.float32) / 255.0 > 0.5


_TEMPLATES = {shape: _template(shape) for shape in SHAPES}


@dataclass
class Detected:
    area: int
    centroid: tuple[float, float]  # (x, y)
    colour: str
    colour_distance: float
    shape: str
    shape_iou: float
    pattern: str
    side: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)


def parse_caption(caption: str) -> list[dict]:
    """Objects named in a caption: ``[{"colour", "shape", "pattern", "side" (or None)}, ...]``."""
    objects = []
    for phrase in caption.lower().replace(",", " ").split(" and "):
        words = phrase.split()
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if colour is None or shape is None:
            raise CaptionError(f"{phrase!r} does not name a toyworld colour and shape")
        pattern = next((w for w in words if w in PATTERNS), "plain")
        side = next((w for w in words if w in SIDES), None)
        objects.append({"colour": colour, "shape": shape, "pattern": pattern, "side": side})
    return objects


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    if arr.max() <= 1.0:
        arr = arr * 255.0
    return arr


def detect(image, threshold: float = 45.0, min_area: int = 12) -> list[Detected]:
    """The objects in a toyworld image, largest first."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    diff = np.abs(arr - background).max(-1)
    fg = diff > threshold
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    found = []
    for i in range(1, n + 1):
        comp = labels == i
        area = int(comp.sum())
        if area < min_area:
            continue
        silhouette = ndimage.binary_fill_holes(comp)
        ys, xs = np.nonzero(silhouette)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        cx, cy = float(xs.mean()), float(ys.mean())
        # colour: the brighter half of the interior pixels
        interior = ndimage.binary_erosion(comp)
        if interior.sum() < 6:
            interior = comp
        pixels = arr[interior]
        bright = pixels.sum(-1)
        main = pixels[bright >= np.median(bright)]
        mean = main.mean(0)
        dists = np.linalg.norm(_PROTOS - mean, axis=1)
        colour_i = int(dists.argmin())
        # shape: silhouette vs templates
        crop = silhouette[bbox[1] : bbox[3], bbox[0] : bbox[2]].astype(np.float32)
        crop = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((_TEMPLATE, _TEMPLATE),
                                                                                Image.BILINEAR)) > 127
        ious = {s: float((crop & t).sum() / max(1, (crop | t).sum())) for s, t in _TEMPLATES.items()}
        shape = max(ious, key=ious.get)
        # pattern
        if 1 - area / silhouette.sum() > 0.15:  # a filled-in outline: most of the inside is background
            pattern = "hollow"
        else:
            dark = comp & (arr.sum(-1) < 0.72 * main.sum(-1).mean())
            blobs, n_blobs = ndimage.label(dark, structure=np.ones((3, 3)))
            largest = np.bincount(blobs.ravel())[1:].max() if n_blobs else 0
            # dots are small separate blobs; diagonal stripes join into long ones
            pattern = "plain" if dark.sum() < 0.08 * area else "dotted" if largest < 10 else "striped"
        side = SIDES[min(2, int(cx / (w / 3)))]
        found.append(Detected(area, (cx, cy), _NAMES[colour_i], float(dists[colour_i]), shape, ious[shape], pattern,
                              side, bbox))
    found.sort(key=lambda d: -d.area)
    return found


def score(image, caption: str) -> dict:
    """Score an image against its caption.

    Returns ``{"objects": [{"expected", "found", "colour", "shape", "pattern", "side", "detected"}], "all": bool,
    "extra": int}`` where ``all`` means every object has the right colour, shape and side.
    """
    expected = parse_caption(caption)
    detected = detect(image)
    free = list(range(len(detected)))
    results = []
    for exp in expected:
        pick = None
        if exp["side"] is not None:
            on_side = [i for i in free if detected[i].side == exp["side"]]
            if on_side:
                pick = max(on_side, key=lambda i: detected[i].area)
        if pick is None and free:
            target = np.asarray(COLOURS[exp["colour"]], np.float32)
            pick = min(free, key=lambda i: np.linalg.norm(np.asarray(COLOURS[detected[i].colour]) - target)
                       - 1e-3 * detected[i].area)
        if pick is None:
            results.append({"expected": exp, "found": False, "colour": False, "shape": False, "pattern": False,
                            "side": False, "detected": None})
            continue
        free.remove(pick)
        d = detected[pick]
        results.append({
            "expected": exp, "found": True, "colour": d.colour == exp["colour"], "shape": d.shape == exp["shape"],
            "pattern": d.pattern == exp["pattern"], "side": exp["side"] is None or d.side == exp["side"],
            "detected": d,
        })
    return {
        "objects": results,
        "all": all(r["colour"] and r["shape"] and r["side"] for r in results),
        "extra": len(free),
    }
