"""CLoRA (spec §8) on tiny SD 1.5 (and a smoke run on SDXL)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import denoiser_of, tiny
from diffusers.models.attention_processor import AttnProcessor2_0

from attnctrl.core import AttnCtrlError, Controller, TokenLookupError
from attnctrl.core.controller import bind
from attnctrl.models.lora import random_lora
from attnctrl.pipelines import CLoRAPipeline
from attnctrl.pipelines.base import keeping_shared_state
from attnctrl.processors.clora import CLoRA, CLoRAState, CrossAttnRecorder, dilate, erode, lora_masks, min_max, nt_xent

SIZE = 128
PROMPTS = ["a cat and a dog", "a sks dog and a cat", "a zwx cat and a dog"]
CONCEPTS = [["cat", "cat", "zwx cat"], ["dog", "sks dog", "dog"]]
MASKS = [[], ["sks dog"], ["zwx cat"]]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = tiny("sd15")
    return str(random_lora(pipe, folder / "dog.safetensors", seed=1)), str(random_lora(pipe, folder / "cat.safetensors",
                                                                                       seed=2))


def test_recorder_rows_sum_to_one_and_output_is_the_stock_one():
    pipe = tiny("sd15")
    state = CLoRAState(record_uncond=False)
    handle = bind(pipe, CLoRA(), state, CrossAttnRecorder)
    try:
        assert {la.level for la in handle.layers} == {"down.2", "up.1"} and len(handle.layers) == 5  # 1/32 of the image
        layer = handle.layers[0]
        attn = denoiser_of(pipe).get_submodule(layer.module_name)
        ctl = Controller.of(pipe)
        ctl.call.grid = (SIZE // 8, SIZE // 8)
        x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
        ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
        state.recording = True
        out = handle.processors[layer.name](attn, x, ehs)
        state.recording = False
        assert torch.equal(out, AttnProcessor2_0()(attn, x, ehs))
        maps = state.take()
        assert maps.shape == (4, 4, 77)
        torch.testing.assert_close(maps.sum(-1), torch.ones(4, 4))
    finally:
        handle.remove()


def test_min_max_and_loss_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 10, generator=g)
    torch.testing.assert_close(min_max(3 * x + 2), min_max(x))  # invariant to positive affine rescaling
    assert torch.isfinite(min_max(torch.ones(1, 5))).all()  # the epsilon: no NaN on flat maps
    samples = torch.rand(6, 10, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = nt_xent(samples, labels)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(nt_xent(samples[perm], labels[perm]), loss)  # invariant to sample order
    # a hand-computed 2-class x 2-sample case: unit vectors with known cosines
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    cos = a @ a.T
    t = 0.5
    terms = []
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2)):
        neg = sum(math.exp(cos[i, n] / t) for n in range(4) if y[n] != y[i])
        terms.append(-math.log(math.exp(cos[i, j] / t) / (math.exp(cos[i, j] / t) + neg)))
    assert abs(nt_xent(a, y, t).item() - sum(terms) / 4) < 1e-5
    with pytest.raises(AttnCtrlError, match="positive pair"):
        nt_xent(a[:2], torch.tensor([0, 1]))


def test_masks():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 4, 77, generator=g)
    masks = lora_masks(maps, [[], [5], [6, 7]], threshold=0.3)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(masks.sum(0) >= 1)  # every pixel has a branch
    assert torch.equal(masks[0], ((masks[1] + masks[2]) == 0).float())  # branch 0 = the background
    for j, k in ((1, 5), (2, 6), (2, 7)):
        flat = maps[j, :, :, k].flatten().argmax()
        assert masks[j].flatten()[flat] == 1  # the arg-max pixel of each listed token is inside its mask
    full = lora_masks(maps, [[], [5], []], threshold=0.0)
    assert torch.all(full[1] == 1)  # alpha = 0: every pixel with A > 0


def _grid(rows: str) -> torch.Tensor:
    return torch.tensor([[float(c) for c in row] for row in rows.split()])


def test_mask_morphology_is_the_officials_3x3_max_pool():
    """The official optional steps on a known blob: a 3 x 3 square with a one-pixel spur and a one-pixel hole
    elsewhere; max-pool padding never wins, so a pixel on the map's border is not eroded by the outside."""
    blob = _grid("0000000 0111000 0111000 0111100 0000000 0000000 0000000")
    assert torch.equal(dilate(blob), _grid("1111100 1111100 1111110 1111110 1111110 0000000 0000000"))
    assert torch.equal(erode(blob), _grid("0000000 0000000 0010000 0000000 0000000 0000000 0000000"))
    assert torch.equal(dilate(erode(blob)), _grid("0000000 0111000 0111000 0111000 0000000 0000000 0000000"))  # opening
    ring = _grid("11111 10111 11111 11111 11111")  # a hole at (1, 1)
    assert torch.equal(erode(dilate(ring)), torch.ones(5, 5))  # closing fills it; the border stays set
    assert torch.equal(erode(torch.ones(4, 4)), torch.ones(4, 4))
    # through lora_masks: the maps put token 5's mask on the blob, the flags apply in the official order
    # (dilate, erode, opening, closing), then branch 0 takes what no mask covers
    maps = torch.zeros(2, 7, 7, 77)
    maps[1, :, :, 5] = blob
    plain = lora_masks(maps, [[], [5]], threshold=0.3)
    assert torch.equal(plain[1], blob) and torch.equal(plain[0], 1 - blob)
    for flags, expect in (({"mask_dilate": True}, dilate(blob)), ({"mask_erode": True}, erode(blob)),
                          ({"mask_opening": True}, dilate(erode(blob))), ({"mask_closing": True}, erode(dilate(blob))),
                          ({"mask_dilate": True, "mask_erode": True}, erode(dilate(blob))),
                          ({"mask_erode": True, "mask_opening": True}, dilate(erode(erode(blob))))):
        masks = lora_masks(maps, [[], [5]], threshold=0.3, **flags)
        assert torch.equal(masks[1], expect) and torch.equal(masks[0], 1 - expect), flags
    assert CLoRA().morphology() == dict.fromkeys(("mask_erode", "mask_dilate", "mask_opening", "mask_closing"), False)


