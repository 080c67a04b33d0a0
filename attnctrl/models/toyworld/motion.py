"""Moving shapes: toyworld-video's world of short clips of one or two moving toyworld objects, deterministic by seed.

A clip has :data:`NUM_FRAMES` = 17 frames by default (the world draws any 4k + 1 >= 5: 9, 13, 17, ...; toyworld-video
uses 8k + 1, see :mod:`.video`) of 64 x 64 px, drawn frame by frame with :func:`~attnctrl.models.toyworld.world.render` (same shapes, colours,
patterns, background and noise; the noise is the clip's, the same in every frame; stripes and dots move with
their object). One object (70 %, 14-22 px) or two (30 %, 13-17 px, of different colours); each moves left, right, up
or down at a constant speed, or stands still. A moving object covers 60-90 % of the room it has along its axis over
the clip (half of that in each half with a direction change) and stays fully inside every frame, 3 px from the
edge; two objects' boxes stay >= 4 px apart all along (rejection-sampled). A single object has an event in 30 % of
clips, at the midpoint: it changes direction (15 %) or colour (15 %). The
:data:`~attnctrl.models.toyworld.world.HELD_OUT` colour-shape pairs never appear in training clips (before or after
a colour change). :func:`clip_of_caption` draws a ground-truth clip of any caption in the grammar.

Caption grammar (regular; :func:`parse_motion_caption` reads it back)::

    caption := phrase | phrase " and " phrase
    phrase  := "a " [pattern " "] colour " " shape " " motion [" then " motion | " turning " colour]
    motion  := "moving left" | "moving right" | "moving up" | "moving down" | "standing still"

e.g. "a red circle moving right", "a striped blue square moving up and a green star standing still", "a red circle
moving right then moving down" (the direction changes at the midpoint), "a red circle moving left turning blue"
(the colour changes at the midpoint). Pattern words are said when not plain; events only in one-object clips.
Time runs over u = frame / (F - 1) in [0, 1]: an object's path goes through three waypoints at u = 0, 0.5, 1, so a
seed gives the same path at any frame count; its second colour shows in the frames with u > 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .score import CaptionError
from .world import COLOURS, HELD_OUT, IMAGE_SIZE, PATTERNS, SHAPES, VOCABULARY, Obj, Scene, render

__all__ = [
    "NUM_FRAMES", "MOTIONS", "STEPS", "VIDEO_VOCABULARY", "motion_words", "Mover", "Clip", "make_clip",
    "clip_of_caption", "render_clip", "parse_motion_caption", "video_benchmark_captions", "segment_prompts",
]

NUM_FRAMES = 17
MOTIONS = ("left", "right", "up", "down", "still")
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
VIDEO_VOCABULARY = tuple(dict.fromkeys([*VOCABULARY, "moving", "up", "down", "standing", "still", "then", "turning"]))
_MARGIN = 3.0  # px between an object's box and the frame's edge
_GAP = 4.0  # px between two objects' boxes


def motion_words(motion: str) -> str:
    return "standing still" if motion == "still" else f"moving {motion}"


@dataclass
class Mover:
    """One object of a clip: its look, motion, optional event, and its path (centre at u = 0, 0.5, 1; 64-px units)."""

    colour: str
    shape: str
    pattern: str = "plain"
    motion: str = "still"
    then: str | None = None  # the motion after the midpoint (a direction change)
    turns: str | None = None  # the colour after the midpoint (a colour change)
    size: float = 16.0
    waypoints: tuple[tuple[float, float], ...] = ((32.0, 32.0),) * 3

    @property
    def phrase(self) -> str:
        words = ["a"] + ([self.pattern] if self.pattern != "plain" else []) + [self.colour, self.shape]
        phrase = " ".join(words) + " " + motion_words(self.motion)
        if self.then:
            phrase += " then " + motion_words(self.then)
        if self.turns:
            phrase += " turning " + self.turns
        return phrase

    def path(self, num_frames: int) -> np.ndarray:
        """Centres ``(num_frames, 2)`` (x, y) in 64-px units."""
        u = np.linspace(0.0, 1.0, num_frames)
        w = np.asarray(self.waypoints, np.float64)
        return np.stack([np.interp(u, [0.0, 0.5, 1.0], w[:, k]) for k in (0, 1)], axis=1)

    def colour_at(self, frame: int, num_frames: int) -> str:
        return self.turns if self.turns and 2 * frame > num_frames - 1 else self.colour


@dataclass
class Clip:
    """A clip: its objects, frame count, background colour and seed (the seed also fixes the pixel noise)."""

    objects: list[Mover]
    num_frames: int = NUM_FRAMES
    background: tuple[int, int, int] = (232, 230, 226)
    seed: int = 0

    @property
    def caption(self) -> str:
        return " and ".join(m.phrase for m in self.objects)

    def positions(self) -> np.ndarray:
        """Ground-truth centres ``(n_objects, num_frames, 2)`` (x, y) in 64-px units."""
        return np.stack([m.path(self.num_frames) for m in self.objects])

    def frame_scene(self, frame: int) -> Scene:
        """Frame ``frame`` as a toyworld scene (objects at their centres in their colour of that frame)."""
        objs = []
        for m in self.objects:
            cx, cy = m.path(self.num_frames)[frame]
            x0, y0 = m.waypoints[0]
            objs.append(Obj(m.colour_at(frame, self.num_frames), m.shape, m.pattern, size=m.size, cx=float(cx),
                            cy=float(cy), pattern_shift=(float(cx - x0), float(cy - y0))))
        return Scene(objs, caption=self.caption, background=self.background, seed=self.seed)


def _check_frames(num_frames: int) -> None:
    if num_frames < 5 or num_frames % 4 != 1:
        raise ValueError(f"num_frames must be 4k + 1 >= 5 (9, 13, 17, ...), got {num_frames}")


def _combo_ok(colour: str, shape: str, held_out: bool) -> bool:
    return held_out or (colour, shape) not in HELD_OUT


def _offsets(m: Mover, distance: float) -> np.ndarray:
    """Waypoint offsets (3, 2) from the start: ``distance`` px over the clip, half of it by the midpoint."""
    first = np.asarray(STEPS[m.motion], np.float64) * distance / 2
    second = np.asarray(STEPS[m.then or m.motion], np.float64) * distance / 2
    return np.stack([np.zeros(2), first, first + second])


def _apart(a: Mover, b: Mover) -> bool:
    """Whether two movers' boxes stay ``_GAP`` px apart at every time u in [0, 1] (exact: on each half of the
    clip their offset moves on a line, and the boxes are too close on an interval of it per axis)."""
    reach = (a.size + b.size) / 2 + _GAP
    rel = np.subtract(a.waypoints, b.waypoints)
    for start, end in ((rel[0], rel[1]), (rel[1], rel[2])):
        lo, hi = 0.0, 1.0  # the fractions s of this half with both |offset(s)| < reach
        for k in (0, 1):
            step = end[k] - start[k]
            if step == 0:
                hi = hi if abs(start[k]) < reach else -1.0
            else:
                s1, s2 = sorted(((-reach - start[k]) / step, (reach - start[k]) / step))
                lo, hi = max(lo, s1), min(hi, s2)
        if lo < hi:
            return False
    return True


def _place(rng: np.random.Generator, movers: list[Mover]) -> None:
    """Sizes, speeds and start points for ``movers`` (in place): inside every frame, two objects kept apart."""
    lo_size, hi_size = (14.0, 22.0) if len(movers) == 1 else (13.0, 17.0)
    for _ in range(1000):
        for m in movers:
            m.size = float(rng.uniform(lo_size, hi_size))
            if m.pattern == "hollow":  # outlines need room inside
                m.size = max(m.size, 19.0 if len(movers) == 1 else hi_size)
            room = IMAGE_SIZE - m.size - 2 * _MARGIN  # how far the centre can go along an axis
            offsets = _offsets(m, float(rng.uniform(0.6, 0.9)) * room)
            lo, hi = m.size / 2 + _MARGIN - offsets.min(0), IMAGE_SIZE - m.size / 2 - _MARGIN - offsets.max(0)
            start = lo + rng.random(2) * (hi - lo)
            m.waypoints = tuple((float(x), float(y)) for x, y in start + offsets)
        if len(movers) == 1 or all(_apart(a, b) for i, a in enumerate(movers) for b in movers[i + 1 :]):
            return
    raise RuntimeError(f"could not keep {[m.phrase for m in movers]} apart")  # pragma: no cover


def make_clip(seed: int, n_objects: int | None = None, held_out: bool = False, num_frames: int = NUM_FRAMES) -> Clip:
    """The clip of ``seed`` (same seed, same caption, paths and pixels); ``held_out=True`` also allows held-out
    pairs."""
    _check_frames(num_frames)
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = 2 if rng.random() < 0.3 else 1
    event = None
    if n_objects == 1:
        r = rng.random()
        event = "then" if r < 0.15 else "turns" if r < 0.3 else None
    movers: list[Mover] = []
    for _ in range(n_objects):
        while True:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            if _combo_ok(colour, shape, held_out) and colour not in {m.colour for m in movers}:
                break
        pattern = str(rng.choice(PATTERNS, p=[0.55, 0.15, 0.15, 0.15]))
        if pattern == "hollow" and shape == "star":  # a star's outline leaves no inside to see
            pattern = "plain"
        m = Mover(colour, shape, pattern, motion=str(rng.choice(MOTIONS)))
        if event == "then":
            m.then = str(rng.choice([d for d in MOTIONS if d != m.motion]))
        elif event == "turns":
            m.turns = str(rng.choice([c for c in COLOURS if c != colour and _combo_ok(c, shape, held_out)]))
        movers.append(m)
    _place(rng, movers)
    background = tuple(int(c) for c in rng.integers(218, 246, size=3))
    return Clip(movers, num_frames, background, seed)


def clip_of_caption(caption: str, seed: int = 0, num_frames: int = NUM_FRAMES) -> Clip:
    """A ground-truth clip of a caption in the grammar (sizes, speeds, start points and background from ``seed``)."""
    _check_frames(num_frames)
    rng = np.random.default_rng(seed)
    movers = [Mover(**o) for o in parse_motion_caption(caption)]
    _place(rng, movers)
    background = tuple(int(c) for c in rng.integers(218, 246, size=3))
    return Clip(movers, num_frames, background, seed)


def render_clip(clip: Clip, size: int = IMAGE_SIZE) -> list[Image.Image]:
    """The clip's frames as RGB images of ``size`` px (``np.stack`` them for a ``(F, H, W, 3)`` uint8 array)."""
    return [render(clip.frame_scene(i), size=size) for i in range(clip.num_frames)]


