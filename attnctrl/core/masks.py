"""Mask utilities: load, resize to a layer's token grid, binarise, smooth, boxes and flat token indices.

Masks are float tensors of shape ``(H, W)`` with values in ``[0, 1]`` unless stated otherwise. Token order is
row-major, the order of diffusers' ``hidden_states`` (``index = y * w + x``). Every function checks shapes and
raises :class:`MaskError` with a readable message.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AttnCtrlError

__all__ = [
    "MaskError",
    "load_mask",
    "resize_mask",
    "binarize",
    "otsu_threshold",
    "gaussian_blur",
    "is_box",
    "is_fraction_box",
    "box_mask",
    "mask_box",
    "flat_indices",
    "grid_mask",
    "MASK_FULL",
    "MASK_EMPTY",
    "degenerate",
    "degenerate_warning",
]

#: an attention-derived mask covering more than this fraction of the image acts everywhere (a degenerate mask)
MASK_FULL = 0.95
#: an attention-derived mask covering less than this fraction of the image acts nowhere (a degenerate mask)
MASK_EMPTY = 0.005


def degenerate(fraction: float) -> str | None:
    """``"full"`` if an attention-derived mask covers more than :data:`MASK_FULL` of the image, ``"empty"`` if less
    than :data:`MASK_EMPTY`, else None.

    The thresholds are the methods' shared rule for masks that come from attention maps (CLoRA's fusion masks,
    MagicFace's concept masks): on a model whose cross-attention is not local such a mask is all or nothing, and
    the method then acts everywhere or nowhere. 0.5 % is less than one cell of a 16 x 16 map (SD 1.5's 1/32 level at
    512 px), so on the usual grids only a mask without any cell is "empty".
    """
    fraction = float(fraction)
    if fraction > MASK_FULL:
        return "full"
    if fraction < MASK_EMPTY:
        return "empty"
    return None


def degenerate_warning(masks: str, over: str, items, cause: str) -> str | None:
    """One warning naming the :func:`degenerate` masks among ``items`` (``(label, fraction, effect if full, effect
    if empty)``), or None: "``masks`` are degenerate (mean over ``over``: ...) because ``cause``"."""
    bad = [f"{label} {100 * float(fraction):.1f} % of the image, {full if what == 'full' else empty}"
           for label, fraction, full, empty in items if (what := degenerate(fraction))]
    return f"{masks} are degenerate (mean over {over}: {'; '.join(bad)}) because {cause}" if bad else None


class MaskError(AttnCtrlError):
    """A mask could not be read or has the wrong shape or values."""


def load_mask(mask, threshold: float | None = 127) -> torch.Tensor:
    """A mask from a path, PIL image, numpy array or tensor as a float ``(H, W)`` tensor.

    8-bit images are binarised with ``value > threshold`` (127 by default; ``threshold=254`` reproduces the
    "exactly 255" rule of some official code; ``None`` keeps the grey levels scaled to [0, 1]). An 8-bit mask whose
    largest value is 1 is a {0, 1} mask (the format FreeCustom's and IR-Diffusion's own code pass around) and is
    taken as it is. Colour images use their luminance; an alpha channel, when present and not fully opaque, is the
    mask.
    """
    if isinstance(mask, (str, os.PathLike)):
        from PIL import Image

        path = os.fspath(mask)
        try:
            mask = Image.open(path)
            mask.load()
        except (OSError, ValueError) as e:
            raise MaskError(f"cannot read mask {path}: {e}") from e
    if hasattr(mask, "mode") and hasattr(mask, "convert"):  # PIL image
        if mask.mode in ("RGBA", "LA") and np.asarray(mask.getchannel("A")).min() < 255:
            arr = np.asarray(mask.getchannel("A"))
        elif mask.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit: scaled to 0..255, not clipped
            wide = np.asarray(mask).astype(np.float64)
            arr = wide * (255.0 / 65535.0) if wide.max() > 255 or mask.mode.startswith("I;16") else wide
        else:
            arr = np.asarray(mask.convert("L"))
        scale_255 = True
    elif isinstance(mask, np.ndarray):
        arr = mask
        scale_255 = arr.dtype == np.uint8
    elif isinstance(mask, torch.Tensor):
        arr = mask.detach().cpu().numpy()
        scale_255 = arr.dtype == np.uint8
    else:
        raise MaskError(f"a mask must be a path, PIL image, numpy array or tensor, not {type(mask).__name__}")
    arr = np.asarray(arr)
    while arr.ndim > 2 and arr.shape[0] == 1:  # (1, H, W), (1, 1, H, W)
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1)
    if arr.ndim != 2:
        raise MaskError(f"a mask must be 2-D (H, W), got shape {tuple(np.shape(arr))}")
    if arr.dtype == bool:
        return torch.from_numpy(arr.astype(np.float32))
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if scale_255 and t.numel() and t.max() == 1 and t.min() >= 0:  # a {0, 1} mask stored in 8 bits
        return t
    if scale_255 or t.max() > 1:
        if threshold is None:
            return t / 255.0
        return (t > threshold).float()
    if t.min() < 0:
        raise MaskError("mask values must lie in [0, 1] (or 0..255 for 8-bit images)")
    return t


def _as_4d(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    if not isinstance(mask, torch.Tensor):
        mask = load_mask(mask, threshold=None)
    if mask.ndim < 2 or mask.ndim > 4:
        raise MaskError(f"a mask must be (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(mask.shape)}")
    shape = mask.shape
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask, shape


def resize_mask(mask: torch.Tensor, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """Resize the last two dims to ``size = (h, w)``.

    ``mode``: ``"nearest"`` (keeps binary masks binary; diffusers-style ``nearest-exact`` sampling), ``"area"``
    (the fraction of each cell covered, good before a threshold) or ``"bilinear"``.
    """
    if len(size) != 2 or min(size) < 1:
        raise MaskError(f"size must be (h, w) with positive sides, got {tuple(size)}")
    if mode not in ("nearest", "area", "bilinear"):
        raise MaskError(f"mode must be 'nearest', 'area' or 'bilinear', not {mode!r}")
    m, shape = _as_4d(mask)
    m = m.float()
    if mode == "nearest":
        out = F.interpolate(m, size=tuple(size), mode="nearest-exact")
    elif mode == "area":
        out = F.adaptive_avg_pool2d(m, tuple(size))
    else:
        out = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*shape[:-2], *size)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance of a ``bins`` histogram)."""
    v = values.detach().float().flatten().clamp(0, 1)
    if v.numel() == 0:
        raise MaskError("cannot threshold an empty mask")
    hist = torch.histc(v, bins=bins, min=0.0, max=1.0).double()
    p = hist / hist.sum()
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = torch.cumsum(p, 0)
    mu = torch.cumsum(p * centers, 0)
    mu_t = mu[-1]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between[(w0 <= 0) | (w0 >= 1)] = -1
    k = int(torch.argmax(between))
    return float((k + 1) / bins)


