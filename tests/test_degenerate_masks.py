"""Degenerate attention-derived masks are reported once per call (``AttnCtrlWarning``): CLoRA's fusion masks,
MagicFace's concept masks, IR-Diffusion's layout rehearsal (and the seed it used); MagicFace's segmentation layers
are selectable. Tiny SD 1.5 at 128 px, 2 steps; the degenerate cases are built by the method's own options (a mask
threshold of 0 or 1) or by replacing the segmentation / the layout rehearsal's masks."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import tiny, toyworld
from test_freecustom import REFS, SIZE, gen

import attnctrl.processors.magicface as magicface_module
from attnctrl.cli.options import method_options
from attnctrl.core import AttnCtrlError, LayerSelectionError
from attnctrl.core.layers import LayerMap, describe
from attnctrl.core.masks import degenerate
from attnctrl.errors import AttnCtrlWarning
from attnctrl.models.toyworld.examples import SHIPPED
from attnctrl.pipelines import CLoRAPipeline, IRDiffusionPipeline, MagicFacePipeline, Reference, Subject
from attnctrl.pipelines.magicface import MagicFaceRun
from attnctrl.processors.clora import fusion_mask_warning
from attnctrl.processors.magicface import MagicFace

pytestmark = pytest.mark.usefixtures("no_grad")
STEPS = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="np")


@contextmanager
def no_notice():
    """Fail on any AttnCtrlWarning inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttnCtrlWarning)
        yield


def notices(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, AttnCtrlWarning)]


def test_thresholds():
    assert degenerate(0.96) == "full" and degenerate(0.004) == "empty" and degenerate(0.0) == "empty"
    assert degenerate(0.95) is None and degenerate(0.005) is None and degenerate(0.3) is None


# -- CLoRA ---------------------------------------------------------------------------------------------------------

def test_clora_message_names_the_degenerate_branches_only():
    words = [[], ["sks dog"], ["zwx cat"], ["bird"], []]
    cover = torch.tensor([1.0, 1.0, 0.2, 0.001, 0.0])  # branch 1 holds the background; branch 5 has no mask words
    message = fusion_mask_warning(cover, 3, words)
    assert "branch 2 ('sks dog') 100.0 %" in message and "acts on the whole image" in message
    assert "branch 4 ('bird') 0.1 %" in message and "acts nowhere" in message
    assert "zwx cat" not in message and "branch 5" not in message and "record_layers" in message
    assert fusion_mask_warning(torch.tensor([1.0, 0.5, 0.2]), 3, words[:3]) is None
    assert fusion_mask_warning(torch.zeros(3), 0, words[:3]) is None  # no step fused with masks


@pytest.mark.parametrize("threshold, share", [(0.0, "100.0 %"), (1.0, "0.0 %")])
def test_clora_warns_once_on_an_all_or_nothing_fusion_mask(threshold, share):
    # spec §3.5: the mask is A > alpha max A, so alpha = 0 gives all ones and alpha = 1 an empty mask
    cl = CLoRAPipeline.from_pipe(tiny("sd15"))
    with pytest.warns(AttnCtrlWarning) as record:
        cl(["a cat and a dog"] * 2, [None, None], concepts=None, mask_words=[[], ["dog"]], step_size=0,
           mask_threshold=threshold, generator=gen(), **STEPS)
    (message,) = notices(record)  # once per call, not per step
    assert f"branch 2 ('dog') {share}" in message and "record_layers" in message