def _read_motion(words: list[str], i: int) -> tuple[str, int]:
    pair = words[i : i + 2]
    if pair == ["standing", "still"]:
        return "still", i + 2
    if len(pair) == 2 and pair[0] == "moving" and pair[1] in STEPS and pair[1] != "still":
        return pair[1], i + 2
    raise CaptionError(f"expected 'moving left/right/up/down' or 'standing still' at {' '.join(words[i:])!r}")


def parse_motion_caption(caption: str) -> list[dict]:
    """Objects of a caption in the grammar: ``[{"colour", "shape", "pattern", "motion", "then", "turns"}, ...]``
    (``then``: the motion after the midpoint, ``turns``: the colour after it; None without the event)."""
    objects = []
    for phrase in caption.lower().replace(",", " ").split(" and "):
        words = phrase.split()
        i = 1 if words[:1] in (["a"], ["an"]) else 0
        pattern = "plain"
        if words[i : i + 1] and words[i] in PATTERNS:
            pattern, i = words[i], i + 1
        if len(words) < i + 2 or words[i] not in COLOURS or words[i + 1] not in SHAPES:
            raise CaptionError(f"{phrase!r} does not name a toyworld colour and shape")
        obj = {"colour": words[i], "shape": words[i + 1], "pattern": pattern, "then": None, "turns": None}
        obj["motion"], i = _read_motion(words, i + 2)
        if words[i : i + 1] == ["then"]:
            obj["then"], i = _read_motion(words, i + 1)
            if obj["then"] == obj["motion"]:
                raise CaptionError(f"{phrase!r}: 'then' must change the motion")
        elif words[i : i + 1] == ["turning"]:
            if len(words) < i + 2 or words[i + 1] not in COLOURS or words[i + 1] == obj["colour"]:
                raise CaptionError(f"{phrase!r}: 'turning' must name a new colour")
            obj["turns"], i = words[i + 1], i + 2
        if i != len(words):
            raise CaptionError(f"{phrase!r}: unexpected {' '.join(words[i:])!r}")
        objects.append(obj)
    return objects


