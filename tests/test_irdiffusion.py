"""IR-Diffusion (spec §8) on tiny SD 1.5 and SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import denoiser_of, run, tiny
from diffusers.models.attention_processor import AttnProcessor2_0
from test_freecustom import SIZE, box_mask, gen, image

import attnctrl
from attnctrl.cli.options import method_options
from attnctrl.core import AttnCtrlError, Controller
from attnctrl.core.controller import bind
from attnctrl.kernels.attention import attention_probs
from attnctrl.pipelines import IRDiffusionPipeline, Reference, Subject
from attnctrl.pipelines.irdiffusion import IRRun, disjoint
from attnctrl.processors.irdiffusion import (
    IRAttnProcessor,
    IRDiffusion,
    official_otsu,
    reposition_index,
    rescaled_grid_masks,
)

pytestmark = pytest.mark.usefixtures("no_grad")
REFS = [Reference(image(1), box_mask(8, 8, 56, 56), "a red circle"),
        Reference(image(2), box_mask(64, 64, 120, 120), "a striped square")]
# target regions: left and right halves (disjoint), at 128 x 128 px
TARGET = torch.stack([torch.as_tensor(box_mask(0, 32, 60, 96)) / 255.0, torch.as_tensor(box_mask(68, 24, 128, 104)) / 255.0])


def _bound(pipe, config=None, refs=REFS, target=TARGET, step=0):
    config = config or IRDiffusion()
    run_ = IRRun(pipe, refs, SIZE, SIZE, seed=0)
    handle = bind(pipe, config, run_, IRAttnProcessor)
    msa = {la.name for la in config.msa_selection(handle.controller)}
    run_.setup(config, handle.controller.layers, disjoint(target[: len(refs)]), msa)
    ctl = Controller.of(pipe)
    pipe._guidance_scale = 7.5
    ctl.enter_step(step, grid=(SIZE // 8, SIZE // 8))
    return handle, run_, ctl


def _inputs(handle, level, kind="self", seed=0, n_refs=2):
    layer = next(la for la in handle.layers if la.level == level and la.kind == kind)
    attn = denoiser_of(handle.controller.pipe).get_submodule(layer.module_name)
    n = int(np.prod(layer.grid(handle.controller.call.grid)))
    x = torch.randn(2 * (1 + n_refs), n, attn.to_q.in_features, generator=gen(seed))
    ehs = torch.randn(2 * (1 + n_refs), 77, 32, generator=gen(seed + 1)) if kind == "cross" else None
    return layer, attn, x, ehs


def _only(members, i):
    """Tokens of subject ``i``'s region and no other's."""
    return members[i] & ~members[[j for j in range(len(members)) if j != i]].any(0)


@pytest.mark.parametrize("rule", ["official", "coverage"])
@pytest.mark.parametrize("level", ["down.0", "down.1", "down.2", "mid", "up.1", "up.2", "up.3"])
def test_isolation_at_every_resolution(level, rule):
    """No probability from subject i's queries to subject j's target keys, at every level (official: two only)."""
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, IRDiffusion(mutual_lambda=0.0, msa_layers="up.3", mask_rule=rule))
    try:
        layer, attn, x, _ = _inputs(handle, level)
        proc = handle.processors[layer.name]
        out = proc(attn, x)
        stock = AttnProcessor2_0()(attn, x)
        members = run_.members(layer.grid(ctl.call.grid))
        present = {i + 1 for i in range(2) if torch.any(members[i])}
        # the official rule rescales: both subjects reach every grid; by coverage subject 1 misses the 2 x 2 grid
        assert present == {1, 2} or (rule == "coverage" and level == "mid" and present == {2})
        for row in (1, 2, 4, 5):  # reference rows: untouched, bit for bit
            assert torch.equal(out[row], stock[row])
        background = ~members.any(0)
        assert torch.equal(out[3, background], stock[3, background])
        # perturbing subject 2's target tokens does not move subject 1's outputs (exact isolation)
        if layer.level != "up.3" and present == {1, 2}:
            x2 = x.clone()
            x2[3, members[1]] += 5.0
            sub1 = _only(members, 0)
            assert torch.any(sub1)
            torch.testing.assert_close(proc(attn, x2)[3, sub1], out[3, sub1], atol=1e-6, rtol=0)
    finally:
        handle.remove()


def test_isolation_probabilities_are_exactly_zero_and_rows_sum_to_one():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe)
    try:
        members = run_.members((8, 8))
        g = gen(2)
        q, k = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
        bias = torch.zeros(64, 64)
        for i in (0, 1):
            bias[members[i]] = torch.where(members[1 - i], float("-inf"), 0.0)
        p = attention_probs(q, k, bias)
        torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 64))
        assert torch.all(p[..., members[0], :][..., members[1]] == 0)
    finally:
        handle.remove()


@pytest.mark.parametrize("rule", ["official", "coverage"])
def test_reposition_geometry(rule):
    pipe = tiny("sd15")
    config = IRDiffusion(mask_rule=rule)
    same = torch.stack([torch.as_tensor(box_mask(8, 8, 56, 56)) / 255.0])
    handle, run_, ctl = _bound(pipe, config, refs=REFS[:1], target=same)
    try:
        for grid in ((16, 16), (8, 8), (4, 4), (2, 2)):
            src = run_.sources(grid)[0]
            index, relocated = run_.source_index(grid, 0), run_.relocated_mask(grid, 0)
            if torch.any(src) and torch.equal(run_.members(grid)[0], src):
                assert torch.equal(relocated, src)  # same box, same size: the identity
                assert torch.equal(index[src], torch.nonzero(src).flatten())
    finally:
        handle.remove()
    shifted = torch.stack([torch.as_tensor(box_mask(8 + 48, 8 + 16, 56 + 48, 56 + 16)) / 255.0])  # translation
    handle, run_, ctl = _bound(pipe, config, refs=REFS[:1], target=shifted)
    try:
        grid = (16, 16)
        index, relocated = run_.source_index(grid, 0), run_.relocated_mask(grid, 0)
        tgt = run_.members(grid)[0].view(16, 16)
        ys, xs = torch.nonzero(relocated.view(16, 16), as_tuple=True)
        assert torch.all(tgt[ys, xs])  # the relocated support lies inside the target region
        src = torch.nonzero(run_.sources(grid)[0]).flatten()
        assert torch.equal(index[relocated].sort().values, src.sort().values)  # a pure translation: all moved
        moved = index[relocated]
        assert torch.all(torch.nonzero(relocated).flatten() - moved == 6 + 2 * 16)  # (+2 rows, +6 cols)
    finally:
        handle.remove()


def test_official_mask_rule_by_hand():
    """Spec §4.2: bilinear resize to the grid, min-max rescale, > 0.5 (the official ``thres``), cell by cell."""
    # 10 x 14 -> 4 x 6: align_corners=False samples rows at 0.75, 3.25, 5.75, 8.25 and columns at 0.67, 3.0, 5.33,
    # 7.67, 10.0, 12.33. A blob on rows 1-4, columns 0-7: row samples 0.75 (0.25 * row 0 + 0.75 * row 1 = 0.75),
    # 3.25 (rows 3, 4: 1), then 0, 0; column samples 1, 1, 1, 0.33 (0.33 * col 7 + 0.67 * col 8), 0, 0. Products:
    blob = torch.zeros(1, 10, 14)
    blob[0, 1:5, 0:8] = 1
    values = torch.tensor([[0.75, 0.75, 0.75, 0.25, 0, 0],
                           [1, 1, 1, 1 / 3, 0, 0],
                           [0, 0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(F.interpolate(blob[:, None], size=(4, 6), mode="bilinear")[0, 0], values,
                               atol=1e-6, rtol=0)
    assert torch.equal(rescaled_grid_masks(blob, (4, 6))[0].view(4, 6), values > 0.5)
    # a subject smaller than a token: a 2 x 2-pixel patch on 16 x 24 -> 8 x 12 (samples at 2i + 0.5) gives 0.25 in
    # four cells; rescaled to 1, all four are kept (the coverage rule drops it: no cell covered over half)
    patch = torch.zeros(1, 16, 24)
    patch[0, 1:3, 1:3] = 1
    kept = torch.zeros(8, 12, dtype=torch.bool)
    kept[:2, :2] = True
    assert torch.equal(rescaled_grid_masks(patch, (8, 12))[0].view(8, 12), kept)
    assert torch.equal(rescaled_grid_masks(patch, (8, 12), "otsu")[0].view(8, 12), kept)
    # the official thres=0 histogram rule: ~1 on grids under 256 tokens (only the maximum cells), ~0 on large ones
    assert float(official_otsu(values.flatten())) == 1.0
    assert torch.equal(rescaled_grid_masks(blob, (4, 6), "otsu")[0].view(4, 6), values == 1)
    big = torch.zeros(1, 256, 320)
    big[0, 40:150, 60:200] = 1
    resized = F.interpolate(big[:, None], size=(24, 40), mode="bilinear").flatten()
    assert float(official_otsu(resized)) == 0.0
    assert torch.equal(rescaled_grid_masks(big, (24, 40), "otsu")[0], resized > 1e-6)


def test_reposition_index_is_torchs_nearest_resize():
    """Official: the crop is resized with ``F.interpolate(mode="nearest")``, whose source index is
    ``floor(d * float32(in / out))``: 26 -> 22 tokens at d = 11 gives 12, where the exact 11 * 26 / 22 is 13."""
    official = reposition_index((0, 0, 1, 26), (0, 0, 1, 22), (1, 32), "official")
    exact = reposition_index((0, 0, 1, 26), (0, 0, 1, 22), (1, 32), "exact")
    assert official[11] == 12 and exact[11] == 13
    assert torch.equal(official[:22], F.interpolate(torch.arange(26.0).view(1, 1, 1, 26), size=(1, 22),
                                                     mode="nearest").flatten().long())
    assert torch.equal(torch.nonzero(official != exact).flatten(), torch.tensor([11]))
    # a box of 3 x 2 tokens at (1, 2) moved and stretched to 6 x 4 tokens at (2, 0) on a 8 x 8 grid
    index = reposition_index((1, 2, 4, 4), (2, 0, 8, 4), (8, 8)).view(8, 8)
    rows, cols = torch.tensor([1, 1, 2, 2, 3, 3]), torch.tensor([2, 2, 3, 3])
    assert torch.equal(index[2:, :4], rows.view(-1, 1) * 8 + cols.view(1, -1))
    assert torch.all(index[:2] == 0) and torch.all(index[:, 4:] == 0)


@pytest.mark.parametrize("rule", ["official", "coverage"])
def test_subject_smaller_than_a_token_is_handled(rule):
    pipe = tiny("sd15")
    tiny_region = torch.stack([torch.as_tensor(box_mask(2, 2, 5, 5)) / 255.0,
                               torch.as_tensor(box_mask(64, 64, 128, 128)) / 255.0])
    handle, run_, ctl = _bound(pipe, IRDiffusion(mask_rule=rule), target=tiny_region)
    try:
        for grid in ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1)):
            members = run_.members(grid)
            if rule == "coverage":  # absent wherever it covers no token over half (here: everywhere)
                assert not torch.any(members[0]) and not torch.any(run_.relocated_mask(grid, 0))
            else:  # kept where a bilinear sample falls on it (16 x 16 samples pixel 3.5: the first token)
                assert members[0].nonzero().flatten().tolist() == ([0] if grid == (16, 16) else [])
            assert torch.any(members[1]) or grid == (1, 1)
        for level, kind in (("up.3", "self"), ("up.3", "cross"), ("mid", "self")):  # runs, no assert
            layer, attn, x, ehs = _inputs(handle, level, kind)
            out = handle.processors[layer.name](attn, x, ehs)
            assert torch.isfinite(out).all()
    finally:
        handle.remove()


def test_overlapping_official_regions_isolate_both_ways():
    """Regions that overlap on a grid (the official rule keeps both where both reach half): a token of both sees
    neither subject's other tokens, tokens of one subject see nothing of the other (spec §4.3's pairwise -inf)."""
    pipe = tiny("sd15")
    # on the 8 x 8 grid token (0, 0) samples pixels 7-8 x 7-8: subject 1 has three of them (0.75), subject 2 one
    # (0.25, rescaled to 1, as its other pixel (87, 87) alone at token (5, 5)): both keep token (0, 0)
    regions = torch.zeros(2, SIZE, SIZE)
    regions[0, :64, :64] = 1
    regions[0, 7, 7] = 0
    regions[1, 7, 7] = regions[1, 87, 87] = 1
    handle, run_, ctl = _bound(pipe, IRDiffusion(mutual_lambda=0.0, msa_layers="up.3"), target=regions)
    try:
        layer, attn, x, _ = _inputs(handle, "down.1")
        members = run_.members(layer.grid(ctl.call.grid))
        both = members[0] & members[1]
        assert both.nonzero().flatten().tolist() == [0] and _only(members, 1).nonzero().flatten().tolist() == [45]
        assert torch.any(both) and torch.any(_only(members, 0)) and torch.any(_only(members, 1))
        proc = handle.processors[layer.name]
        out = proc(attn, x)
        for moved, fixed in ((members[1], _only(members, 0)), (members[0], _only(members, 1)),
                             (_only(members, 0) | _only(members, 1), both)):
            x2 = x.clone()
            x2[3, moved & ~fixed] += 5.0
            torch.testing.assert_close(proc(attn, x2)[3, fixed], out[3, fixed], atol=1e-6, rtol=0)
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
    assert draws[0][0].shape == (2, 256)  # one draw per subject, as official
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1]) and not torch.equal(draws[0][0][0], draws[0][0][1])
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
            members = run_.members(layer.grid(ctl.call.grid))
        finally:
            handle.remove()
    assert torch.equal(outs[0.0], stock)
    outside = ~members.any(0)
    assert torch.equal(outs[0.9][3, outside], stock[3, outside])
    # lambda = 1 inside subject 1 only = cross-attention against subject 1's prompt
    m1 = AttnProcessor2_0()(attn, x[3:4], ehs[4:5])
    sub1 = _only(members, 0)
    torch.testing.assert_close(outs[1.0][3, sub1], m1[0, sub1], atol=1e-5, rtol=1e-5)


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
    for bad in ({"mask_rule": "nearest"}, {"mask_threshold": 1.5}, {"mask_threshold": "half"}):
        with pytest.raises(AttnCtrlError, match="mask_"):
            IRDiffusion(**bad)
    # the command line reads a threshold as a number, "otsu" as the official rule
    assert method_options("irdiffusion", ["mask_threshold=0.4"]) == {"mask_threshold": 0.4}
    assert method_options("irdiffusion", ["mask_threshold=otsu"]) == {"mask_threshold": "otsu"}