def test_clora_is_quiet_when_the_masks_are_partial(monkeypatch):
    cl = CLoRAPipeline.from_pipe(tiny("sd15"))
    import attnctrl.pipelines.clora as clora_pipeline

    def half(maps, mask_tokens, threshold, **morphology):  # a left/right split: a fine fusion mask
        masks = torch.zeros(len(mask_tokens), *maps.shape[1:3])
        masks[0, :, : maps.shape[2] // 2] = 1
        masks[1, :, maps.shape[2] // 2 :] = 1
        return masks

    monkeypatch.setattr(clora_pipeline, "lora_masks", half)
    with no_notice():
        cl(["a cat and a dog"] * 2, [None, None], concepts=None, mask_words=[[], ["dog"]], step_size=0,
           generator=gen(), **STEPS)


# -- MagicFace -----------------------------------------------------------------------------------------------------

MF = dict(references=REFS, ref_words=["woman", "hat"], inject_step=0, generator=gen(), **STEPS)
PROMPT = "a woman wearing a hat"


def _segment_as(kind: str):
    """A replacement of the segmentation whose concept masks are empty / the whole image / left and right halves."""
    real = magicface_module.segment

    def fake(token_sum, fg_sum, layers, ref_tokens, ca_scale):
        concept, fg = real(token_sum, fg_sum, layers, ref_tokens, ca_scale)
        concept = torch.zeros_like(concept)
        w = concept.shape[-1]
        for i, tokens in enumerate(ref_tokens):
            if kind == "full":
                concept[tokens] = True
            elif kind == "split":
                concept[tokens, :, i * w // 2 : (i + 1) * w // 2] = True
        return concept, fg

    return fake


@pytest.mark.parametrize("kind, words", [("empty", "empty"), ("full", "nearly the whole image")])
def test_magicface_warns_once_on_an_empty_or_full_concept_mask(monkeypatch, kind, words):
    mf = MagicFacePipeline.from_pipe(tiny("sd15"))
    monkeypatch.setattr(magicface_module, "segment", _segment_as(kind))
    with pytest.warns(AttnCtrlWarning) as record:
        mf(PROMPT, **{**MF, "generator": gen()})
    (message,) = notices(record)
    assert "reference 1 ('woman')" in message and "reference 2 ('hat')" in message and words in message
    assert "segment_layers" in message


def test_magicface_is_quiet_when_the_concept_masks_are_partial(monkeypatch):
    mf = MagicFacePipeline.from_pipe(tiny("sd15"))
    monkeypatch.setattr(magicface_module, "segment", _segment_as("split"))
    with no_notice():
        mf(PROMPT, **{**MF, "generator": gen()})
    assert len(mf.last_run.coverage) == 2 and torch.allclose(mf.last_run.coverage[-1], torch.tensor([0.5, 0.5]))
    with no_notice():  # without references: the base pipeline, and no segmentation left from the last call
        mf(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", generator=gen())
    assert mf.last_run is None and mf.shown_masks() is None


def test_magicface_segment_layers_choose_the_recorded_layers():
    pipe = tiny("sd15")
    layers = describe(pipe.unet)
    default = MagicFace().segment_selection(layers)
    assert {la.downsample for la in default} == {2, 4, 8}  # today's latent/2, /4, /8
    assert {la.kind for la in default} == {"self", "cross"}
    up1 = MagicFace(segment_layers="up.1").segment_selection(layers)
    assert {la.level for la in up1} == {"up.1"} and len(up1) == 2 * len({la.block for la in up1})
    # a selected layer brings its block's other half: "cross & up.1" records the same blocks
    assert MagicFace(segment_layers="cross & up.1").segment_selection(layers) == up1

    grids = []
    original = MagicFaceRun.record

    def spy(self, grid, *args):
        grids.append(tuple(grid))
        return original(self, grid, *args)

    mf = MagicFacePipeline.from_pipe(pipe)
    for selector, expect in ((None, {(8, 8), (4, 4), (2, 2)}), ("up.1", {(4, 4)})):
        grids.clear()
        MagicFaceRun.record = spy
        try:
            mf(PROMPT, **{**MF, "generator": gen(), "segment_layers": selector})
        finally:
            MagicFaceRun.record = original
        assert set(grids) == expect, selector
        assert mf.last_run.store_layers == {la.name for la in (default if selector is None else up1)}
    assert method_options("magicface", ["segment_layers=up.1"]) == {"segment_layers": "up.1"}


def test_magicface_segment_layers_that_select_nothing_raise():
    for bad in ("", [], 3):
        with pytest.raises(AttnCtrlError, match="segment_layers"):
            MagicFace(segment_layers=bad)
    mf = MagicFacePipeline.from_pipe(tiny("sd15"))
    with pytest.raises(LayerSelectionError, match="segment_layers.*matched none"):
        mf(PROMPT, **{**MF, "segment_layers": "blocks[99]"})
    layers = describe(tiny("sd15").unet)
    self_only = LayerMap(layers.family, tuple(la for la in layers if la.kind == "self"))  # no cross-attention
    with pytest.raises(LayerSelectionError, match="no transformer block with both"):
        MagicFace(segment_layers="blocks[0]").segment_selection(self_only)


def test_no_warning_on_the_toyworld_model():
    """Real masks on the shipped model (its cross-attention is local since the grounding fine-tune): CLoRA's fusion
    masks at the 8x8 layers and MagicFace's concept masks of the documented example are partial, so no warning."""
    pipe = toyworld()
    prompt = "a square on the left and a star on the right"
    with no_notice():
        CLoRAPipeline.from_pipe(pipe)([prompt] * 3, [None] * 3, concepts=None, mask_words=[[], ["square"], ["star"]],
                                      step_size=0, record_layers="res==8", num_inference_steps=2, guidance_scale=5.0,
                                      generator=gen(), output_type="np")
    refs = [Reference(SHIPPED / f"striped-{name}.png", SHIPPED / f"striped-{name}-mask.png",
                      f"a striped {name.replace('-', ' ')} in the middle and a yellow circle on the right")
            for name in ("green-square", "red-circle")]
    mf = MagicFacePipeline.from_pipe(pipe)
    with no_notice():
        mf("a square on the left and a circle on the right", references=refs, ref_words=["square", "circle"],
           mask_weights=2.0, num_inference_steps=2, guidance_scale=5.0, generator=gen(), output_type="np")
    assert all(0.005 < c < 0.95 for c in mf.last_run.coverage[-1].tolist())


# -- IR-Diffusion --------------------------------------------------------------------------------------------------

IR_SUBJECTS = [Subject("cat", REFS[0]), Subject("dog", REFS[1])]  # references given, regions from the layout


def _columns(a: int, b: int) -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE)
    m[:, a:b] = 1.0
    return m


OVERLAPPING = torch.stack([_columns(0, 70), _columns(30, SIZE)])  # "cat" keeps 30 of its 70 columns: rehearse again
APART = torch.stack([_columns(0, 60), _columns(68, SIZE)])


def _layout(bad_seeds):
    """A replacement of the rehearsal's masks: overlapping subjects for ``bad_seeds`` (a set, or None: every seed)."""
    seeds = []

    def fake(self, prompts, words, generators, kwargs, layers=None):
        seed = int(generators[0].initial_seed())
        seeds.append(seed)
        overlap = bad_seeds is None or seed in bad_seeds
        return [None] * len(words), (OVERLAPPING if overlap else APART).clone()

    return fake, seeds


def test_irdiffusion_reports_the_seed_the_layout_moved_to(monkeypatch):
    ir = IRDiffusionPipeline.from_pipe(tiny("sd15"))
    fake, seeds = _layout({5})
    monkeypatch.setattr(IRDiffusionPipeline, "_attention_mask", fake)
    with pytest.warns(AttnCtrlWarning) as record:
        moved = ir("a cat and a dog", subjects=IR_SUBJECTS, generator=gen(5), **STEPS).images
    (message,) = notices(record)
    assert "layout rehearsal: seed 5 gave overlapping subjects (cat); used seed 6" in message
    assert seeds == [5, 6] and ir.seed_used == 6
    with no_notice():  # asking for the seed it used gives the very same image, quietly
        asked = ir("a cat and a dog", subjects=IR_SUBJECTS, generator=gen(6), **STEPS).images
    assert ir.seed_used == 6
    np.testing.assert_array_equal(moved, asked)


def test_irdiffusion_says_what_to_do_when_every_layout_overlaps(monkeypatch):
    ir = IRDiffusionPipeline.from_pipe(tiny("sd15"))
    fake, seeds = _layout(None)
    monkeypatch.setattr(IRDiffusionPipeline, "_attention_mask", fake)
    with pytest.warns(AttnCtrlWarning) as record:
        ir("a cat and a dog", subjects=IR_SUBJECTS, generator=gen(3), **STEPS)
    (message,) = notices(record)
    assert "all 20 seeds 3-22 gave overlapping subjects (cat)" in message
    assert "regions (boxes or masks)" in message and "rehearsal_layers" in message
    assert seeds == list(range(3, 23)) and ir.seed_used == 22


def test_irdiffusion_seed_used_without_a_move():
    ir = IRDiffusionPipeline.from_pipe(tiny("sd15"))
    boxes = [Subject("cat", REFS[0], region=(0, 0, 0.45, 1)), Subject("dog", REFS[1], region=(0.55, 0, 1, 1))]
    with no_notice():
        ir("a cat and a dog", subjects=boxes, generator=gen(7), **STEPS)
        assert ir.seed_used == 7
        ir("a cat and a dog", subjects=boxes, **STEPS)
        assert ir.seed_used == 0  # no generator: the pipeline draws from seed 0
        ir("a cat and a dog", generator=gen(9), **STEPS)  # no subjects: the base pipeline
        assert ir.seed_used == 9
        ir("a cat and a dog", **STEPS)
        assert ir.seed_used is None  # the base pipeline's global RNG


def test_irdiffusion_rehearsal_layers_reach_the_layout_maps(monkeypatch):
    ir = IRDiffusionPipeline.from_pipe(tiny("sd15"))
    seen = []
    original = IRDiffusionPipeline._attention_mask

    def spy(self, prompts, words, generators, kwargs, layers=None):
        seen.append(layers)
        return original(self, prompts, words, generators, kwargs, layers)

    monkeypatch.setattr(IRDiffusionPipeline, "_attention_mask", spy)
    with pytest.raises(LayerSelectionError):
        ir("a cat and a dog", subjects=IR_SUBJECTS, rehearsal_layers="blocks[99]", generator=gen(), **STEPS)
    assert seen == ["blocks[99]"]
