"""DiTCtrl (spec §11) on tiny CogVideoX with RoPE (5B-style) and sincos positions (2B-style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

import attnctrl
from attnctrl.core import AttnCtrlError, Controller, TokenLookupError
from attnctrl.core.controller import bind
from attnctrl.kernels.attention import attention_probs, attention_with_lse
from attnctrl.pipelines import DiTCtrlPipeline
from attnctrl.pipelines.ditctrl import plan_segments, triangular_weights
from attnctrl.processors.ditctrl import DiTCtrl, DiTCtrlAttnProcessor, DiTCtrlState

pytestmark = pytest.mark.usefixtures("no_grad")
KW = dict(num_frames=9, num_inference_steps=4, overlap=1, num_transition_blocks=1, kv_steps=(1, 3),
          output_type="np")


@pytest.fixture(scope="module")
def sincos_pipe():
    """The tiny CogVideoX with 2B-style sincos positions instead of RoPE."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    base = tiny("cogvideox")
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=False,
    ).eval()
    pipe = CogVideoXPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                             transformer=transformer, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bound(pipe, steps=range(0, 10), all_layers=True, mask_guided=False, threshold=0.3):
    names = {la.name for la in attnctrl.describe(pipe.transformer)} if all_layers else set()
    state = DiTCtrlState(steps, names, mask_guided, threshold)
    handle = bind(pipe, DiTCtrl(), state, DiTCtrlAttnProcessor)
    Controller.of(pipe).call.grid = (3, 4, 4)
    return state, handle


def _qkv(seed=0, text=6, video=48, heads=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(4, heads, text + video, d, generator=g) for _ in range(3))


def test_identical_source_and_target_give_the_plain_output():
    pipe = tiny("cogvideox")
    state, handle = _bound(pipe)
    try:
        proc = next(iter(handle.processors.values()))
        q, k, v = _qkv()
        for t in (q, k, v):
            t[1], t[3] = t[0], t[2]  # target = source
        state.begin_pass(True)
        shared = proc.attend(None, q, k, v, text_len=6)
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(shared, plain, atol=1e-6, rtol=1e-6)
        q2, k2, v2 = _qkv(1)
        out = proc.attend(None, q2, k2, v2, text_len=6)
        ref = torch.nn.functional.scaled_dot_product_attention(q2[[1, 3]], k2[[0, 2]], v2[[0, 2]])
        torch.testing.assert_close(out[[1, 3]], ref)  # targets read the source's K/V ...
        assert torch.equal(out[[0, 2]], torch.nn.functional.scaled_dot_product_attention(q2, k2, v2)[[0, 2]])
    finally:
        handle.remove()


def test_empty_window_is_the_stock_processor_bit_for_bit():
    pipe = tiny("cogvideox")
    for steps, all_layers in ((range(0), True), (range(0, 10), False)):
        state, handle = _bound(pipe, steps, all_layers)
        try:
            state.begin_pass(True)
            layer = handle.layers[0]
            attn = pipe.transformer.get_submodule(layer.module_name)
            g = torch.Generator().manual_seed(0)
            hs, ehs = torch.randn(4, 48, 32, generator=g), torch.randn(4, 6, 32, generator=g)
            ours = handle.processors[layer.name](attn, hs, ehs)
            stock = CogVideoXAttnProcessor2_0()(attn, hs, ehs)
            assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])
        finally:
            handle.remove()


def test_mask_guided_limits_locality_and_text_rows():
    pipe = tiny("cogvideox")
    outs = {}
    q, k, v = _qkv(2)
    for thr in (-1.0, 0.3, 1.2):
        state, handle = _bound(pipe, mask_guided=True, threshold=thr)
        try:
            proc = next(iter(handle.processors.values()))
            state.begin_pass(True, [2, 3], [2, 3])
            outs[thr] = proc.attend(None, q, k, v, text_len=6)
        finally:
            handle.remove()
    state, handle = _bound(pipe)
    try:
        state.begin_pass(True)
        plain = next(iter(handle.processors.values())).attend(None, q, k, v, text_len=6)
    finally:
        handle.remove()
    torch.testing.assert_close(outs[-1.0], plain, atol=1e-5, rtol=1e-5)  # all foreground
    torch.testing.assert_close(outs[1.2], plain, atol=1e-5, rtol=1e-5)  # no foreground: bg sees every key
    torch.testing.assert_close(outs[0.3][:, :, :6], plain[:, :, :6], atol=1e-5, rtol=1e-5)  # text rows


def test_fg_bg_locality():
    pipe = tiny("cogvideox")
    state, handle = _bound(pipe, mask_guided=True, threshold=0.3)
    try:
        proc = next(iter(handle.processors.values()))
        q, k, v = _qkv(3)
        state.begin_pass(True, [2], [2])
        proc._record(q, k, attention_with_lse(q, k, v)[1], 6)
        fg_src, fg_tgt = proc._masks(6)
        assert fg_src.any() and (~fg_src).any()
        base = proc._mask_guided(q[[1, 3]], k[[0, 2]], v[[0, 2]], 6)
        bg_key = int(torch.nonzero(~fg_src)[0]) + 6
        k2, v2 = k.clone(), v.clone()
        k2[[0, 2], :, bg_key] += 2.0
        v2[[0, 2], :, bg_key] -= 2.0
        moved = proc._mask_guided(q[[1, 3]], k2[[0, 2]], v2[[0, 2]], 6)
        fg_rows = torch.nonzero(fg_tgt).flatten() + 6
        torch.testing.assert_close(moved[:, :, fg_rows], base[:, :, fg_rows], atol=1e-6, rtol=0)  # O_fg ignores bg
    finally:
        handle.remove()