def test_identical_branches_fuse_to_the_single_branch_and_no_update_is_the_base_pipeline():
    pipe = tiny("sd15")
    cl = CLoRAPipeline.from_pipe(pipe)
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="np", step_size=0)
    one = cl(["a cat"], [None], concepts=None, mask_words=[[]], generator=torch.Generator().manual_seed(0), **kw)
    base = pipe("a cat", num_inference_steps=3, height=SIZE, width=SIZE, output_type="np",
                generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(one.images, base.images)  # one branch, no update: bit for bit
    three = cl(["a cat"] * 3, [None] * 3, concepts=None, mask_words=[[], ["cat"], []],
               generator=torch.Generator().manual_seed(0), **kw)
    np.testing.assert_allclose(three.images, one.images, atol=1e-5)


def test_update_lowers_the_loss_and_call_counts(loras):
    pipe = tiny("sd15")
    cl = CLoRAPipeline.from_pipe(pipe)
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, output_type="np", max_iter_to_alter=2,
              iterative_steps=(0,), iterative_steps_steps=2, generator=torch.Generator().manual_seed(0))
    out = cl(PROMPTS, [None, *loras], CONCEPTS, MASKS, **kw)
    assert cl.unet_calls == 3 * 4 + 3 * 2  # N per step, plus N per extra round at step 0
    assert cl.last_masks.shape == (3, 4, 4)
    assert pipe.get_list_adapters() == {}  # the call unloaded the LoRAs it loaded
    again = cl(PROMPTS, [None, *loras], CONCEPTS, MASKS, **{**kw, "generator": torch.Generator().manual_seed(0)})
    np.testing.assert_array_equal(out.images, again.images)  # determinism
    # first-order check: one small step along the gradient lowers the loss (the LoRAs loaded here by the test are
    # unloaded when the block ends)
    samples, _ = cl._resolve(PROMPTS, CONCEPTS, MASKS)
    with keeping_shared_state(cl):
        state = CLoRAState(False)
        handle = bind(pipe, CLoRA(), state, CrossAttnRecorder)
        try:
            names = [None] + [cl.load_lora(p) for p in loras]
            embeds = []
            for j, prompt in enumerate(PROMPTS):
                cl._activate(names[j], None, 1.0)
                embeds.append(cl.encode_cfg(prompt, "cpu")[0])

            def loss_at(z):
                maps = []
                for j in range(3):
                    cl._activate(names[j], None, 1.0)
                    state.recording = True
                    pipe.unet(torch.cat([z, z]), 500, encoder_hidden_states=embeds[j])
                    state.recording = False
                    maps.append(state.take())
                return cl.loss(torch.stack(maps), samples, 0.5)

            z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
            loss = loss_at(z)
            (grad,) = torch.autograd.grad(loss, z)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
            with torch.no_grad():
                assert loss_at(z - 1e-3 * grad / grad.norm()) < loss
        finally:
            handle.remove()
    assert pipe.get_list_adapters() == {}


