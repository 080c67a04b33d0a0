"""MagicFace (spec §11: M1-M8) on tiny SD 1.5 and SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny
from diffusers.models.attention_processor import AttnProcessor2_0
from test_freecustom import REFS, SIZE, box_mask, gen, image

import attnctrl
from attnctrl.core import AttnCtrlError, Controller, TokenLookupError
from attnctrl.core.controller import bind
from attnctrl.pipelines import MagicFacePipeline, Reference
from attnctrl.pipelines.magicface import MagicFaceRun
from attnctrl.processors.magicface import (
    GAUSSIAN_3,
    MagicFace,
    MagicFaceAttnProcessor,
    region_rate,
    segment,
    smooth3,
)

pytestmark = pytest.mark.usefixtures("no_grad")
PROMPT = "a woman wearing a hat"


def _bound(pipe, config=None, refs=REFS, words=("woman", "hat"), stage=1):
    config = config or MagicFace(ref_words=words)
    run_ = MagicFaceRun(pipe, refs, SIZE, SIZE, seed=0)
    handle = bind(pipe, config, run_, MagicFaceAttnProcessor)
    tokens = [attnctrl.core.token_indices(pipe.tokenizer, PROMPT, w) for w in words]
    run_.setup(config, handle.controller.layers, tokens, steps=10, guidance=7.5)
    ctl = Controller.of(pipe)
    pipe._guidance_scale = 7.5
    ctl.enter_step(0, grid=(SIZE // 8, SIZE // 8))
    if stage == 2:
        concept = torch.zeros(77, 8, 8, dtype=torch.bool)
        concept[2, :, :5] = True  # "woman": left part
        concept[5, :, 3:] = True  # "hat": right part, overlapping columns 3-4 (the last concept wins)
        concept[0, :, :] = ~(concept[2] | concept[5])
        run_.concept, run_.fg = concept, torch.ones(8, 8, dtype=torch.bool)
        run_.step = run_.inject + 1
        ctl.enter_step(run_.inject + 1)
    return handle, run_, ctl


def _layer(handle, level="up.3", kind="self", seed=0):
    layer = next(la for la in handle.layers if la.level == level and la.kind == kind)
    attn = denoiser_of(handle.controller.pipe).get_submodule(layer.module_name)
    n = int(np.prod(layer.grid(handle.controller.call.grid)))
    x = torch.randn(6, n, attn.to_q.in_features, generator=gen(seed))
    return layer, attn, x


@pytest.mark.parametrize("stage", [1, 2])
def test_m1_m2_identity_and_isolation(stage):
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, stage=stage)
    try:
        layer, attn, x = _layer(handle)
        proc = handle.processors[layer.name]
        stock = AttnProcessor2_0()(attn, x)
        out = proc(attn, x)
        for row in (0, 1, 2, 4, 5):  # uncond target and every reference row: plain attention, bit for bit
            assert torch.equal(out[row], stock[row])
        assert not torch.equal(out[3], stock[3])
        x2 = x.clone()
        x2[[0, 3]] += 1.0  # perturb the target: references never attend to it
        out2 = proc(attn, x2)
        for row in (1, 2, 4, 5):
            assert torch.equal(out2[row], out[row])
        # a storage-only layer (down.1, ds 2) and a cross layer stay plain
        for lvl, kind in (("down.1", "self"), ("up.2", "cross")):
            la = next(la for la in handle.layers if la.level == lvl and la.kind == kind)
            a = denoiser_of(pipe).get_submodule(la.module_name)
            n = int(np.prod(la.grid(ctl.call.grid)))
            xx = torch.randn(6, n, a.to_q.in_features, generator=gen(1))
            ehs = torch.randn(6, 77, 32, generator=gen(2)) if kind == "cross" else None
            if kind == "self":
                run_.qk.clear()
            assert torch.equal(handle.processors[la.name](a, xx, ehs), AttnProcessor2_0()(a, xx, ehs))
    finally:
        handle.remove()


def test_m3_rsa_masks():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, stage=1)
    try:
        layer, attn, x = _layer(handle)
        proc = handle.processors[layer.name]
        out = proc(attn, x)
        outside = ~run_.grid_masks(layer.grid(ctl.call.grid))[1]
        x2 = x.clone()
        x2[5, outside] -= 4.0  # reference 2 (cond half) outside its mask
        torch.testing.assert_close(proc(attn, x2)[3], out[3], atol=1e-6, rtol=0)
        run_._grid_masks = {k: torch.zeros_like(v) for k, v in run_._grid_masks.items()}  # all masks empty
        own = AttnProcessor2_0()(attn, x)
        torch.testing.assert_close(proc(attn, x)[3], own[3], atol=1e-6, rtol=0)
    finally:
        handle.remove()


def test_m4_rba_groups():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, stage=2)
    try:
        assert run_.stage() == 2
        layer, attn, x = _layer(handle, level="up.2")  # 8 x 8 grid, the segmentation's own grid
        proc = handle.processors[layer.name]
        stock = AttnProcessor2_0()(attn, x)
        out = proc(attn, x)
        groups = run_.groups((8, 8))
        assert groups.view(8, 8)[0].tolist() == [1, 1, 1, 2, 2, 2, 2, 2]  # overlap: the last concept wins
        run_.concept[2] = False
        run_.concept[5, :, :] = False
        run_.concept[5, :4, 3:] = True  # now pixels of the lower half are in no group
        out = proc(attn, x)
        free = run_.groups((8, 8)) == 0
        assert torch.equal(out[3, free], stock[3, free])  # outside every group: plain attention, bit for bit
        x2 = x.clone()
        x2[4] += 3.0  # reference 1 is not used by group 2
        out2 = proc(attn, x2)
        in_g2 = run_.groups((8, 8)) == 2
        torch.testing.assert_close(out2[3, in_g2], out[3, in_g2], atol=1e-6, rtol=0)
    finally:
        handle.remove()


def test_token_maps_equal_the_dense_formula():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe)
    try:
        g = gen(4)
        qs, ks = torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
        qc, kc = torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 77, 16, generator=g)
        run_.record((8, 8), qs, ks, qc, kc)
        a = torch.softmax(qs @ ks.transpose(-1, -2) / 4, -1).mean(1)
        c = torch.softmax(qc @ kc.transpose(-1, -2) / 4, -1).mean(1)
        t = ((a + 3 * a @ a) / 4) @ c  # spec §6.1-2 with dense maps
        maps = smooth3(t.transpose(1, 2).reshape(2, 77, 8, 8))
        cond = maps[1] / (maps[1].mean((-2, -1), keepdim=True) + 1e-8)
        torch.testing.assert_close(run_.token_sum, cond, atol=1e-4, rtol=1e-4)
    finally:
        handle.remove()


def test_m6_segmentation_and_kernel():
    torch.testing.assert_close(GAUSSIAN_3, torch.exp(-((torch.tensor([-1.0, 0, 1]) / (2 * 0.5)) ** 2))
                               / torch.exp(-((torch.tensor([-1.0, 0, 1]) / 1.0) ** 2)).sum(), atol=1e-7, rtol=0)
    g = gen(0)
    token_sum, fg_sum = torch.rand(77, 8, 8, generator=g), torch.rand(2, 8, 8, generator=g)
    concept, fg = segment(token_sum, fg_sum, 3, [[2], [5]], ca_scale=0.9)
    assert concept.shape == (77, 8, 8) and fg.shape == (8, 8)
    assert torch.all(concept.any(0))  # every pixel belongs to at least one token
    concept, fg = segment(token_sum, fg_sum, 3, [[2], [5]], ca_scale=0.6)
    assert torch.all(~concept | fg)  # concept masks lie inside the foreground when ca_scale < 0.9


def test_m7_rate_bounds():
    g = gen(1)
    delta = torch.randn(4, 16, 16, generator=g)
    concept = torch.rand(77, 8, 8, generator=g) > 0.7
    fg = torch.rand(8, 8, generator=g) > 0.3
    for guidance in (3.0, 7.5, 10.0):
        r = region_rate(delta, concept, fg, guidance)
        assert r.shape == (16, 16)
        assert r.min() >= 0.8 - 1e-6 and r.max() <= min(3.0, 15 / guidance) + 1e-6


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_m8_pipeline_without_references_and_with_rate_off(family):
    pipe = tiny(family)
    mf = MagicFacePipeline.from_pipe(pipe)
    np.testing.assert_array_equal(run(mf, steps=2), run(pipe, steps=2))
    kw = dict(references=REFS, ref_words=["woman", "hat"], num_inference_steps=4, inject_step=1, output_type="np",
              height=SIZE, width=SIZE)
    a = mf(PROMPT, generator=gen(), **kw).images
    np.testing.assert_array_equal(a, mf(PROMPT, generator=gen(), **kw).images)  # deterministic
    assert mf.last_run.concept.shape == (77, SIZE // 16, SIZE // 16)
    assert mf.last_run.reference_masks().shape == (2, SIZE // 16, SIZE // 16)
    b = mf(PROMPT, generator=gen(), use_rate=False, **kw).images
    assert np.abs(a - b).max() > 0  # the region rate changes the guidance
    assert attnctrl.applied(pipe) == [] and all(not m._forward_hooks for m in denoiser_of(pipe).modules())


def test_m5_stage_switch_uses_previous_step_masks():
    pipe = tiny("sd15")
    mf = MagicFacePipeline.from_pipe(pipe)
    stages = []
    original = MagicFaceRun.stage

    def spy(self):
        s = original(self)
        stages.append((self.step, s, self.concept is not None))
        return s

    MagicFaceRun.stage = spy
    try:
        mf(PROMPT, references=REFS, ref_words=["woman", "hat"], num_inference_steps=5, inject_step=2,
           generator=gen(), height=SIZE, width=SIZE)
    finally:
        MagicFaceRun.stage = original
    per_step = {step: stage for step, stage, _ in stages}
    assert per_step == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2}  # RSA while step <= inject_step, RBA after
    assert all(has_mask for step, _, has_mask in stages if step > 0)  # masks of step k-1 exist at step k


def test_bad_inputs_name_the_reference():
    mf = MagicFacePipeline.from_pipe(tiny("sd15"))
    with pytest.raises(TokenLookupError, match="reference 2: the word 'scarf' is not in the prompt"):
        mf(PROMPT, references=REFS, ref_words=["woman", "scarf"])
    with pytest.raises(AttnCtrlError, match="1 word"):
        mf(PROMPT, references=REFS, ref_words=["woman"])
    with pytest.raises(AttnCtrlError, match="inject_step"):
        MagicFace(inject_step=1.5)
    single = [Reference(image(3), box_mask(0, 0, 64, 64), "a woman")]
    assert MagicFace().scale_for(1) == 0.9 and MagicFace().scale_for(2) == 0.6
    out = mf(PROMPT, references=single, ref_words=["woman"], num_inference_steps=2, height=SIZE, width=SIZE,
             output_type="np", generator=gen())
    assert out.images.shape == (1, SIZE, SIZE, 3)