def test_lse_maps_equal_the_dense_softmax_slice():
    q, k, v = _qkv(4)
    out, lse = attention_with_lse(q, k, v)
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
    cols = attention_probs(q, k, cols=[2, 3], lse=lse)
    torch.testing.assert_close(cols, dense[..., [2, 3]], atol=1e-6, rtol=0)


def test_segments_and_blending_weights():
    assert plan_segments(2, 1, 0) == [(0, 0, 0.0), (0, 1, 0.5), (1, 1, 0.0)]
    assert len(plan_segments(3, 2, 0)) == 7 and len(plan_segments(3, 1, 0)) == 5  # spec §3 examples
    assert len(plan_segments(3, 1, 1)) == 6
    w = triangular_weights(13)
    assert torch.allclose(w[6], torch.tensor(1.0, dtype=torch.float64)) and abs(float(w[0]) - 1 / 13) < 1e-12
    torch.testing.assert_close(w, w.flip(0))  # symmetric (up to rounding of 2 - x)


@pytest.mark.parametrize("which", ["rope", "sincos"])
def test_pipeline_single_prompt_dedupe_and_blending(which, sincos_pipe):
    pipe = tiny("cogvideox") if which == "rope" else sincos_pipe
    dc = DiTCtrlPipeline.from_pipe(pipe)
    one = dc("a cat walks", num_frames=9, num_inference_steps=2, output_type="np",
             generator=torch.Generator().manual_seed(0)).frames
    base = pipe("a cat walks", num_frames=9, num_inference_steps=2, output_type="np", use_dynamic_cfg=True,
                generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(one, base)  # a single prompt is exactly the base pipeline
    a = dc(["a cat walks", "a dog runs"], generator=torch.Generator().manual_seed(0), **KW).frames
    assert dc.passes_per_step == [3, 4, 4, 3]  # 3 segments: once each outside the window, 2 per pair inside
    b = dc(["a cat walks", "a dog runs"], generator=torch.Generator().manual_seed(0), dedupe=False, **KW).frames
    assert dc.passes_per_step == [4, 4, 4, 4]
    np.testing.assert_allclose(a, b, atol=1e-5)  # de-duplication changes nothing
    assert dc.last_plan == {"segments": 3, "segment_frames": 3, "overlap": 1, "latent_frames": 7, "stride": 2,
                            "pixel_frames": 25}
    assert a.shape == (1, 25, 64, 64, 3) and np.isfinite(a).all()
    assert attnctrl.applied(pipe) == []


def test_default_overlap_and_sharing_steps_are_the_official_share_of_any_length():
    """overlap 9 of 13 latent frames and KV-sharing in steps 2..25 of 50 (the official config) at CogVideoX's size;
    the same shares of shorter segments and other step counts, so the defaults run on any model."""
    config = DiTCtrl()
    assert config.overlap_for(13) == 9 and config.step_range(50) == range(2, 25)
    assert config.overlap_for(5) == 3 and config.overlap_for(3) == 2 and config.step_range(25) == range(1, 12)
    assert DiTCtrl(overlap=6, kv_steps=(3, 4)).overlap_for(13) == 6 and DiTCtrl(kv_steps=(3, 4)).step_range(50) == \
        range(3, 4)
    dc = DiTCtrlPipeline.from_pipe(tiny("cogvideox"))
    video = dc(["a cat walks", "a dog runs"], num_frames=9, num_inference_steps=4, output_type="np",
               generator=torch.Generator().manual_seed(0)).frames  # 9 frames = 3 latent frames a segment
    # 2 transition segments: 4 segments, 6 pair passes a step inside the sharing window (steps 0..1 of 4), 4 outside
    assert dc.last_plan["overlap"] == 2 and dc.passes_per_step == [6, 6, 4, 4]
    assert video.shape[1] == dc.last_plan["pixel_frames"] and np.isfinite(video).all()


def test_dedupe_pass_counts():
    dc = DiTCtrlPipeline.from_pipe(tiny("cogvideox"))
    dc(["a cat walks", "a dog runs", "a bird flies"], generator=torch.Generator().manual_seed(0),
       **{**KW, "kv_steps": (1, 2)})
    n_seg = dc.last_plan["segments"]  # 5
    assert dc.passes_per_step == [n_seg, 2 * (n_seg - 1), n_seg, n_seg]


def test_bad_inputs():
    dc = DiTCtrlPipeline.from_pipe(tiny("cogvideox"))
    with pytest.raises(AttnCtrlError, match="overlap"):
        dc(["a cat", "a dog"], num_frames=9, overlap=3)
    with pytest.raises(AttnCtrlError, match="4k \\+ 1"):
        dc(["a cat", "a dog"], num_frames=8, overlap=1)
    with pytest.raises(TokenLookupError, match="prompt 2: the word 'cat'"):
        dc(["a cat walks", "a dog runs"], mask_guided=True, subject_words=["cat"], **KW)
    with pytest.raises(AttnCtrlError, match="subject_words"):
        DiTCtrl(mask_guided=True)
    with pytest.raises(AttnCtrlError, match="DiTCtrlPipeline"):
        attnctrl.apply(tiny("cogvideox"), DiTCtrl())