def video_benchmark_captions() -> dict[str, list[str]]:
    """Fixed held-out caption sets: ``single`` (24), ``two`` (16), ``colour_change`` (8), ``direction_change`` (8).

    Every colour-shape pair (also after a colour change) is in ``HELD_OUT``; a colour change turns a held-out
    star or diamond into the other held-out one of its shape (red <-> purple star, yellow <-> pink diamond).
    """
    combos = sorted(HELD_OUT)
    single = [f"a {c} {s} {motion_words(MOTIONS[(3 * i + j) % 5])}"  # three motions per pair, all five in turn
              for i, (c, s) in enumerate(combos) for j in range(3)]
    rng = np.random.default_rng(2025)
    pairs = [(a, b) for a in combos for b in combos if a != b]
    order = rng.permutation(len(pairs))
    two = []
    for k in range(16):
        (c1, s1), (c2, s2) = pairs[int(order[k])]
        m1, m2 = MOTIONS[k % 5], MOTIONS[(k + 1 + k // 5) % 5]
        two.append(f"a {c1} {s1} {motion_words(m1)} and a {c2} {s2} {motion_words(m2)}")
    swaps = [("red", "star", "purple"), ("purple", "star", "red"), ("yellow", "diamond", "pink"),
             ("pink", "diamond", "yellow")]
    colour_change = [f"a {c} {s} {motion_words(MOTIONS[(k + k // 4) % 4])} turning {new}"
                     for k, (c, s, new) in enumerate(swaps * 2)]
    turns = [("right", "down"), ("left", "up"), ("up", "right"), ("down", "left"), ("right", "up"), ("left", "down"),
             ("up", "left"), ("down", "right")]
    direction_change = [f"a {c} {s} {motion_words(a)} then {motion_words(b)}" for (c, s), (a, b) in zip(combos, turns)]
    return {"single": single, "two": two, "colour_change": colour_change, "direction_change": direction_change}


def segment_prompts() -> dict[str, list[list[str]]]:
    """Fixed multi-prompt sequences (2-3 prompts, one per video segment) for DiTCtrl-style benchmarks, held-out
    pairs only: ``direction`` (the motion changes), ``colour`` (the colour changes), ``enter`` (a second object
    appears)."""
    return {
        "direction": [
            ["a red star moving right", "a red star moving down"],
            ["a blue circle moving up", "a blue circle moving left"],
            ["a green triangle moving left", "a green triangle standing still"],
            ["a cyan square moving right", "a cyan square moving down", "a cyan square moving left"],
        ],
        "colour": [
            ["a red star moving right", "a purple star moving right"],
            ["a pink diamond moving down", "a yellow diamond moving down"],
            ["a purple star standing still", "a red star standing still"],
            ["a yellow diamond moving left", "a pink diamond moving left", "a yellow diamond moving left"],
        ],
        "enter": [
            ["a red star moving right", "a red star moving right and a blue circle standing still"],
            ["a cyan square moving up", "a cyan square moving up and a orange cross moving left"],
            ["a green triangle standing still", "a green triangle standing still and a pink diamond moving down"],
            ["a yellow diamond moving left", "a yellow diamond moving left and a purple star moving right",
             "a purple star moving right"],
        ],
    }
