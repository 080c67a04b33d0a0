"""Mask utilities: loading, resizing to layer grids, thresholds, smoothing, boxes, token indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from attnctrl.core.masks import (
    MaskError,
    binarize,
    box_mask,
    flat_indices,
    gaussian_blur,
    grid_mask,
    load_mask,
    mask_box,
    otsu_threshold,
    resize_mask,
)


def test_load_mask_sources_and_threshold(tmp_path):
    arr = np.zeros((8, 8), np.uint8)
    arr[2:5, 3:7] = 200
    arr[0, 0] = 255
    path = tmp_path / "m.png"
    Image.fromarray(arr).save(path)
    for src in (path, str(path), Image.open(path), arr, torch.from_numpy(arr)):
        m = load_mask(src)
        assert m.shape == (8, 8) and set(m.unique().tolist()) == {0.0, 1.0} and m.sum() == 13
    assert load_mask(arr, threshold=254).sum() == 1  # the official "exactly 255" rule
    assert torch.allclose(load_mask(arr, threshold=None).max(), torch.tensor(1.0))
    rgb = np.stack([arr] * 3, -1)
    assert load_mask(rgb).sum() == 13
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = arr
    assert load_mask(Image.fromarray(rgba, "RGBA")).sum() == 13  # alpha channel is the mask
    assert torch.equal(load_mask(np.array([[0.2, 0.9]])), torch.tensor([[0.2, 0.9]]))  # soft masks kept


def test_zero_one_masks_in_8_bits_are_masks(tmp_path):
    """The {0, 1} uint8 format of the official FreeCustom / IR-Diffusion code: a mask, not an empty one."""
    from PIL import Image

    from attnctrl.pipelines import Reference

    arr = np.zeros((8, 8), np.uint8)
    arr[2:5, 3:6] = 1
    expect = torch.from_numpy(arr.astype(np.float32))
    Image.fromarray(arr).save(tmp_path / "m.png")
    for source in (arr, torch.from_numpy(arr), Image.fromarray(arr), tmp_path / "m.png"):
        assert torch.equal(load_mask(source), expect)
        assert torch.equal(load_mask(source, threshold=None), expect)
    _, mask = Reference(np.zeros((8, 8, 3), np.uint8), arr).load(0)
    assert torch.equal(mask, expect)
    assert torch.equal(load_mask(arr * 255), expect)  # 0 / 255 as before
    assert load_mask(np.zeros((8, 8), np.uint8)).sum() == 0  # empty is still empty


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((2, 3, 4, 5)), "2-D"), ("/no/such/mask.png", "cannot read"), (3.5, "path, PIL"),
    (np.array([[-1.0, 0.5]]), r"\[0, 1\]"),
])
def test_load_mask_errors(bad, msg):
    with pytest.raises(MaskError, match=msg):
        load_mask(bad)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 20), st.integers(1, 20), st.integers(0, 99))
def test_nearest_resize_keeps_binary_and_flat_order(h, w, gh, gw, seed):
    m = (torch.rand(h, w, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    r = resize_mask(m, (gh, gw))
    assert r.shape == (gh, gw) and set(r.unique().tolist()) <= {0.0, 1.0}
    flat = grid_mask(m, (gh, gw))
    assert flat.shape == (gh * gw,) and torch.equal(flat, r.flatten() > 0.5)
    idx = flat_indices(r)
    ys, xs = idx // gw, idx % gw  # row-major: index = y * w + x
    assert torch.all(r[ys, xs] == 1) and int(idx.numel()) == int(r.sum())


def test_resize_modes_and_identity():
    m = torch.zeros(4, 4)
    m[:2, :2] = 1
    assert torch.equal(resize_mask(m, (4, 4)), m)
    assert resize_mask(m, (2, 2), mode="area").tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert resize_mask(m[None, None], (8, 8)).shape == (1, 1, 8, 8)
    assert resize_mask(m, (8, 8), mode="bilinear").max() <= 1
    with pytest.raises(MaskError):
        resize_mask(m, (0, 3))
    with pytest.raises(MaskError):
        resize_mask(m, (2, 2), mode="cubic")


def test_binarize_and_otsu():
    m = torch.cat([torch.full((50,), 0.1), torch.full((50,), 0.8)]).view(10, 10)
    t = otsu_threshold(m)
    assert 0.1 < t <= 0.8
    assert binarize(m, "otsu").sum() == 50
    assert binarize(m, 0.5).sum() == 50
    with pytest.raises(MaskError):
        binarize(m, "mean")


def test_gaussian_blur_preserves_mass_and_constants():
    m = torch.zeros(21, 21)
    m[10, 10] = 1
    b = gaussian_blur(m, 2.0)
    assert abs(float(b.sum()) - 1) < 1e-5 and b[10, 10] == b.max() and torch.allclose(b, b.T)
    ones = torch.ones(5, 7)
    assert torch.allclose(gaussian_blur(ones, 3.0), ones)  # kernel wider than the mask: replicate padding
    assert torch.equal(gaussian_blur(m, 0), m)


def test_boxes():
    m = box_mask((2, 1, 5, 3), (4, 8))
    assert m.sum() == 6 and mask_box(m) == (2, 1, 5, 3)
    assert torch.equal(box_mask((0.25, 0.25, 0.75, 0.75), (4, 4)), box_mask((1, 1, 3, 3), (4, 4)))
    assert box_mask((0, 0, 1, 1), (3, 3)).sum() == 9  # the whole image as fractions
    assert mask_box(torch.zeros(3, 3)) is None
    with pytest.raises(MaskError, match="empty"):
        box_mask((3, 1, 2, 4), (8, 8))
    with pytest.raises(MaskError):
        box_mask((1, 2, 3), (8, 8))
    with pytest.raises(MaskError):
        mask_box(torch.zeros(1, 3, 3))
