"""The toyworld yardstick: fixed held-out caption sets and an evaluator built on :func:`score`.

* :func:`benchmark_captions` gives 32 single-object and 64 two-object captions whose colour-shape combinations
  never appear in training (:data:`~attnctrl.models.toyworld.world.HELD_OUT`), fixed forever (seeded).
* :func:`evaluate` generates one image per caption (fixed seeds) and reports the fraction of objects with the
  right colour, shape, side and pattern, and of images with every object right.
* :func:`evaluate_look_alike`: captions of 2-3 look-alike objects that name no look ("a star on the left and a
  square on the right"); how often all are drawn in one colour -- the within-image copying of looks through
  self-attention that the reference methods rely on.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from .score import detect, score
from .world import HELD_OUT, SIDES, make_scene

__all__ = ["benchmark_captions", "evaluate", "look_alike_scenes", "evaluate_look_alike"]


def benchmark_captions() -> dict[str, list[str]]:
    """``{"single": 32 captions, "two": 64 captions}``, every object a held-out colour-shape combination."""
    combos = sorted(HELD_OUT)
    single = [f"a {c} {s} {'on the ' + side if side != 'middle' else 'in the middle'}"
              for c, s in combos for side in SIDES]
    rng = np.random.default_rng(2024)
    patterns = ["striped", "dotted", "hollow"]
    for i, (c, s) in enumerate(combos):
        pattern = patterns[i % 3] if not (s == "star" and patterns[i % 3] == "hollow") else "striped"
        side = SIDES[int(rng.integers(3))]
        single.append(f"a {pattern} {c} {s} {'on the ' + side if side != 'middle' else 'in the middle'}")
    pairs = [p for p in itertools.permutations(combos, 2)]
    side_pairs = [("left", "right"), ("left", "middle"), ("middle", "right"), ("right", "left")]
    order = rng.permutation(len(pairs))
    two = []
    for k in range(64):
        (c1, s1), (c2, s2) = pairs[int(order[k % len(pairs)])]
        a, b = side_pairs[k % len(side_pairs)]
        phrase = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
        two.append(f"a {c1} {s1} {phrase[a]} and a {c2} {s2} {phrase[b]}")
    return {"single": single, "two": two}


def _generate(pipe, captions: list[str], steps: int, guidance: float, seed: int, batch: int):
    """One image per caption, in batches, caption ``i`` with seed ``seed + i``; yields the images in order."""
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        yield from pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images


@torch.no_grad()
def evaluate(pipe, captions: list[str], steps: int = 25, guidance: float = 5.0, seed: int = 0,
             batch: int = 8, progress: bool = False) -> dict:
    """Generate one image per caption (seed ``seed + i``) and score them. Returns fractions and timings."""
    totals = {"colour": 0, "shape": 0, "side": 0, "pattern": 0, "found": 0}
    objects = images_ok = patterned = patterned_right = 0
    started = time.perf_counter()
    for i, image in enumerate(_generate(pipe, captions, steps, guidance, seed, batch)):
        result = score(image, captions[i])
        images_ok += result["all"]
        for obj in result["objects"]:
            objects += 1
            for key in totals:
                totals[key] += obj[key]
            if obj["expected"]["pattern"] != "plain":  # "pattern" alone counts plain-drawn plain objects too
                patterned += 1
                patterned_right += obj["pattern"]
        if progress and ((i + 1) % batch == 0 or i + 1 == len(captions)):
            print(f"  {i + 1}/{len(captions)}", flush=True)
    seconds = time.perf_counter() - started
    return {
        **{k: v / max(1, objects) for k, v in totals.items()},
        "all": images_ok / max(1, len(captions)),
        "patterned": patterned_right / patterned if patterned else None,  # over striped/dotted/hollow objects
        "patterned_objects": patterned,
        "objects": objects,
        "images": len(captions),
        "seconds_per_image": seconds / max(1, len(captions)),
    }


def look_alike_scenes(n: int = 32) -> list:
    """``n`` fixed look-alike scenes of 2-3 objects whose caption names no look (seeds outside every training pool)."""
    scenes, seed = [], 900_000_000
    while len(scenes) < n:
        scene = make_scene(seed, look_alike=True)
        seed += 1
        if len(scene.objects) > 1 and not any(o.look_said for o in scene.objects):
            scenes.append(scene)
    return scenes


@torch.no_grad()
def evaluate_look_alike(pipe, n: int = 32, steps: int = 25, guidance: float = 5.0, batch: int = 8) -> dict:
    """On :func:`look_alike_scenes` ("a star on the left and a square on the right": one look for all, unnamed):
    the fraction of images in which the detector finds as many objects as the caption names, all of one colour
    (``same``; ``found``: as many objects). Nothing in the text can give them one colour: only self-attention can."""
    scenes = look_alike_scenes(n)
    same = found = 0
    for image, scene in zip(_generate(pipe, [s.caption for s in scenes], steps, guidance, 0, batch), scenes):
        objs = detect(image)[: len(scene.objects)]
        found += len(objs) == len(scene.objects)
        same += len(objs) == len(scene.objects) and len({o.colour for o in objs}) == 1
    return {"same": same / n, "found": found / n, "images": n}