def binarize(mask: torch.Tensor, threshold: float | str = 0.5) -> torch.Tensor:
    """``1.0`` where ``mask > threshold``; ``threshold="otsu"`` picks it with Otsu's method. Returns a float mask."""
    if not isinstance(mask, torch.Tensor):
        mask = load_mask(mask, threshold=None)
    if threshold == "otsu":
        threshold = otsu_threshold(mask)
    elif isinstance(threshold, str):
        raise MaskError(f"threshold must be a number or 'otsu', not {threshold!r}")
    return (mask > threshold).to(mask.dtype if mask.is_floating_point() else torch.float32)


def gaussian_blur(mask: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian smoothing of the last two dims (reflect padding); ``sigma`` in pixels/tokens."""
    if sigma <= 0:
        return mask.clone()
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise MaskError(f"kernel_size must be a positive odd number, got {kernel_size}")
    m, shape = _as_4d(mask)
    m = m.float()
    x = torch.arange(kernel_size, dtype=torch.float32, device=m.device) - kernel_size // 2
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    b, c, h, w = m.shape
    m = m.reshape(b * c, 1, h, w)
    pad = kernel_size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    m = F.conv2d(F.pad(m, (pad, pad, 0, 0), mode=mode), k1.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, pad, pad), mode=mode), k1.view(1, 1, -1, 1))
    return m.reshape(shape)


def is_box(value) -> bool:
    """Whether ``value`` is a box ``(x0, y0, x1, y1)``: a tuple or list of four real numbers (numpy's included)."""
    return isinstance(value, (tuple, list)) and len(value) == 4 and all(isinstance(c, numbers.Real) for c in value)


def is_fraction_box(box: Sequence[float]) -> bool:
    """Whether :func:`box_mask` reads ``box`` as fractions of the image: all in [0, 1], and some coordinate not an
    integer or the box is ``(0, 0, 1, 1)``."""
    return all(0.0 <= c <= 1.0 for c in box) and (any(c != int(c) for c in box) or tuple(box[2:]) == (1.0, 1.0))


def box_mask(box: Sequence[float], size: Sequence[int]) -> torch.Tensor:
    """A ``(h, w)`` mask that is 1 inside ``box = (x0, y0, x1, y1)`` (end-exclusive).

    Boxes with all coordinates in [0, 1] (and at least one non-integer, or ``(0, 0, 1, 1)``) are fractions of the
    image; otherwise they are in the units of ``size``. Fractional edges are rounded to the nearest token.
    """
    if len(box) != 4:
        raise MaskError(f"a box is (x0, y0, x1, y1), got {tuple(box)}")
    h, w = int(size[0]), int(size[1])
    try:
        x0, y0, x1, y1 = (float(c) for c in box)
    except (TypeError, ValueError):
        raise MaskError(f"a box is four numbers (x0, y0, x1, y1), got {tuple(box)}") from None
    if not all(math.isfinite(c) for c in (x0, y0, x1, y1)):
        raise MaskError(f"box {tuple(box)}: coordinates must be finite numbers")
    if is_fraction_box((x0, y0, x1, y1)):
        x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
    if x1 <= x0 or y1 <= y0:
        raise MaskError(f"box {tuple(box)} is empty: need x0 < x1 and y0 < y1")
    xa, xb = max(0, int(round(x0))), min(w, max(int(round(x1)), int(round(x0)) + 1))
    ya, yb = max(0, int(round(y0))), min(h, max(int(round(y1)), int(round(y0)) + 1))
    out = torch.zeros(h, w)
    if xa < xb and ya < yb:
        out[ya:yb, xa:xb] = 1.0
    return out


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (end-exclusive) of the non-zero cells of a 2-D mask, or None if empty."""
    if mask.ndim != 2:
        raise MaskError(f"mask_box takes a 2-D mask, got shape {tuple(mask.shape)}")
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def flat_indices(mask: torch.Tensor) -> torch.Tensor:
    """Row-major token indices of the non-zero cells of a 2-D mask (the order of ``hidden_states`` tokens)."""
    if mask.ndim != 2:
        raise MaskError(f"flat_indices takes a 2-D mask, got shape {tuple(mask.shape)}")
    return torch.nonzero(mask.flatten() > 0, as_tuple=True)[0]


def grid_mask(mask: torch.Tensor, grid: Sequence[int], mode: str = "nearest", threshold: float = 0.5) -> torch.Tensor:
    """A mask resized to a layer's token grid and flattened: a boolean ``(h * w,)`` tensor in token order."""
    resized = resize_mask(mask, grid[-2:], mode=mode)
    if resized.ndim != 2:
        raise MaskError(f"grid_mask takes a single 2-D mask, got shape {tuple(mask.shape)}")
    return (resized > threshold).flatten()