def test_steps_after_max_iter_run_without_graphs(loras):
    pipe = tiny("sd15")
    cl = CLoRAPipeline.from_pipe(pipe)
    grads = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: grads.append(torch.is_grad_enabled()),
                                               with_kwargs=True)
    try:
        cl(PROMPTS, [None, *loras], CONCEPTS, MASKS, num_inference_steps=4, max_iter_to_alter=2, iterative_steps=(),
           height=SIZE, width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert grads == [True] * 6 + [False] * 6
    assert pipe.get_list_adapters() == {}  # the call unloaded the LoRAs it loaded


def test_bad_inputs_fail_before_denoising(tmp_path, loras):
    pipe = tiny("sd15")
    cl = CLoRAPipeline.from_pipe(pipe)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(AttnCtrlError, match="does not exist"):
            cl(PROMPTS, [None, str(tmp_path / "nope.safetensors"), loras[1]], CONCEPTS, MASKS)
        bad = tmp_path / "bad.safetensors"
        from safetensors.torch import save_file

        save_file({"unet.down_blocks.0.foo.lora_A.weight": torch.zeros(2, 2)}, str(bad))
        with pytest.raises(AttnCtrlError, match="does not fit this model"):
            cl(PROMPTS, [None, str(bad), loras[1]], CONCEPTS, MASKS)
        with pytest.raises(TokenLookupError, match="prompt 2: the word 'cow'"):
            cl(PROMPTS, [None, *loras], [["cat", "cat", "zwx cat"], ["dog", "cow", "dog"]], MASKS)
        with pytest.raises(AttnCtrlError, match="no positive pair"):  # each concept named once: negatives only
            cl(PROMPTS, [None, *loras], [["cat", None, None], ["dog", None, None]], MASKS)
        with pytest.raises(AttnCtrlError, match="concept 1 is named in no prompt"):
            cl(PROMPTS, [None, *loras], [[None, None, None], ["dog", "sks dog", "dog"]], MASKS)
        with pytest.raises(AttnCtrlError, match="one LoRA"):
            cl(PROMPTS, [None], CONCEPTS, MASKS)
        assert calls == []  # nothing was denoised
    finally:
        hook.remove()
    assert pipe.get_list_adapters() == {}  # the LoRAs loaded before each error (and the half-loaded one) are gone


def test_sdxl_smoke(tmp_path):
    pipe = tiny("sdxl")
    cl = CLoRAPipeline.from_pipe(pipe)
    out = cl(["a cat and a dog", "a dog and a cat"], [None, None], [["cat", "cat"], ["dog", "dog"]], [[], ["dog"]],
             num_inference_steps=2, max_iter_to_alter=1, iterative_steps=(), height=256, width=256,
             output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 256, 256, 3) and np.isfinite(out.images).all()


def test_a_layers_option_is_refused_not_dropped():
    """CLoRA's recorded layers are record_layers; the inherited layers option would be silently ignored."""
    import pytest

    from attnctrl.core import AttnCtrlError
    from attnctrl.methods import CLoRA

    with pytest.raises(AttnCtrlError, match="record_layers; it has no layers option"):
        CLoRA(layers="cross")
