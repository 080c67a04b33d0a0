"""The example references shipped in ``assets/examples/`` (drawn in toyworld, never downloaded).

``python -m attnctrl.models.toyworld.examples DIR`` rewrites them. Each example is an image of a concept *in
context* (FreeCustom's finding: concepts transfer better when the reference shows them in a scene), its mask
(the concept only) and the caption of the scene, which serves as the reference prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .world import Obj, Scene, caption_of, object_mask, render

__all__ = ["EXAMPLES", "SHIPPED", "write_examples", "shipped_references", "shipped_composition", "look_words",
           "reference_of", "took_look", "pair_rates"]

#: where the examples ship (``attnctrl/assets/examples``)
SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "examples"

#: name -> (objects of the scene, index of the concept)
EXAMPLES: dict[str, tuple[list[Obj], int]] = {
    "striped-green-star": ([Obj("green", "star", "striped", "left", 24, 14, 30),
                            Obj("orange", "circle", "plain", "right", 18, 52, 34)], 0),
    "dotted-blue-square": ([Obj("blue", "square", "dotted", "middle", 26, 32, 32)], 0),
    "hollow-pink-circle": ([Obj("yellow", "triangle", "plain", "left", 18, 11, 40),
                            Obj("pink", "circle", "hollow", "right", 24, 50, 28)], 1),
    "striped-purple-cross": ([Obj("purple", "cross", "striped", "middle", 26, 32, 30)], 0),
    # compact striped shapes: their stripes cover enough pixels to come through a reference (a star's thin points
    # rarely show them; docs/methods/freecustom.md)
    "striped-green-square": ([Obj("green", "square", "striped", "middle", 28, 32, 30),
                              Obj("yellow", "circle", "plain", "right", 12, 56, 50)], 0),
    "striped-red-circle": ([Obj("red", "circle", "striped", "middle", 28, 32, 30),
                            Obj("yellow", "circle", "plain", "right", 12, 56, 50)], 0),
}


#: PrimeComposer's example: a background scene (a yellow triangle on the left); the object is the hollow pink circle
#: (a look the model does not draw from text: hollow comes from the reference); the prompt describes the composite
COMPOSITION = {"background": [Obj("yellow", "triangle", "plain", "left", 20, 12, 34)], "box": (36, 16, 24, 28),
               "reference": "hollow-pink-circle",
               "prompt": "a yellow triangle on the left and a hollow pink circle on the right"}


def write_examples(folder: str | Path, size: int = 64) -> list[dict]:
    """Write ``<name>.png``, ``<name>-mask.png`` and ``examples.json`` into ``folder``; returns the index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (name, (objects, concept)) in enumerate(EXAMPLES.items()):
        scene = Scene(list(objects), background=(234, 231, 226), seed=100 + i)
        scene.caption = caption_of(scene)
        render(scene, size=size).save(folder / f"{name}.png")
        object_mask(scene, concept, size=size).save(folder / f"{name}-mask.png")
        obj = objects[concept]
        index.append({"name": name, "image": f"{name}.png", "mask": f"{name}-mask.png", "prompt": scene.caption,
                      "colour": obj.colour, "shape": obj.shape, "pattern": obj.pattern})
    scene = Scene(list(COMPOSITION["background"]), background=(234, 231, 226), seed=200)
    render(scene, size=size).save(folder / "composition-background.png")
    index.append({"name": "composition", "background": "composition-background.png",
                  "reference": f"{COMPOSITION['reference']}.png", "reference_mask": f"{COMPOSITION['reference']}-mask.png",
                  "box_xywh": list(COMPOSITION["box"]), "prompt": COMPOSITION["prompt"]})
    (folder / "examples.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _shipped_index() -> list[dict]:
    index = SHIPPED / "examples.json"
    return json.loads(index.read_text()) if index.is_file() else []


def shipped_references() -> dict[str, dict]:
    """The shipped reference examples by name (their ``examples.json`` entries: image, mask, prompt, looks); empty
    if the examples are not installed."""
    return {e["name"]: e for e in _shipped_index() if "image" in e}


def shipped_composition() -> dict | None:
    """PrimeComposer's shipped example (its ``examples.json`` entry), with ``box`` = (x0, y0, x1, y1) pixels; None if
    the examples are not installed."""
    entry = next((e for e in _shipped_index() if e["name"] == "composition"), None)
    if entry is None:
        return None
    x, y, w, h = entry["box_xywh"]
    return {**entry, "box": (x, y, x + w, y + h)}


def look_words(example: dict) -> str:
    """The example's subject as a caption names it: "striped green star" ("green star" when plain)."""
    return f"{example['pattern']} {example['colour']} {example['shape']}".removeprefix("plain ")


def reference_of(example: dict, place: str | None = None):
    """An :class:`attnctrl.Reference` of a shipped example; its prompt is the scene's caption, or with ``place`` the
    subject alone where it goes in the target ("a striped green star on the left": IR-Diffusion's reference
    prompts)."""
    from ...pipelines.reference import Reference

    prompt = f"a {look_words(example)} {place}" if place else example["prompt"]
    return Reference(SHIPPED / example["image"], SHIPPED / example["mask"], prompt=prompt)


def took_look(images, example: dict, box: tuple[int, int, int, int] | None = None) -> dict:
    """Over ``images``: how often the largest object drawn (centred inside ``box`` = (x0, y0, x1, y1) pixels, if
    given) is the example's shape in its colour, and in its colour and pattern (the reference methods' transfer,
    judged by :func:`~attnctrl.models.toyworld.score.detect`)."""
    from .score import detect

    hits = {"shape+colour": 0, "shape+colour+pattern": 0}
    for image in images:
        objs = [o for o in detect(image) if box is None or (box[0] <= o.centroid[0] < box[2]
                                                             and box[1] <= o.centroid[1] < box[3])]
        if objs and objs[0].shape == example["shape"] and objs[0].colour == example["colour"]:
            hits["shape+colour"] += 1
            hits["shape+colour+pattern"] += objs[0].pattern == example["pattern"]
    return {k: v / len(images) for k, v in hits.items()}


def pair_rates(images, a: dict, b: dict) -> dict:
    """Over ``images`` of two subjects ``a`` and ``b``: ``each``, the fraction of subjects drawn in their own colour
    (two per image); ``each+pattern``, in their own colour and pattern; ``bound``, of images with both in their own
    colour; ``leak``, of images with some ``a`` shape in ``b``'s colour or some ``b`` shape in ``a``'s (attributes
    swapped between the subjects)."""
    from .score import detect

    each = patterned = bound = leak = 0
    for image in images:
        found = [(o.shape, o.colour, o.pattern) for o in detect(image)]
        seen = {f[:2] for f in found}
        own = [(s["shape"], s["colour"]) in seen for s in (a, b)]
        each += sum(own)
        patterned += sum((s["shape"], s["colour"], s["pattern"]) in found for s in (a, b))
        bound += all(own)
        leak += (a["shape"], b["colour"]) in seen or (b["shape"], a["colour"]) in seen
    n = len(images)
    return {"each": each / (2 * n), "each+pattern": patterned / (2 * n), "bound": bound / n, "leak": leak / n}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(write_examples(sys.argv[1] if len(sys.argv) > 1 else "attnctrl/assets/examples"), indent=2))
