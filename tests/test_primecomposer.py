"""PrimeComposer (spec §12) on tiny SD 2.1 / SD 1.5 / SDXL."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import denoiser_of, tiny, toyworld
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

import attnctrl
from attnctrl.core import AttnCtrlError, Controller
from attnctrl.core.controller import bind
from attnctrl.models.toyworld.examples import SHIPPED, shipped_composition
from attnctrl.pipelines import PrimeComposerPipeline
from attnctrl.pipelines.dpm_solver import DPMSolverPP
from attnctrl.pipelines.primecomposer import composition_geometry, exceptional_embedding
from attnctrl.processors.primecomposer import PrimeComposer, PrimeComposerAttnProcessor, PrimeState

pytestmark = pytest.mark.usefixtures("no_grad")
SIZE = 128


def picture(seed, size=SIZE):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def obj_mask(size=SIZE):
    m = np.zeros((size, size), np.uint8)
    m[30:100, 20:90] = 255
    return m


def test_inversion_then_regeneration_reconstructs_the_latent():
    pipe = tiny("sd21")
    embeds, _ = exceptional_embedding(pipe)
    solver = DPMSolverPP(pipe.scheduler.alphas_cumprod, steps=20, prediction_type="v_prediction")

    def eps(x, i, t):
        return pipe.unet(x, torch.tensor([float(t)]), encoder_hidden_states=embeds).sample

    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    z_t = solver.run(z0, eps, invert=True)[-1]
    back = solver.run(z_t, eps)[-1]
    assert torch.mean((back - z0) ** 2) < 0.05 * torch.var(z0)


def test_exceptional_prompt_has_no_position_embeddings():
    pipe = tiny("sd15")
    embeds, pooled = exceptional_embedding(pipe)
    assert embeds.shape == (1, 77, 32) and pooled is None
    # every position holds the same token and no position embedding: the first position (causal, sees only itself)
    # equals the text model run on one token without positions
    xl_embeds, xl_pooled = exceptional_embedding(tiny("sdxl"))
    assert xl_embeds.shape == (1, 77, 64) and xl_pooled.shape == (1, 32)


def _state(pipe, grid_mask=None, rca=()):
    lat = SIZE // 8
    obj = torch.zeros(lat, lat, dtype=torch.bool)
    obj[4:12, 3:11] = True if grid_mask is None else grid_mask
    state = PrimeState(obj, (3, 2, 13, 12), list(rca))
    handle = bind(pipe, PrimeComposer(), state, PrimeComposerAttnProcessor)
    ctl = Controller.of(pipe)
    ctl.call.grid = (lat, lat)
    return state, handle


def _layer(handle, level, kind):
    layer = next(la for la in handle.layers if la.level == level and la.kind == kind)
    return layer, denoiser_of(handle.controller.pipe).get_submodule(layer.module_name)


def test_identity_outside_the_injection_window():
    pipe = tiny("sd21")
    state, handle = _state(pipe)
    try:
        for level, kind in (("down.0", "self"), ("up.3", "self"), ("up.3", "cross")):
            layer, attn = _layer(handle, level, kind)
            x = torch.randn(2, 256, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
            ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1)) if kind == "cross" else None
            state.mode, state.inject = "gen", False
            assert torch.equal(handle.processors[layer.name](attn, x, ehs), AttnProcessor2_0()(attn, x, ehs))
    finally:
        handle.remove()


def test_correlation_diffuser_and_steering_match_the_dense_definition():
    pipe = tiny("sd21")
    state, handle = _state(pipe)
    try:
        layer, attn = _layer(handle, "up.3", "self")
        proc = handle.processors[layer.name]
        g = torch.Generator().manual_seed(0)
        r = torch.randn(2, 256, attn.to_q.in_features, generator=g)  # the canvas with [uncond, cond] text
        state.mode = "cd"
        cd_out = proc(attn, r)
        objects, found = state.objects((16, 16))
        s = state.logits[layer.name]
        assert s.shape == (1, attn.heads, 256, len(objects)) and len(objects) == int(state.object_mask.sum()) and found
        # official: queries of the conditional item, keys of the unconditional one (context x[2]), object keys only
        q1 = attn.to_q(r[1:]).view(1, 256, attn.heads, -1).transpose(1, 2)
        k0 = attn.to_k(r[:1]).view(1, 256, attn.heads, -1).transpose(1, 2)[:, :, objects]
        torch.testing.assert_close(s, q1 @ k0.transpose(-1, -2) * q1.shape[-1] ** -0.5, atol=1e-5, rtol=1e-5)
        # steering: compare with the dense rule Lambda[:, :, O] = S, Lambda[:, O, :] = S^T
        x = torch.randn(2, 256, attn.to_q.in_features, generator=g)
        state.mode, state.inject = "gen", True
        out = proc(attn, x)
        q = attn.to_q(x[1:]).view(1, 256, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(x[1:]).view(1, 256, attn.heads, -1).transpose(1, 2)
        v = attn.to_v(x[1:]).view(1, 256, attn.heads, -1).transpose(1, 2)
        lam = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        lam[..., objects] = s
        lam[..., objects, :] = s.transpose(-1, -2)
        ref = (lam.softmax(-1) @ v).transpose(1, 2).reshape(1, 256, -1)
        ref = attn.to_out[0](ref)
        torch.testing.assert_close(out[1:], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[0], AttnProcessor2_0()(attn, x)[0])  # the uncond half is untouched
        assert cd_out.shape == r.shape
        state.mode = "cd"
        # the CD output ignores the keys and values of non-object tokens and of the conditional item
        q, k, v = (torch.randn(2, attn.heads, 256, 32, generator=g) for _ in range(3))
        outside = torch.ones(256, dtype=torch.bool)
        outside[objects] = False
        k2, v2 = k.clone(), v.clone()
        k2[:, :, outside] += 3.0
        v2[:, :, outside] -= 3.0
        k2[1] += 1.0
        v2[1] -= 1.0
        assert torch.equal(proc.attend(attn, q, k, v), proc.attend(attn, q, k2, v2))
    finally:
        handle.remove()


def test_a_layer_where_the_object_vanishes_is_not_steered():
    """Official: where the strided mask is empty the CD attends to the whole box, and that layer is not steered."""
    pipe = tiny("sd21")
    one = torch.zeros(8, 8, dtype=torch.bool)
    one[1, 1] = True  # one odd latent pixel: gone on every coarser (strided) grid
    state, handle = _state(pipe, grid_mask=one)
    try:
        layer, attn = _layer(handle, "up.2", "self")
        grid = layer.grid((16, 16))
        assert tuple(grid) == (8, 8)
        objects, found = state.objects(grid)
        assert not found and len(objects) > 1  # the box's tokens
        proc = handle.processors[layer.name]
        g = torch.Generator().manual_seed(0)
        state.mode = "cd"
        proc(attn, torch.randn(2, 64, attn.to_q.in_features, generator=g))
        assert state.logits[layer.name].shape[-1] == len(objects)
        x = torch.randn(2, 64, attn.to_q.in_features, generator=g)
        state.mode, state.inject = "gen", True
        assert torch.equal(proc(attn, x), AttnProcessor2_0()(attn, x))
    finally:
        handle.remove()


def test_rca_gives_exactly_zero_attention_outside_the_object():
    pipe = tiny("sd21")
    state, handle = _state(pipe, rca=(5,))
    try:
        layer, attn = _layer(handle, "up.3", "cross")
        proc = handle.processors[layer.name]
        x = torch.randn(2, 256, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
        ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
        state.mode = "gen"
        out = proc(attn, x, ehs)
        ehs2 = ehs.clone()
        ehs2[1, 5] += 10.0  # the marked word's key/value change
        out2 = proc(attn, x, ehs2)
        inside = torch.zeros(256, dtype=torch.bool)
        inside[state.objects((16, 16))[0]] = True
        assert torch.equal(out2[1, ~inside], out[1, ~inside])  # probability exactly 0 outside the object
        assert not torch.allclose(out2[1, inside], out[1, inside])
    finally:
        handle.remove()


@pytest.mark.parametrize("family, domain", [("sd21", "cross"), ("sd15", "same"), ("sdxl", "cross")])
def test_pipeline_paste_back_and_pass_count(family, domain):
    pipe = tiny(family)
    pc = PrimeComposerPipeline.from_pipe(pipe)
    size = 256 if family == "sdxl" else SIZE
    bg, obj = picture(1, size), picture(2, size)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    out = pc(bg, obj, obj_mask(size), location=box, prompt="a cat", num_inference_steps=6, domain=domain,
             height=size, width=size, generator=torch.Generator().manual_seed(0))
    a, b = np.asarray(out.images[0]), np.asarray(bg)
    outside = np.ones((size, size), bool)
    outside[box[1] : box[3], box[0] : box[2]] = False
    if domain == "cross":
        assert np.array_equal(a[outside], b[outside])  # exact background outside the location
    s, A = 6, pc.last_schedule["A"]
    assert pc.unet_samples == 2 * s + 2 * A + 2 * s  # two inversions of one item, CD and generator of two
    assert attnctrl.applied(pipe) == []


def test_box_at_the_image_edge_and_bad_inputs():
    pc = PrimeComposerPipeline.from_pipe(tiny("sd21"))
    bg, obj = picture(1), picture(2)
    out = pc(bg, obj, obj_mask(), location=(80, 90, 128, 128), prompt="a cat", num_inference_steps=3)
    assert out.images[0].size == (SIZE, SIZE)  # touching the bottom-right border (official: shape mismatch)
    with pytest.raises(AttnCtrlError, match="location"):
        pc(bg, obj, obj_mask(), location=(200, 200, 300, 300), prompt="a cat", num_inference_steps=3)
    with pytest.raises(AttnCtrlError, match="reference mask is empty"):
        pc(bg, obj, np.zeros((SIZE, SIZE), np.uint8), location=(10, 10, 60, 60), prompt="a cat")
    small = picture(3, 64)  # a reference of another size than the background: resized into the box
    geo = composition_geometry(bg, small, obj_mask(64), (10, 10, 60, 60), SIZE, SIZE)
    assert geo[2].sum() > 0 and geo[2][:10].sum() == 0
    with pytest.raises(AttnCtrlError, match="location"):
        pc(bg, obj, obj_mask(), prompt="a cat")
    with pytest.raises(AttnCtrlError, match="domain"):
        PrimeComposer(domain="photo")
    assert PrimeComposer(rca_words=None).rca_words == () and PrimeComposer(rca_words=["cat"]).rca_words == ("cat",)


EXAMPLE = shipped_composition()
BOX = EXAMPLE["box"]


@functools.cache
def _toyworld_composite(seed: int = 0):
    """The shipped example (the hollow pink circle into the background), same-domain defaults."""
    image = PrimeComposerPipeline.from_pipe(toyworld())(
        SHIPPED / EXAMPLE["background"], SHIPPED / EXAMPLE["reference"], SHIPPED / EXAMPLE["reference_mask"],
        location=BOX, prompt=EXAMPLE["prompt"], domain="same", rca_words=["circle"],
        generator=torch.Generator().manual_seed(seed)).images[0]
    background = np.asarray(Image.open(SHIPPED / EXAMPLE["background"]).convert("RGB")).astype(int)
    return image, background


def test_toyworld_composite_leaves_everything_outside_the_box_exact():
    image, background = _toyworld_composite()
    outside = np.ones(background.shape[:2], bool)
    outside[BOX[1] : BOX[3], BOX[0] : BOX[2]] = False
    assert np.abs(np.asarray(image).astype(int) - background)[outside].max() == 0


def test_toyworld_object_lands_in_the_box_with_the_references_look():
    """The trained model, same-domain defaults, seeds 0-3: the object in the box has the reference's shape, colour and
    pattern -- hollow, which this model does not draw from text (plain generation of the same prompt: rarely)."""
    from attnctrl.models.toyworld.examples import shipped_references, took_look

    reference = shipped_references()["hollow-pink-circle"]
    ours = took_look([_toyworld_composite(seed)[0] for seed in range(4)], reference, box=BOX)
    plain = took_look([toyworld()(EXAMPLE["prompt"], num_inference_steps=20,
                                  generator=torch.Generator().manual_seed(seed)).images[0] for seed in range(4)],
                      reference, box=BOX)
    assert ours["shape+colour"] == 1 and ours["shape+colour+pattern"] >= 0.75, ours
    assert ours["shape+colour+pattern"] >= plain["shape+colour+pattern"] + 0.5, (ours, plain)
