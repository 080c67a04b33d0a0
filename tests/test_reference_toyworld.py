"""Effect of the reference methods on the trained toyworld model (FreeCustom, MagicFace, IR-Diffusion): the checker
finds the references' colours, and the stripes of the compact striped ones (square, circle, cross), on the generated
subjects far more often with the method than without, same seeds; with IR-Diffusion one subject's named look no
longer leaks onto the other. Not asserted because this model cannot carry them: the dots of the dotted square (its
VAE encoder loses them) and the stripes of the thin star (docs/methods/freecustom.md).

The prompts name shapes and places, not looks (but for the leakage test); the references are the shipped examples
(each drawn in a scene, with its mask). ``benchmarks/reference_toyworld.py`` prints the same figures (and more).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import toyworld

from attnctrl.models.toyworld.examples import pair_rates, reference_of, shipped_references, took_look
from attnctrl.pipelines import FreeCustomPipeline, IRDiffusionPipeline, MagicFacePipeline, Subject

pytestmark = pytest.mark.usefixtures("no_grad")
EXAMPLES = shipped_references()
STAR, SQUARE = EXAMPLES["striped-green-star"], EXAMPLES["dotted-blue-square"]
SETTINGS = dict(num_inference_steps=25, guidance_scale=5.0)
TWO = "a star on the left and a square on the right"


def images(make, seeds: int) -> list:
    return [make(torch.Generator().manual_seed(s)) for s in range(seeds)]


@functools.cache
def plain(prompt: str, seeds: int) -> list:
    """Plain generations of a prompt, made once per module."""
    pipe = toyworld()
    return images(lambda g: pipe(prompt, generator=g, **SETTINGS).images[0], seeds)


@pytest.mark.parametrize("name, look, weight, margin", [
    ("striped-green-star", "shape+colour", 3.0, 0.375), ("dotted-blue-square", "shape+colour", 3.0, 0.375),
    ("striped-purple-cross", "shape+colour+pattern", 3.0, 0.25),
    # the paper's 2-3 range: on this model's flat self-attention 2 carries stripes best (docs/methods/freecustom.md)
    ("striped-green-square", "shape+colour+pattern", 2.0, 0.5), ("striped-red-circle", "shape+colour+pattern", 2.0, 0.5),
], ids=["star-colour", "dotted-square-colour", "cross-stripes", "square-stripes", "circle-stripes"])
def test_freecustom_gives_the_object_the_references_look(name, look, weight, margin):
    example = EXAMPLES[name]
    prompt = f"a {example['shape']} in the middle"
    fc = FreeCustomPipeline.from_pipe(toyworld())
    ours = images(lambda g: fc(prompt, references=[reference_of(example)], mask_weights=weight, generator=g,
                               **SETTINGS).images[0], 8)
    with_method, without = took_look(ours, example), took_look(plain(prompt, 8), example)
    assert with_method[look] >= without[look] + margin, (with_method, without)  # 4 (3, 2) of 8 images more


def test_magicface_gives_each_subject_its_own_references_colour_and_stripes():
    square, circle = EXAMPLES["striped-green-square"], EXAMPLES["striped-red-circle"]
    prompt = "a square on the left and a circle on the right"
    mf = MagicFacePipeline.from_pipe(toyworld())
    ours = images(lambda g: mf(prompt, references=[reference_of(square), reference_of(circle)],
                               ref_words=["square", "circle"], mask_weights=2.0, generator=g, **SETTINGS).images[0], 8)
    with_method, without = pair_rates(ours, square, circle), pair_rates(plain(prompt, 8), square, circle)
    # of the 16 subjects, in their own reference's colour / also striped: the look-free prompt alone gives none
    assert with_method["each"] >= without["each"] + 0.375, (with_method, without)
    assert with_method["each+pattern"] >= without["each+pattern"] + 0.25, (with_method, without)
    assert with_method["leak"] <= without["leak"] + 0.25, (with_method, without)  # swapped looks: rare


SUBJECTS = [Subject("star", reference=reference_of(STAR, "on the left"), region=(0, 8, 32, 56)),
            Subject("square", reference=reference_of(SQUARE, "on the right"), region=(32, 8, 64, 56))]


def test_irdiffusion_gives_each_subject_its_references_look_and_swaps_none():
    ir = IRDiffusionPipeline.from_pipe(toyworld())
    ours = pair_rates(images(lambda g: ir(TWO, subjects=SUBJECTS, generator=g, **SETTINGS).images[0], 16),
                      STAR, SQUARE)
    without = pair_rates(plain(TWO, 16), STAR, SQUARE)
    assert ours["each"] >= without["each"] + 0.375 and ours["leak"] <= without["leak"], (ours, without)


def test_irdiffusion_keeps_one_subjects_named_look_off_the_other():
    """The attribute leakage IR-Diffusion exists to remove: a prompt naming the star's look draws the square in the
    star's green (plain generation: every seed); with the subjects' references, no seed."""
    prompt = "a striped green star on the left and a square on the right"
    ir = IRDiffusionPipeline.from_pipe(toyworld())
    ours = pair_rates(images(lambda g: ir(prompt, subjects=SUBJECTS, generator=g, **SETTINGS).images[0], 16),
                      STAR, SQUARE)
    without = pair_rates(plain(prompt, 16), STAR, SQUARE)
    assert ours["leak"] <= without["leak"] - 0.5, (ours, without)
