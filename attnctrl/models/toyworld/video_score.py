"""Pixel-rule checker for moving-shapes clips (:mod:`~attnctrl.models.toyworld.motion`): colour, shape, direction,
persistence and jumps of the objects a caption names.

Frames are read at 64 px (resized with ``Image.BOX`` otherwise) and each is searched with
:func:`~attnctrl.models.toyworld.score.detect`. Tracking: frame by frame, the caption's objects take the detections
(or none) that minimise 2 x wrong colour + 1 x wrong shape + distance to the object's last centre / 32 px, a miss
costing 3.5. Per object:

* ``colour`` / ``shape``: the fraction of frames in which its detection has the caption's colour (after a colour
  change, the new one in the frames past the midpoint, u = frame / (F - 1) > 0.5) / shape;
* ``direction``: read from its centres by a Theil-Sen fit (the median of pairwise slopes) times the length of the
  clip, or of each half with a direction change (frames up to the middle one, and from it): "still" under
  :data:`STILL_PX` px, else the larger axis' direction; right when every read matches the caption;
* ``persistence``: the fraction of frames in which it is found as the same object: with the (colour, shape) it has
  most often (in each half, with a colour change);
* ``max_jump``: the largest move of its centre between consecutive frames in which it is found (px at 64; 0 if
  found in fewer than two frames).
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
from PIL import Image

from .motion import parse_motion_caption
from .score import detect
from .world import IMAGE_SIZE

__all__ = ["STILL_PX", "score_clip", "evaluate_clips", "read_direction"]

#: a displacement under this (px at 64, a tenth of the frame) reads as standing still
STILL_PX = 6.4
_MISS = 3.5
_MAX_DETECTIONS = 6


def _frames64(frames) -> list[np.ndarray]:
    """``frames`` (PIL images, or arrays (F, H, W, 3), uint8 or float in [0, 1]) as uint8 arrays of 64 x 64."""
    out = []
    for frame in frames:
        if not isinstance(frame, Image.Image):
            arr = np.asarray(frame)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
            frame = Image.fromarray(arr)
        frame = frame.convert("RGB")
        if frame.size != (IMAGE_SIZE, IMAGE_SIZE):
            frame = frame.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        out.append(np.asarray(frame))
    return out


def read_direction(centres: dict[int, tuple[float, float]], first: int, last: int) -> str | None:
    """The motion ("left", ..., "still") of the centres ``{frame: (x, y)}`` over frames ``first..last``; None when
    fewer than two frames of that span have one."""
    frames = [f for f in sorted(centres) if first <= f <= last]
    if len(frames) < 2:
        return None
    slopes = [np.subtract(centres[b], centres[a]) / (b - a) for a, b in itertools.combinations(frames, 2)]
    dx, dy = np.median(np.asarray(slopes), axis=0) * (last - first)
    if np.hypot(dx, dy) < STILL_PX:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _expected_colour(obj: dict, frame: int, num_frames: int) -> str:
    return obj["turns"] if obj["turns"] and 2 * frame > num_frames - 1 else obj["colour"]


def _match(expected: list[dict], colours: list[str], found: list, last: list) -> tuple:
    """The detection (or None) of each expected object in one frame: the assignment of least total cost."""

    def cost(k, d):
        if d is None:
            return _MISS
        c = 2.0 * (d.colour != colours[k]) + 1.0 * (d.shape != expected[k]["shape"])
        return c + (0.0 if last[k] is None else float(np.linalg.norm(np.subtract(d.centroid, last[k]))) / 32)

    options = [*found, *[None] * len(expected)]
    return min(itertools.permutations(options, len(expected)),
               key=lambda pick: sum(cost(k, d) for k, d in enumerate(pick)))


def score_clip(frames, caption: str) -> dict:
    """Score a clip against its caption (see the module). Returns ``{"colour", "shape", "direction", "persistence",
    "max_jump", "max_jump_frac", "objects", "frames"}``: colour and shape are fractions over frames x objects,
    direction over objects, persistence the objects' mean, max_jump the objects' largest (px at 64; max_jump_frac:
    over the frame size). Each of ``objects``: ``{"expected"`` (the parsed caption object), ``"colour"``,
    ``"shape"``, ``"found"`` (fraction of frames matched at all), ``"persistence"``, ``"read"`` (the direction read
    per span), ``"direction"`` (bool), ``"max_jump"``, ``"centres"`` ({frame: (x, y)})``}``."""
    expected = parse_motion_caption(caption)
    arrays = _frames64(frames)
    n = len(arrays)
    if n < 2:
        raise ValueError(f"a clip needs at least two frames, got {n}")
    tracks: list[dict[int, object]] = [{} for _ in expected]  # per object: {frame: Detected}
    last: list[np.ndarray | None] = [None] * len(expected)
    for f, arr in enumerate(arrays):
        found = detect(arr)[:_MAX_DETECTIONS]
        colours = [_expected_colour(obj, f, n) for obj in expected]
        for k, d in enumerate(_match(expected, colours, found, last)):
            if d is not None:
                tracks[k][f] = d
                last[k] = np.asarray(d.centroid)
    objects = []
    for obj, track in zip(expected, tracks):
        centres = {f: d.centroid for f, d in track.items()}
        if obj["then"]:
            middle = (n - 1) // 2
            spans = [(0, middle, obj["motion"]), (middle, n - 1, obj["then"])]
        else:
            spans = [(0, n - 1, obj["motion"])]
        read = [read_direction(centres, a, b) for a, b, _ in spans]
        halves = [bool(obj["turns"]) and 2 * f > n - 1 for f in range(n)]  # one group unless the colour changes
        usual = {}  # the (colour, shape) the object has most often, per group
        for h in set(halves):
            looks = Counter((d.colour, d.shape) for f, d in track.items() if halves[f] == h)
            usual[h] = looks.most_common(1)[0][0] if looks else None
        steps = [np.hypot(*np.subtract(centres[f + 1], centres[f])) for f in range(n - 1) if {f, f + 1} <= set(track)]
        objects.append({
            "expected": obj,
            "colour": sum(d.colour == _expected_colour(obj, f, n) for f, d in track.items()) / n,
            "shape": sum(d.shape == obj["shape"] for d in track.values()) / n,
            "found": len(track) / n,
            "persistence": sum((d.colour, d.shape) == usual[halves[f]] for f, d in track.items()) / n,
            "read": read,
            "direction": read == [motion for _, _, motion in spans],
            "max_jump": float(max(steps, default=0.0)),
            "centres": centres,
        })
    max_jump = max(o["max_jump"] for o in objects)
    return {
        "colour": float(np.mean([o["colour"] for o in objects])),
        "shape": float(np.mean([o["shape"] for o in objects])),
        "direction": float(np.mean([o["direction"] for o in objects])),
        "persistence": float(np.mean([o["persistence"] for o in objects])),
        "max_jump": max_jump,
        "max_jump_frac": max_jump / IMAGE_SIZE,
        "objects": objects,
        "frames": n,
    }


def evaluate_clips(clips, captions: list[str]) -> dict:
    """Score clips against their captions. Colour and shape: fractions over all object-frames; direction and
    persistence: over all objects; ``max_jump``: the clips' mean, ``max_jump_worst``: their largest (px at 64)."""
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips for {len(captions)} captions")
    results = [score_clip(frames, caption) for frames, caption in zip(clips, captions)]
    objects = [(o, r["frames"]) for r in results for o in r["objects"]]
    object_frames = sum(n for _, n in objects)
    return {
        "colour": sum(o["colour"] * n for o, n in objects) / object_frames,
        "shape": sum(o["shape"] * n for o, n in objects) / object_frames,
        "direction": float(np.mean([o["direction"] for o, _ in objects])),
        "persistence": float(np.mean([o["persistence"] for o, _ in objects])),
        "max_jump": float(np.mean([r["max_jump"] for r in results])),
        "max_jump_worst": max(r["max_jump"] for r in results),
        "clips": len(results),
        "objects": len(objects),
    }
