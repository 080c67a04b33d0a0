"""FreeCustom (spec §8) and the shared reference machinery, on tiny SD 1.5 and SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

import attnctrl
from attnctrl.core import AttnCtrlError, Controller
from attnctrl.core.controller import bind
from attnctrl.kernels.attention import attention_probs
from attnctrl.pipelines import FreeCustomPipeline, Reference, ReferenceError
from attnctrl.pipelines.reference import ReferenceRun
from attnctrl.processors.freecustom import FreeCustom, MRSAAttnProcessor

pytestmark = pytest.mark.usefixtures("no_grad")
SIZE = 128  # latent 16 x 16: attention grids 16, 8, 4, 2


def image(seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def box_mask(x0, y0, x1, y1, size=SIZE):
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


REFS = [Reference(image(1), box_mask(10, 10, 70, 70), "a red circle"),
        Reference(image(2), box_mask(50, 40, 120, 110), "a striped square")]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- references --------------------------------------------------------------------------------------------------

def test_reference_loading_and_errors(tmp_path):
    img, mask = Reference(image(1), box_mask(10, 10, 70, 70)).load(0)
    assert mask.shape == (SIZE, SIZE) and set(mask.unique().tolist()) == {0.0, 1.0}
    soft = box_mask(10, 10, 70, 70)
    soft[10:40] = 200
    assert Reference(image(1), soft, mask_threshold=254).load(0)[1].sum() < Reference(image(1), soft).load(0)[1].sum()
    with pytest.raises(ReferenceError, match="reference 2: the mask is empty"):
        Reference(image(1), np.zeros((SIZE, SIZE), np.uint8)).load(1)
    with pytest.raises(ReferenceError, match="reference 1 .cat.: the mask is 64x64 but the image is 128x128"):
        Reference(image(1), box_mask(0, 0, 10, 10, size=64), name="cat").load(0)
    with pytest.raises(ReferenceError, match="cannot read image"):
        Reference(tmp_path / "missing.png").load(0)
    with pytest.raises(ReferenceError, match="fit"):
        Reference(image(1), fit="crop").load(0)


def test_pad_keeps_aspect_and_stretch_does_not():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    m = np.full((100, 200), 255, np.uint8)
    img, mask = Reference(wide, m).prepared(0, 128, 128)
    assert img.size == (128, 128) and mask[:, 64].tolist().count(1.0) == 64  # 200x100 -> 128x64, padded
    assert mask[0, 64] == 0 and mask[64, 64] == 1
    img, mask = Reference(wide, m, fit="stretch").prepared(0, 128, 128)
    assert mask.sum() == 128 * 128
    # the official torch nearest (source pixel floor(d * s)), image and mask alike: 8 -> 4 keeps columns 0, 2, 4, 6
    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))
    cols = np.zeros((8, 8), np.uint8)
    cols[:, ::2] = 255
    img, mask = Reference(ramp, cols, fit="stretch").prepared(0, 4, 4)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 60, 120, 180] and mask.sum() == 16


def test_reference_slots_are_re_noised_with_add_noise_every_step():
    pipe = tiny("sd15")
    seen = []
    run_ = ReferenceRun(pipe, REFS[:1], SIZE, SIZE, seed=5)
    with run_:  # the recording hook runs after the run's re-noising hook
        hook = denoiser_of(pipe).register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["sample"]).clone()), with_kwargs=True)
        try:
            pipe(["a circle", "a red circle"], num_inference_steps=3, generator=gen(), output_type="latent",
                 height=SIZE, width=SIZE)
        finally:
            hook.remove()
    assert len(seen) == 3
    g = torch.Generator().manual_seed(5)
    for step, sample in enumerate(seen):
        t = pipe.scheduler.timesteps[step]
        noise = torch.randn(run_.z0.shape, generator=g)
        expected = pipe.scheduler.add_noise(run_.z0, noise, t.reshape(1))
        torch.testing.assert_close(sample[1], expected[0])  # uncond half
        torch.testing.assert_close(sample[3], expected[0])  # cond half: the same noisy reference


# -- MRSA at one layer ---------------------------------------------------------------------------------------------

def _bound(pipe, config, refs=REFS, guidance=7.5):
    run_ = ReferenceRun(pipe, refs, SIZE, SIZE, seed=0)
    handle = bind(pipe, config, run_, MRSAAttnProcessor)
    ctl = Controller.of(pipe)
    pipe._guidance_scale = guidance
    ctl.enter_step(0, grid=(SIZE // 8, SIZE // 8))
    return handle, run_, ctl


def _layer_inputs(handle, level="up.3", batch=6, seed=0):
    layer = next(la for la in handle.layers if la.level == level)
    attn = denoiser_of(handle.controller.pipe).get_submodule(layer.module_name)
    n = int(np.prod(layer.grid(handle.controller.call.grid)))
    x = torch.randn(batch, n, attn.to_q.in_features, generator=gen(seed))
    return layer, attn, x


def test_mrsa_rows_gating_and_style_fidelity():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, FreeCustom(style_fidelity=1.0))
    try:
        assert [la.block for la in handle.layers] == [10, 11, 12, 13, 14, 15]  # spec §3.4: blocks 10-15
        layer, attn, x = _layer_inputs(handle)
        proc = handle.processors[layer.name]
        stock = AttnProcessor2_0()(attn, x)
        out = proc(attn, x)
        # reference rows (1, 2, 4, 5) and the uncond target (0, sf = 1) are plain attention, bit for bit
        for row in (0, 1, 2, 4, 5):
            assert torch.equal(out[row], stock[row])
        assert not torch.allclose(out[3], stock[3])
    finally:
        handle.remove()
    for config, step in ((FreeCustom(start_step=5), 2), (FreeCustom(end_step=2), 3), (FreeCustom(layers="up.3"), 0)):
        handle, run_, ctl = _bound(pipe, config)
        try:
            ctl.enter_step(step)
            for level in ("up.2", "up.3"):
                if not any(la.level == level for la in handle.layers):
                    continue
                layer, attn, x = _layer_inputs(handle, level)
                stock = AttnProcessor2_0()(attn, x)
                out = handle.processors[layer.name](attn, x)
                gated = step < config.start_step or (config.end_step is not None and step >= config.end_step)
                assert torch.equal(out, stock) == gated
        finally:
            handle.remove()


def test_style_fidelity_is_an_exact_convex_mix():
    pipe = tiny("sd15")
    outs = {}
    for sf in (0.0, 0.3, 1.0):
        handle, run_, ctl = _bound(pipe, FreeCustom(style_fidelity=sf))
        try:
            layer, attn, x = _layer_inputs(handle)
            stock = AttnProcessor2_0()(attn, x)
            outs[sf] = handle.processors[layer.name](attn, x)
        finally:
            handle.remove()
    assert torch.equal(outs[1.0][0], stock[0])  # sf = 1: plain self-attention, bit for bit
    assert not torch.allclose(outs[0.0][0], stock[0])  # sf = 0: full MRSA on the uncond row
    mix = 0.7 * outs[0.0][0] + 0.3 * stock[0]  # to_out is affine, so the convex mix commutes with it
    torch.testing.assert_close(outs[0.3][0], mix, atol=1e-5, rtol=1e-5)


def test_attention_outside_masks_is_exactly_zero_and_weights_are_monotonic():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, FreeCustom())
    try:
        grid = (16, 16)
        masks = run_.grid_masks(grid)
        g = gen(3)
        q = torch.randn(1, 2, 256, 16, generator=g)
        keys = [torch.randn(1, 2, 256, 16, generator=g) for _ in range(3)]
        mass = []
        for w in (0.0, 1.0, 3.0):
            bias = torch.cat([torch.zeros(256)] + [torch.where(m, torch.tensor(w), torch.tensor(float("-inf")))
                                                   for m in masks])
            p = attention_probs(q, torch.cat(keys, 2), bias.view(1, 1, 1, -1))
            torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 256))
            for i, m in enumerate(masks):
                block = p[..., 256 * (i + 1) : 256 * (i + 2)]
                assert torch.all(block[..., ~m] == 0)  # forbidden keys: exactly zero
            mass.append(p[..., 256:512].sum(-1).mean())
        assert mass[0] < mass[1] < mass[2]  # raising w_1 raises the mass on reference 1
    finally:
        handle.remove()


def test_perturbing_masked_out_reference_tokens_changes_nothing():
    pipe = tiny("sd15")
    handle, run_, ctl = _bound(pipe, FreeCustom())
    try:
        layer, attn, x = _layer_inputs(handle)
        proc = handle.processors[layer.name]
        out = proc(attn, x)
        outside = ~run_.grid_masks(layer.grid(ctl.call.grid))[0]
        x2 = x.clone()
        x2[4, outside] += 5.0  # reference 1, cond half, only outside its mask
        out2 = proc(attn, x2)
        torch.testing.assert_close(out2[3], out[3], atol=1e-6, rtol=0)  # the cond target is unaffected
        x3 = x.clone()
        x3[4, ~outside] += 5.0
        assert not torch.allclose(proc(attn, x3)[3], out[3])
    finally:
        handle.remove()


# -- the pipeline --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pipeline_without_references_is_the_base_pipeline(family):
    pipe = tiny(family)
    fc = FreeCustomPipeline.from_pipe(pipe)
    np.testing.assert_array_equal(run(fc, steps=2), run(pipe, steps=2))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pipeline_with_references_is_deterministic_and_changes_the_image(family):
    pipe = tiny(family)
    fc = FreeCustomPipeline.from_pipe(pipe)
    kw = dict(references=REFS, mask_weights=[3.0, 2.0], num_inference_steps=3, output_type="np", height=SIZE,
              width=SIZE)
    a = fc("a circle and a square", generator=gen(), **kw).images
    b = fc("a circle and a square", generator=gen(), **kw).images
    assert a.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(a, b)
    plain = pipe("a circle and a square", num_inference_steps=3, output_type="np", generator=gen(), height=SIZE,
                 width=SIZE).images
    assert np.abs(a - plain).max() > 1e-3
    assert attnctrl.applied(pipe) == [] and len(denoiser_of(pipe)._forward_pre_hooks) == 0
    # the target's initial noise may be given (a side-by-side run): the first slice of the generator's batch noise
    c = pipe.unet.config
    lat = SIZE // pipe.vae_scale_factor
    noise = torch.randn(1 + len(REFS), c.in_channels, lat, lat, generator=gen())[:1]
    given = fc("a circle and a square", latents=noise, generator=gen(), **kw).images
    np.testing.assert_array_equal(given, a)


def test_bad_inputs_fail_before_any_work():
    pipe = tiny("sd15")
    fc = FreeCustomPipeline.from_pipe(pipe)
    with pytest.raises(AttnCtrlError, match="3 mask weights given for 2"):
        fc("a cat", references=REFS, mask_weights=[1, 2, 3])
    with pytest.raises(AttnCtrlError, match="one image per call"):
        fc("a cat", references=REFS, num_images_per_prompt=2)
    with pytest.raises(ReferenceError, match="reference 1: the mask is empty"):
        fc("a cat", references=[Reference(image(1), np.zeros((SIZE, SIZE), np.uint8))])
    with pytest.raises(AttnCtrlError, match="style_fidelity"):
        fc("a cat", references=REFS, style_fidelity=2)
    with pytest.raises(AttnCtrlError, match="FreeCustomPipeline"):
        attnctrl.apply(pipe, FreeCustom())
    assert attnctrl.applied(pipe) == []
