"""Layer description and selectors on every tiny family."""

from __future__ import annotations

import pytest
import torch
from conftest import denoiser_of, tiny

from attnctrl.core import LayerSelectionError, UnsupportedModelError, describe

EXPECTED = {  # family -> (layers, transformer blocks, kinds)
    "sd15": (32, 16, {"self": 16, "cross": 16}),
    "sd21": (32, 16, {"self": 16, "cross": 16}),
    "sdxl": (28, 14, {"self": 14, "cross": 14}),
    "flux": (4, 4, {"joint": 2, "single": 2}),
    "cogvideox": (2, 2, {"joint": 2}),
}


def test_every_processor_is_described(family):
    den = denoiser_of(tiny(family))
    layers = describe(den)
    n, blocks, kinds = EXPECTED[family]
    assert len(layers) == n == len(den.attn_processors)
    assert layers.num_blocks == blocks
    assert {k: sum(la.kind == k for la in layers) for k in kinds} == kinds
    assert [la.index for la in layers] == list(range(n))
    assert {la.name for la in layers} == set(den.attn_processors)


def test_unet_execution_order_and_grids():
    layers = describe(denoiser_of(tiny("sd15")))
    levels = list(dict.fromkeys(la.level for la in layers))
    assert levels == ["down.0", "down.1", "down.2", "mid", "up.1", "up.2", "up.3"]  # mid between down and up
    # self then cross inside one transformer block, same block index
    assert layers[0].kind == "self" and layers[1].kind == "cross" and layers[0].block == layers[1].block == 0
    ds = {la.level: la.downsample for la in layers}
    assert ds == {"down.0": 1, "down.1": 2, "down.2": 4, "mid": 8, "up.1": 4, "up.2": 2, "up.3": 1}
    assert layers.by_name("up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor").grid((64, 64)) == (32, 32)
    assert layers[0].grid((17, 9)) == (17, 9)
    assert layers.by_name("mid_block.attentions.0.transformer_blocks.0.attn1.processor").grid((17, 9)) == (3, 2)


def test_grid_matches_real_token_counts():
    """The computed grid of every UNet layer equals the number of tokens the layer really sees (odd size too)."""
    pipe = tiny("sd15")
    den = denoiser_of(pipe)
    layers = describe(den)
    seen = {}
    hooks = [
        den.get_submodule(la.module_name).register_forward_pre_hook(
            lambda m, args, kwargs, name=la.name: seen.__setitem__(name, args[0].shape[1] if args else
                                                                     kwargs["hidden_states"].shape[1]),
            with_kwargs=True)
        for la in layers
    ]
    try:
        latent = torch.randn(1, 4, 12, 20)
        den(latent, 10, encoder_hidden_states=torch.randn(1, 77, 32))
    finally:
        for h in hooks:
            h.remove()
    for la in layers:
        h, w = la.grid((12, 20))
        assert seen[la.name] == h * w, la.name


@pytest.mark.parametrize(
    "selector, count",
    [
        ("decoder", 18), ("encoder", 12), ("mid", 2), ("up.2", 6), ("self", 16), ("cross", 16), ("text", 16),
        ("decoder & self", 9), ("decoder self", 9), ("up.2, up.3", 12), (["up.2", "up.3"], 12), ("res>=8", 20),
        ("res==16", 10), ("ds<=2", 20), ("blocks[10:16]", 12), ("blocks[-1]", 2), ("layers[0:4]", 4),
        ("!cross", 16), ("up_blocks.3.*", 6), ("up_blocks.3.attentions.0.transformer_blocks.0.attn1", 1),
        ("all", 32), ("*", 32), (None, 32),
    ],
)
def test_selectors_sd15(selector, count):
    assert len(describe(denoiser_of(tiny("sd15"))).select(selector)) == count


def test_selectors_dit():
    flux = describe(denoiser_of(tiny("flux")))
    assert [la.kind for la in flux.select("double")] == ["joint", "joint"]
    assert [la.kind for la in flux.select("single")] == ["single", "single"]
    assert len(flux.select("text")) == 4
    cog = describe(denoiser_of(tiny("cogvideox")))
    assert [la.block for la in cog.select("blocks[1:]")] == [1]
    assert len(cog.select(lambda la: la.block == 0)) == 1


@pytest.mark.parametrize("selector", ["up.7", "res>=1000", "blocks[40:50]", "self & cross", "decodr", "[]", ""])
def test_empty_or_bad_selection_raises_with_choices(selector):
    layers = describe(denoiser_of(tiny("sd15")))
    with pytest.raises(LayerSelectionError) as e:
        layers.select(selector)
    assert "levels down.0, down.1, down.2, mid, up.1, up.2, up.3" in str(e.value) or "bad index" in str(e.value)


def test_empty_list_selector_raises():
    with pytest.raises(LayerSelectionError):
        describe(denoiser_of(tiny("sd15"))).select([])


def test_unsupported_model_raises():
    with pytest.raises(UnsupportedModelError, match="supports UNet2DConditionModel"):
        describe(torch.nn.Linear(2, 2))
