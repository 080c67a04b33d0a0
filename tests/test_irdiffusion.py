"""IR-Diffusion (spec §8) on tiny SD 1.5 and SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny
from diffusers.models.attention_processor import AttnProcessor2_0
from test_freecustom import SIZE, box_mask, gen, image

import attnctrl
from attnctrl.core import AttnCtrlError, Controller
from attnctrl.core.attention import attention_probs
from attnctrl.pipelines import IRDiffusionPipeline, Reference, Subject
from attnctrl.pipelines.freecustom import _Bound
from attnctrl.pipelines.irdiffusion import IRRun, disjoint
from attnctrl.processors.irdiffusion import IRAttnProcessor, IRDiffusion

pytestmark = pytest.mark.usefixtures("no_grad")
REFS = [Reference(image(1), box_mask(8, 8, 56, 56), "a red circle"),
        Reference(image(2), box_mask(64, 64, 120, 120), "a striped square")]
# target regions: left and right halves (disjoint), at 128 x 128 px
TARGET = torch.stack([torch.as_tensor(box_mask(0, 32, 60, 96)) / 255.0, torch.as_tensor(box_mask(68, 24, 128, 104)) / 255.0])


def _bound(pipe, config=None, refs=REFS, target=TARGET, step=0):
    config = config or IRDiffusion()
    run_ = IRRun(pipe, refs, SIZE, SIZE, seed=0)
    handle = attnctrl.apply(pipe, _Bound(config=config, run=run_, processor=IRAttnProcessor))
    msa = {la.name for la in config.msa_selection(handle.controller)}
    run_.setup(config, handle.controller.layers, disjoint(target[: len(refs)]), msa)
    ctl = Controller.of(pipe)
    ctl.call.grid, ctl.step = (SIZE // 8, SIZE // 8), step
    pipe._guidance_scale = 7.5
    return handle, run_, ctl


def _inputs(handle, level, kind="self", seed=0, n_refs=2):
    layer = next(la for la in handle.layers if la.level == level and la.kind == kind)
    attn = denoiser_of(handle.controller.pipe).get_submodule(layer.module_name)
    n = int(np.prod(layer.grid(handle.controller.call.grid)))
    x = torch.randn(2 * (1 + n_refs), n, attn.to_q.in_features, generator=gen(seed))
    ehs = torch.randn(2 * (1 + n_refs), 77, 32, generator=gen(seed + 1)) if kind == "cross" else None
    return layer, attn, x, ehs


@pytest.mark.parametrize("level", ["down.0", "down.1", "down.2", "mid", "up.1", "up.2", "up.3"])
def test_isolation_at_every_resolution(level):
    """No probability from subject i's queries to subject j's target keys, at every level (official: two only)."""
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, IRDiffusion(mutual_lambda=0.0, msa_layers="up.3"))
    try:
        layer, attn, x, _ = _inputs(handle, level)
        proc = handle.processors[layer.name]
        out = proc(attn, x)
        stock = AttnProcessor2_0()(attn, x)
        owner = run_.owner(layer.grid(ctl.call.grid))
        present = set(owner.unique().tolist()) - {0}
        assert present == {1, 2} or (level == "mid" and present == {2})  # at 2x2 subject 1 covers no token over half
        for row in (1, 2, 4, 5):  # reference rows: untouched, bit for bit
            assert torch.equal(out[row], stock[row])
        background = owner == 0
        assert torch.equal(out[3, background], stock[3, background])
        # perturbing subject 2's target tokens does not move subject 1's outputs (exact isolation)
        if layer.level != "up.3" and present == {1, 2}:
            x2 = x.clone()
            x2[3, owner == 2] += 5.0
            sub1 = owner == 1
            torch.testing.assert_close(proc(attn, x2)[3, sub1], out[3, sub1], atol=1e-6, rtol=0)
    finally:
        handle.remove()


def test_isolation_probabilities_are_exactly_zero_and_rows_sum_to_one():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe)
    try:
        owner = run_.owner((8, 8))
        g = gen(2)
        q, k = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
        bias = torch.zeros(64, 64)
        for i in (1, 2):
            bias[owner == i] = torch.where((owner > 0) & (owner != i), float("-inf"), 0.0)
        p = attention_probs(q, k, bias)
        torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 64))
        assert torch.all(p[..., owner == 1, :][..., owner == 2] == 0)
    finally:
        handle.remove()


def test_reposition_geometry():
    pipe = tiny("sd15")
    same = torch.stack([torch.as_tensor(box_mask(8, 8, 56, 56)) / 255.0])
    handle, run_, ctl = _bound(pipe, refs=REFS[:1], target=same)
    try:
        for grid in ((16, 16), (8, 8), (4, 4), (2, 2)):
            src = run_.grid_masks(grid)[0]
            index, relocated = run_.source_index(grid, 0), run_.relocated_mask(grid, 0)
            if torch.any(src) and torch.equal(run_.owner(grid) == 1, src):
                assert torch.equal(relocated, src)  # same box, same size: the identity
                assert torch.equal(index[src], torch.nonzero(src).flatten())
    finally:
        handle.remove()
    shifted = torch.stack([torch.as_tensor(box_mask(8 + 48, 8 + 16, 56 + 48, 56 + 16)) / 255.0])  # translation
    handle, run_, ctl = _bound(pipe, refs=REFS[:1], target=shifted)
    try:
        grid = (16, 16)
        index, relocated = run_.source_index(grid, 0), run_.relocated_mask(grid, 0)
        tgt = (run_.owner(grid) == 1).view(16, 16)
        ys, xs = torch.nonzero(relocated.view(16, 16), as_tuple=True)
        assert torch.all(tgt[ys, xs])  # the relocated support lies inside the target region
        src = torch.nonzero(run_.grid_masks(grid)[0]).flatten()
        assert torch.equal(index[relocated].sort().values, src.sort().values)  # a pure translation: all moved
        assert set(index[relocated].tolist()) <= set(src.tolist())
        moved = index[relocated]
        assert torch.all(torch.nonzero(relocated).flatten() - moved == 6 + 2 * 16)  # (+2 rows, +6 cols)
    finally:
        handle.remove()


def test_subject_smaller_than_a_token_is_handled():
    pipe = tiny("sd15")
    tiny_region = torch.stack([torch.as_tensor(box_mask(2, 2, 5, 5)) / 255.0,
                               torch.as_tensor(box_mask(64, 64, 128, 128)) / 255.0])
    handle, run_, ctl = _bound(pipe, target=tiny_region)
    try:
        for grid in ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1)):
            owner = run_.owner(grid)  # absent wherever it covers no token over half (here: everywhere)
            assert not torch.any(owner == 1) and (torch.any(owner == 2) or grid == (1, 1))
            assert not torch.any(run_.relocated_mask(grid, 0))
        for level, kind in (("up.3", "self"), ("up.3", "cross"), ("mid", "self")):  # runs, no assert
            layer, attn, x, ehs = _inputs(handle, level, kind)
            out = handle.processors[layer.name](attn, x, ehs)
            assert torch.isfinite(out).all()
    finally:
        handle.remove()


def test_dropout_is_seeded_and_resampled_per_step():
    pipe = tiny("sd15")
    draws = []
    for _ in range(2):
        handle, run_, ctl = _bound(pipe)
        try:
            draws.append([run_.dropout((16, 16), s).clone() for s in (0, 1)])
        finally:
            handle.remove()
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1])
    handle, run_, ctl = _bound(pipe, IRDiffusion(dropout=0.0))
    try:
        assert torch.all(run_.dropout((16, 16), 0))
    finally:
        handle.remove()


def test_mutual_cross_attention_identity_outside_and_at_lambda_zero():
    pipe = tiny("sd15")
    outs = {}
    for lam in (0.0, 0.9, 1.0):
        handle, run_, ctl = _bound(pipe, IRDiffusion(mutual_lambda=lam))
        try:
            layer, attn, x, ehs = _inputs(handle, "up.3", "cross")
            outs[lam] = handle.processors[layer.name](attn, x, ehs)
            stock = AttnProcessor2_0()(attn, x, ehs)
            owner = run_.owner(layer.grid(ctl.call.grid))
        finally:
            handle.remove()
    assert torch.equal(outs[0.0], stock)
    assert torch.equal(outs[0.9][3, owner == 0], stock[3, owner == 0])
    # lambda = 1 inside subject 1 = cross-attention against subject 1's prompt
    m1 = AttnProcessor2_0()(attn, x[3:4], ehs[4:5])
    torch.testing.assert_close(outs[1.0][3, owner == 1], m1[0, owner == 1], atol=1e-5, rtol=1e-5)


def test_single_subject_and_empty_regions_reduce_to_vanilla():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, IRDiffusion(mutual_lambda=0.0), refs=REFS[:1])
    try:
        layer, attn, x, _ = _inputs(handle, "down.0", n_refs=1)  # not a reposition layer, one subject
        assert torch.equal(handle.processors[layer.name](attn, x), AttnProcessor2_0()(attn, x))
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pipeline(family):
    pipe = tiny(family)
    ir = IRDiffusionPipeline.from_pipe(pipe)
    np.testing.assert_array_equal(run(ir, steps=2), run(pipe, steps=2))  # no subjects: the base pipeline
    subjects = [Subject("cat", REFS[0], region=(0, 0.25, 0.45, 0.75)), Subject("dog", prompt="a dog")]
    kw = dict(subjects=subjects, num_inference_steps=3, height=SIZE, width=SIZE, output_type="np")
    a = ir("a cat and a dog", generator=gen(3), **kw).images
    b = ir("a cat and a dog", generator=gen(3), **kw).images
    np.testing.assert_array_equal(a, b)
    masks = ir.last_subject_masks
    assert masks.shape == (2, SIZE, SIZE) and not torch.any((masks[0] > 0) & (masks[1] > 0))
    assert attnctrl.applied(pipe) == []


def test_overlaps_go_to_the_larger_region_and_bad_inputs():
    big = torch.zeros(2, 10, 10)
    big[0, :, :6] = 1
    big[1, :, 4:] = 1  # overlap in columns 4-5; region 1 is larger
    big[1, :5] = 1
    out = disjoint(big)
    assert torch.all(out[1, :, 4:6] == 1) and torch.all(out[0, :, 4:6] == 0)
    ir = IRDiffusionPipeline.from_pipe(tiny("sd15"))
    with pytest.raises(AttnCtrlError, match="not in the prompt"):
        ir("a cat and a dog", subjects=[Subject("bird", prompt="a bird")])
    with pytest.raises(AttnCtrlError, match="reference image or a reference prompt"):
        ir("a cat and a dog", subjects=[Subject("cat")])
    with pytest.raises(AttnCtrlError, match="subject 1: box"):
        ir("a cat and a dog", subjects=[Subject("cat", prompt="a cat", region=(0.5, 0.5, 0.2, 0.9))])
    with pytest.raises(AttnCtrlError, match="subject 2 \\(dog\\): its region is empty"):  # inside the larger one
        ir("a cat and a dog", subjects=[Subject("cat", REFS[0], region=(0, 0, 1, 1)),
                                        Subject("dog", REFS[1], region=(0.2, 0.2, 0.4, 0.4))], num_inference_steps=2)
    with pytest.raises(AttnCtrlError, match="dropout"):
        IRDiffusion(dropout=1.0)
