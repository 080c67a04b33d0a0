"""AttentionMaps: rows are distributions over tokens, the image is unchanged, words resolve, errors are clear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny
from PIL import Image

import attnctrl
from attnctrl.core import AttnCtrlError, LayerSelectionError, TokenLookupError
from attnctrl.methods import AttentionMaps

WORD_INDEX = {"sd15": [5], "sd21": [5], "sdxl": [5], "flux": [4], "cogvideox": [4]}  # "a photo of a cat"


def test_rows_sum_to_one_and_image_is_unchanged(family):
    pipe = tiny(family)
    plain = run(pipe)
    with attnctrl.apply(pipe, AttentionMaps(words=["cat"])) as maps:
        recorded = run(pipe)
        tm = maps.token_maps()
        torch.testing.assert_close(tm.sum(-1), torch.ones(tm.shape[:-1]), atol=1e-5, rtol=0)
        assert maps.word_indices("cat") == WORD_INDEX[family]
        heat = maps.heat_maps()["cat"]
        assert heat.shape == tuple(tm.shape[:-1]) and np.isclose(heat.max(), 1.0)
    np.testing.assert_array_equal(recorded, plain)


def test_maps_average_every_recorded_layer_and_step():
    pipe = tiny("sd15")
    with attnctrl.apply(pipe, AttentionMaps(words=["cat"], layers="cross & up.3", start_step=1, end_step=3)) as m:
        run(pipe, steps=4)
        store = m.state.store
        assert store.counts == {(16, 16): 3 * 2}  # 3 layers of up.3 x steps 1 and 2
        full = m.token_maps()
    with attnctrl.apply(pipe, AttentionMaps(layers="cross")) as m:
        run(pipe, steps=2)
        assert m.state.store.counts == {(16, 16): 10, (8, 8): 10, (4, 4): 10, (2, 2): 2}  # 5+5+5+1 layers x 2
        assert m.token_maps().shape == full.shape


def test_cfg_half_and_batch_items():
    pipe = tiny("sd15")
    with attnctrl.apply(pipe, AttentionMaps(half="both")) as m:
        run(pipe, steps=1)
        assert m.state.store.mean().shape[0] == 2
    with attnctrl.apply(pipe, AttentionMaps()) as m:
        pipe(["a photo of a cat", "a red dog"], num_inference_steps=1, num_images_per_prompt=2,
             generator=torch.Generator().manual_seed(0), output_type="np")
        assert m.state.store.mean().shape[0] == 4
        assert m.word_indices("cat", index=1) == [5]
        assert m.word_indices("dog", index=2) == [3]
        with pytest.raises(TokenLookupError):
            m.word_indices("dog", index=0)
        with pytest.raises(AttnCtrlError, match="batch item 7"):
            m.token_maps(7)


def test_prompt_embeds_need_prompt_at_readout():
    pipe = tiny("sd15")
    embeds, negative = pipe.encode_prompt("a photo of a cat", "cpu", 1, True)
    with attnctrl.apply(pipe, AttentionMaps(words=["cat"])) as m:
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=1, output_type="np")
        with pytest.raises(AttnCtrlError, match="prompt="):
            m.heat_maps()
        assert set(m.heat_maps(prompt="a photo of a cat")) == {"cat"}


def test_overlays_and_artifacts():
    pipe = tiny("sd15")
    with attnctrl.apply(pipe, AttentionMaps(words=["cat", "photo"])) as m:
        image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        arts = m.artifacts(0, image=image)
        assert set(arts) == {"attn-cat", "attn-photo"}
        assert all(isinstance(a, Image.Image) and a.size == image.size for a in arts.values())
        m.check_prompt("a photo of a cat")
        with pytest.raises(TokenLookupError):
            m.check_prompt("a dog")


def test_config_validation():
    with pytest.raises(AttnCtrlError):
        AttentionMaps(half="middle")
    with pytest.raises(AttnCtrlError):
        AttentionMaps(start_step=5, end_step=2)
    with pytest.raises(AttnCtrlError):
        AttentionMaps(words=["cat", ""])
    assert AttentionMaps(words="cat, dog").words == ("cat", "dog")
    assert AttentionMaps(words=["cat"]) == AttentionMaps(words=("cat",))  # lists frozen to tuples
    with pytest.raises(LayerSelectionError, match="acts on cross/joint/single"):
        attnctrl.apply(tiny("sd15"), AttentionMaps(layers="self"))


def test_bare_denoiser_records_without_words():
    den = denoiser_of(tiny("sd15"))
    with attnctrl.apply(den, AttentionMaps(words=["cat"])) as m:
        den(torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=torch.randn(1, 77, 32))
        assert m.token_maps().shape == (16, 16, 77)
        with pytest.raises(AttnCtrlError, match="tokenizer"):
            m.heat_maps(prompt="a cat")


def test_half_precision_model_records_float32_distributions():
    pipe = attnctrl.load_pipeline("tiny-sd15", dtype="bf16")
    with attnctrl.apply(pipe, AttentionMaps(words=["cat"])) as m:
        run(pipe, steps=1)
        tm = m.token_maps()
        assert tm.dtype == torch.float32
        torch.testing.assert_close(tm.sum(-1), torch.ones(tm.shape[:-1]), atol=1e-5, rtol=0)
