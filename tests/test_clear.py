"""CLEAR (spec §8): kernels against the dense reference, the processor on tiny FLUX, weights, distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import attnctrl
from attnctrl.core import AttnCtrlError, LayerSelectionError, UnsupportedModelError
from attnctrl.kernels.local_attention import LocalSpec, dense_mask, local_attention, pool_keys, tile_utilisation
from attnctrl.methods import CLEAR
from attnctrl.processors.clear import clear_weight_keys

pytestmark = pytest.mark.usefixtures("no_grad")


def qkv(spec: LocalSpec, b=1, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, spec.n_query, d, generator=g), torch.randn(b, h, spec.n_key, d, generator=g),
            torch.randn(b, h, spec.n_key, d, generator=g))


def test_dense_mask_is_the_spec_formula():
    spec = LocalSpec(5, 7, 3, 2.5, pooled=2)
    mask = dense_mask(spec)
    t, n = 3, 35
    for qi in range(spec.n_query):
        for ki in range(spec.n_key):
            if qi < t:
                want = ki < t + n
            elif ki < t or ki >= t + n:
                want = True
            else:
                (yq, xq), (yk, xk) = divmod(qi - t, 7), divmod(ki - t, 7)
                want = (yq - yk) ** 2 + (xq - xk) ** 2 < 2.5**2  # strict
            assert bool(mask[qi, ki]) == want, (qi, ki)


@pytest.mark.parametrize("h, w, t, r, pooled, b", [(12, 10, 5, 3.5, 2, 2), (9, 17, 0, 2, 0, 1), (3, 3, 4, 1, 0, 1)])
def test_tiled_backend_gradients_equal_the_dense_reference(h, w, t, r, pooled, b):
    """Distillation trains through the tiled backend: the log-sum-exp merge must carry gradients (padded tiles too)."""
    spec = LocalSpec(h, w, t, r, pooled)
    q, k, v = (x.requires_grad_() for x in qkv(spec, b=b, seed=1))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    with torch.enable_grad():
        grads = [torch.autograd.grad((local_attention(q, k, v, spec, backend) * grad_out).sum(), (q, k, v))
                 for backend in ("dense", "tiled")]
    for ref, tiled in zip(*grads):
        torch.testing.assert_close(tiled, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 9), st.floats(1, 12), st.integers(0, 3),
       st.integers(1, 2), st.integers(0, 99))
def test_tiled_backend_equals_dense_reference(h, w, t, r, pooled, b, seed):
    spec = LocalSpec(h, w, t, r, pooled)
    q, k, v = qkv(spec, b=b, seed=seed)
    ref = local_attention(q, k, v, spec, "dense")
    torch.testing.assert_close(local_attention(q, k, v, spec, "tiled"), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(8, 16, 4, 3.0, 0), (16, 16, 0, 5.0, 2), (6, 9, 2, 2.0, 0)])
def test_flex_backend_equals_dense_reference(shape):
    spec = LocalSpec(*shape)
    q, k, v = qkv(spec)
    torch.testing.assert_close(local_attention(q, k, v, spec, "flex"), local_attention(q, k, v, spec, "dense"),
                               atol=2e-5, rtol=1e-5)


def test_radius_covering_the_image_is_full_attention():
    spec = LocalSpec(6, 5, 4, 6 + 5)
    assert spec.covers_all
    q, k, v = qkv(spec)
    full = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(local_attention(q, k, v, spec, "auto"), full)
    for backend in ("dense", "tiled", "flex"):
        torch.testing.assert_close(local_attention(q, k, v, spec, backend), full, atol=2e-5, rtol=1e-5)


def test_locality_and_text_rows():
    spec = LocalSpec(10, 12, 5, 3.0)
    q, k, v = qkv(spec)
    out = local_attention(q, k, v, spec, "tiled")
    key = 5 + 4 * 12 + 6  # image token (4, 6)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, key] += 3.0
    v2[:, :, key] -= 2.0
    changed = (local_attention(q, k2, v2, spec, "tiled") - out).abs().amax((0, 1, 3)) > 1e-6
    for qi in range(spec.n_query):
        if qi < 5:
            assert changed[qi]  # text queries see everything
        else:
            y, x = divmod(qi - 5, 12)
            assert bool(changed[qi]) == ((y - 4) ** 2 + (x - 6) ** 2 < 9), (y, x)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, :, :5], full[:, :, :5], atol=1e-6, rtol=1e-6)


def test_interior_translation_equivariance():
    spec = LocalSpec(16, 16, 0, 3.0)
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(1, 1, 16, 16, 4, generator=g) for _ in range(3)]
    shifted = [torch.roll(t, shifts=(2, 3), dims=(2, 3)) for t in base]
    flat = [t.reshape(1, 1, 256, 4) for t in base]
    flat_s = [t.reshape(1, 1, 256, 4) for t in shifted]
    out = local_attention(*flat, spec, "tiled").reshape(1, 1, 16, 16, 4)
    out_s = local_attention(*flat_s, spec, "tiled").reshape(1, 1, 16, 16, 4)
    torch.testing.assert_close(out_s[:, :, 6:12, 6:12], out[:, :, 4:10, 3:9], atol=1e-6, rtol=1e-6)


def test_down_variant_pools_post_rope_keys_and_matches_concat_reference():
    spec = LocalSpec(8, 8, 3, 2.0, pooled=16)
    g = torch.Generator().manual_seed(0)
    k_img = torch.randn(1, 2, 64, 8, generator=g)
    weight = torch.full((2, 2), 0.25)
    pooled = pool_keys(k_img, 8, 8, weight)
    avg = F.avg_pool2d(k_img.reshape(1, 2, 8, 8, 8).permute(0, 1, 4, 2, 3).reshape(1, 16, 8, 8), 2)
    torch.testing.assert_close(pooled, avg.reshape(1, 2, 8, 4, 4).permute(0, 1, 3, 4, 2).reshape(1, 2, 16, 8))
    q, k, v = qkv(spec)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spec))
    for backend in ("tiled", "flex"):
        torch.testing.assert_close(local_attention(q, k, v, spec, backend), ref, atol=2e-5, rtol=1e-5)
    with pytest.raises(AttnCtrlError, match="not divisible by down_factor 3"):
        pool_keys(k_img, 8, 8, torch.full((3, 3), 1 / 9))


def test_tile_utilisation_beats_row_major_blocks_twice():
    spec = LocalSpec(128, 128, 512, 8)  # 2048 px, r = 8: spec §9 gives 9.8 % for row-major blocks
    row_major = tile_utilisation(spec, "rowmajor")
    assert abs(row_major - 0.098) < 0.002
    assert tile_utilisation(spec, "tiled") >= 2 * row_major
    assert tile_utilisation(spec, "flex") >= 1.8 * row_major


# -- the processor on the tiny FLUX pipeline ---------------------------------------------------------------------

FLUX_KW = {"height": 128, "width": 128, "max_sequence_length": 32}


def test_whole_image_radius_equals_stock_pipeline_bit_for_bit():
    pipe = tiny("flux")
    plain = run(pipe, steps=2, **FLUX_KW)
    with attnctrl.apply(pipe, CLEAR(radius=100)):
        np.testing.assert_array_equal(run(pipe, steps=2, **FLUX_KW), plain)
    with attnctrl.apply(pipe, CLEAR(radius=100, backend="tiled")):
        np.testing.assert_allclose(run(pipe, steps=2, **FLUX_KW), plain, atol=1e-5)


def test_backends_agree_in_the_pipeline_and_masks_follow_the_resolution():
    pipe = tiny("flux")
    outs = {}
    for backend in ("dense", "tiled", "flex"):
        with attnctrl.apply(pipe, CLEAR(radius=3, backend=backend)):
            outs[backend] = run(pipe, steps=2, **FLUX_KW)
            small = run(pipe, steps=2, height=64, width=96, max_sequence_length=32)
            again = run(pipe, steps=2, **FLUX_KW)  # back to the first size: the cached mask must not be stale
        np.testing.assert_array_equal(again, outs[backend])
        assert small.shape == (1, 64, 96, 3)
    np.testing.assert_allclose(outs["tiled"], outs["dense"], atol=1e-5)
    np.testing.assert_allclose(outs["flex"], outs["dense"], atol=1e-5)
    assert np.abs(outs["dense"] - run(pipe, steps=2, **FLUX_KW)).max() > 1e-4  # the window changes the output


def test_single_stream_text_length_comes_from_the_controller():
    pipe = tiny("flux")
    seen = []
    with attnctrl.apply(pipe, CLEAR(radius=2, backend="dense")) as h:
        for proc in h.processors.values():
            original = proc.attend

            def spy(attn, q, k, v, mask=None, text_len=0, _orig=original, _proc=proc):
                seen.append((_proc.layer.kind, text_len))
                return _orig(attn, q, k, v, mask, text_len)

            proc.attend = spy
        run(pipe, steps=1, **FLUX_KW)
    assert seen == [("joint", 32), ("joint", 32), ("single", 32), ("single", 32)]


def test_down_variant_registers_spatial_weight_with_the_official_key():
    pipe = tiny("flux")
    with attnctrl.apply(pipe, CLEAR(radius=2, down_factor=2)):
        keys = [k for k in pipe.transformer.state_dict() if "spatial_weight" in k]
        assert keys == clear_weight_keys(pipe.transformer, 2)[-4:]
        assert run(pipe, steps=1, **FLUX_KW).shape == (1, 128, 128, 3)
        with pytest.raises(AttnCtrlError, match="not divisible by down_factor 2"):
            run(pipe, steps=1, height=48, width=48, max_sequence_length=32)  # 3 x 3 token grid
    assert not any("spatial_weight" in k for k in pipe.transformer.state_dict())


def test_spatial_weights_load_in_the_official_and_the_square_layout(tmp_path):
    """The official file stores ``spatial_weight`` as ``(1, 1, 1, f, 1, f, 1)``; our older files as ``(f, f)``."""
    from safetensors.torch import save_file

    pipe = tiny("flux")
    params = pipe.transformer.state_dict()
    keys = clear_weight_keys(pipe.transformer, 2)
    grid = torch.arange(4.0).reshape(2, 2) / 6
    for shape in ((1, 1, 1, 2, 1, 2, 1), (2, 2)):
        state = {k: (grid.reshape(shape) if k.endswith("spatial_weight") else params[k]).clone() for k in keys}
        path = tmp_path / f"clear-{len(shape)}.safetensors"
        save_file(state, str(path))
        with attnctrl.apply(pipe, CLEAR(radius=2, down_factor=2, weights=str(path))) as h:
            proc = next(iter(h.processors.values()))
            assert proc.spatial_weight.shape == (1, 1, 1, 2, 1, 2, 1)
            assert torch.equal(proc.spatial_weight.detach().reshape(2, 2), grid)


@pytest.mark.parametrize("kwargs, match", [
    ({"radius": 0.5}, "radius"), ({"down_factor": 0}, "down_factor"), ({"backend": "cuda"}, "backend"),
    ({"weights": "/no/such.safetensors"}, "does not exist"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(AttnCtrlError, match=match):
        CLEAR(**kwargs)


def test_unsupported_models_raise():
    with pytest.raises(UnsupportedModelError, match="FLUX"):
        attnctrl.apply(tiny("sd15"), CLEAR())
    with pytest.raises(LayerSelectionError):
        attnctrl.apply(tiny("flux"), CLEAR(layers="blocks[9]"))


def test_weights_for_another_model_raise_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny("flux")
    state = pipe.transformer.state_dict()
    keys = clear_weight_keys(pipe.transformer)
    good = {k: state[k].clone() for k in keys}
    bad_shape = dict(good)
    bad_shape[keys[0]] = torch.zeros(3, 3)
    cases = {
        "shape": (bad_shape, "another model"),
        "missing": ({k: v for k, v in good.items() if k != keys[1]}, "lacks 1"),
        "unexpected": ({**good, "foo.weight": torch.zeros(1)}, "unexpected key 'foo.weight'"),
    }
    for name, (weights, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(weights, str(path))
        with pytest.raises(AttnCtrlError, match=match):
            attnctrl.apply(pipe, CLEAR(weights=str(path)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(AttnCtrlError, match="cannot read"):
        attnctrl.apply(pipe, CLEAR(weights=str(junk)))
    assert attnctrl.applied(pipe) == []


@torch.enable_grad()
def test_distillation_runs_trains_only_projections_and_reloads(tmp_path):
    from attnctrl.distill.clear import distill_clear

    pipe = tiny("flux")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    out = distill_clear(pipe, radius=3, down_factor=2, out=tmp_path / "clear.safetensors", generate=2, steps=2,
                        lr=1e-3, resolution=64, max_sequence_length=32, log=lambda m: None)
    # the teacher (the pipeline's own transformer) is untouched
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    from safetensors.torch import load_file

    saved = load_file(str(out))
    assert sorted(saved) == sorted(clear_weight_keys(pipe.transformer, 2))
    assert any(not torch.equal(saved[k], before[k]) for k in saved if k in before)  # projections were trained
    with attnctrl.apply(pipe, CLEAR(radius=3, down_factor=2, weights=str(out))) as h:
        assert all(torch.equal(pipe.transformer.state_dict()[k], saved[k]) for k in saved if k in before)
        proc = next(iter(h.processors.values()))
        assert torch.equal(proc.spatial_weight.detach(), saved[proc.layer.name + ".spatial_weight"])
        run(pipe, steps=1, **FLUX_KW)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())  # exact undo


def test_generate_cli_with_clear(tmp_path):
    from click.testing import CliRunner

    from attnctrl.cli.main import cli

    result = CliRunner().invoke(cli, ["generate", "-m", "tiny-flux", "-p", "a cat", "--steps", "1", "--seed", "0",
                                      "--method", "clear", "--opt", "radius=4", "--opt", "backend=tiled", "-o",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.png"))) == 1
    result = CliRunner().invoke(cli, ["generate", "-p", "a cat", "--steps", "1", "--method", "clear", "-o",
                                      str(tmp_path)])
    assert result.exit_code != 0 and "does not support the Stable Diffusion" in result.output


def test_auto_backend_follows_the_measured_costs():
    from attnctrl.kernels.local_attention import choose_backend

    cpu = torch.device("cpu")
    assert choose_backend(LocalSpec(height=16, width=16, text_len=8, radius=3), cpu) == "dense"  # small grid
    assert choose_backend(LocalSpec(height=64, width=64, text_len=512, radius=8), cpu) == "tiled"
    assert choose_backend(LocalSpec(height=64, width=64, text_len=512, radius=32), cpu) == "dense"  # big window
    assert choose_backend(LocalSpec(height=128, width=128, text_len=512, radius=8), cpu) == "tiled"
    assert choose_backend(LocalSpec(height=256, width=256, text_len=512, radius=64), cpu) == "tiled"  # mask too big
    assert choose_backend(LocalSpec(height=8, width=8, text_len=4, radius=20), cpu) == "full"
