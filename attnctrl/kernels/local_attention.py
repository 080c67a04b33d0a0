"""Local (convolution-like) attention over a joint ``[text | image (| pooled)]`` sequence: CLEAR's attention.

Semantics (CLEAR spec §2-3), for a query ``q`` and key ``k`` of the joint sequence with ``T`` text tokens and an
``H x W`` image grid in row-major order::

    allowed(q, k) = (q < T and k is not pooled) or (q >= T and (k < T or k is pooled or |pos(q) - pos(k)|^2 < r^2))

Text queries see every text and image key; image queries see every text key, the image keys strictly inside the
disc of radius ``r`` around their own position, and all ``P`` pooled (down-sampled) keys appended after the image.

Backends, all equal to the same dense reference (tested):

* ``dense``: the boolean mask above with SDPA (reference; small sizes);
* ``tiled``: image queries grouped in ``t x t`` tiles; each tile attends to exactly the key window that can hold its
  discs (``t + 2 (ceil(r) - 1)`` on a side) through one 4-D fused-attention call per tile row with a tile mask
  (the windows are strided views of one column-major band of key rows), and to the text (+ pooled) keys in one dense
  call; the two partial results are merged by log-sum-exp. Text rows are one dense call. Works on CPU and GPU,
  differentiable; memory is bounded by processing one tile row at a time;
* ``flex``: ``torch.nn.attention.flex_attention`` with a block mask over tile-ordered tokens (image tokens permuted
  into 8 x 16 tiles, so a 128-token block is a compact 2-D patch), compiled once per shape on CUDA;
* ``auto``: the stock full attention when the disc covers the whole image (exact), else ``flex`` on CUDA; on CPU
  ``dense`` for small grids or windows that are large against the sequence, ``tiled`` otherwise (measured costs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import AttnCtrlError
from .attention import attention_with_lse

__all__ = ["LocalSpec", "local_attention", "dense_mask", "tile_utilisation", "BACKENDS", "pool_keys"]

BACKENDS = ("auto", "dense", "tiled", "flex")
_DENSE_MAX_TOKENS = 1024  # auto: up to this many image tokens the dense mask is cheaper than tiling
_DENSE_MASK_MAX_KEYS = 20_000  # auto never builds a boolean mask larger than this squared (400 MB)


@dataclass(frozen=True)
class LocalSpec:
    """Shape of one local attention: image grid, text length, radius, pooled-key count."""

    height: int
    width: int
    text_len: int
    radius: float
    pooled: int = 0

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise AttnCtrlError(f"image grid must be at least 1 x 1, got {self.height} x {self.width}")
        if not self.radius >= 1:
            raise AttnCtrlError(f"radius must be >= 1 token, got {self.radius}")
        if self.text_len < 0 or self.pooled < 0:
            raise AttnCtrlError("text length and pooled-key count must be >= 0")

    @property
    def n_image(self) -> int:
        return self.height * self.width

    @property
    def n_query(self) -> int:
        return self.text_len + self.n_image

    @property
    def n_key(self) -> int:
        return self.text_len + self.n_image + self.pooled

    @property
    def covers_all(self) -> bool:
        """True when every image key lies inside every image query's disc (and nothing is pooled)."""
        return self.pooled == 0 and self.radius**2 > (self.height - 1) ** 2 + (self.width - 1) ** 2


def _grid_coords(spec: LocalSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(spec.n_image, device=device)
    return idx // spec.width, idx % spec.width


@lru_cache(maxsize=16)
def _dense_mask_cached(spec: LocalSpec, device: torch.device) -> torch.Tensor:
    t, n = spec.text_len, spec.n_image
    ys, xs = _grid_coords(spec, device)
    local = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2 < spec.radius**2
    mask = torch.zeros(spec.n_query, spec.n_key, dtype=torch.bool, device=device)
    mask[:t, : t + n] = True
    mask[t:, :t] = True
    mask[t:, t : t + n] = local
    mask[t:, t + n :] = True
    return mask


def dense_mask(spec: LocalSpec, device="cpu") -> torch.Tensor:
    """The boolean ``(T + HW, T + HW + P)`` mask of the module docstring (cached per spec and device)."""
    return _dense_mask_cached(spec, torch.device(device))


def _check(q, k, v, spec: LocalSpec) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("local attention takes 4-D (batch, heads, tokens, dim) tensors")
    if q.shape[2] != spec.n_query or k.shape[2] != spec.n_key or v.shape[2] != spec.n_key:
        raise AttnCtrlError(
            f"sequence lengths (queries {q.shape[2]}, keys {k.shape[2]}) do not match text {spec.text_len} + image "
            f"{spec.height}x{spec.width} + pooled {spec.pooled}"
        )


def _dense(q, k, v, spec, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spec, q.device), scale=scale)


def _tile_size(spec: LocalSpec) -> int:
    return 8 if min(spec.height, spec.width) >= 8 else max(1, min(spec.height, spec.width))


@lru_cache(maxsize=16)
def _tile_masks(spec: LocalSpec, tile: int, device: torch.device, dtype: torch.dtype):
    """Additive masks of the tiled backend, tokens of a tile and of its key window in column-major order: the disc
    (t^2, win^2), shared by all tiles, and per-tile key validity (nTy, nTx, win^2) (-inf on the zero padding)."""
    pad = math.ceil(spec.radius) - 1
    win = tile + 2 * pad
    qx, qy = torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij")
    kx, ky = torch.meshgrid(torch.arange(win) - pad, torch.arange(win) - pad, indexing="ij")
    d2 = (qy.reshape(-1, 1) - ky.reshape(1, -1)) ** 2 + (qx.reshape(-1, 1) - kx.reshape(1, -1)) ** 2
    disc = torch.zeros(d2.shape, dtype=dtype).masked_fill_(d2 >= spec.radius**2, float("-inf"))
    n_ty, n_tx = -(-spec.height // tile), -(-spec.width // tile)
    ty = torch.arange(n_ty).view(-1, 1, 1) * tile + ky.reshape(1, 1, -1)  # (nTy, 1, win^2) absolute key rows
    tx = torch.arange(n_tx).view(1, -1, 1) * tile + kx.reshape(1, 1, -1)
    valid = (ty >= 0) & (ty < spec.height) & (tx >= 0) & (tx < spec.width)
    key_bias = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf"))  # (nTy, nTx, win^2)
    return disc.to(device), key_bias.to(device)


def _tiled(q, k, v, spec: LocalSpec, scale):
    """Tiles of one tile row share a band of ``win`` key rows: the band is copied once, column-major, so that each
    tile's ``win x win`` key window is a contiguous run of it and all windows of the row are one strided view (keys
    copied ``win / t`` times instead of ``(win / t)^2``)."""
    b, heads, _, d = q.shape
    t_len, n, height, width = spec.text_len, spec.n_image, spec.height, spec.width
    tile = _tile_size(spec)
    pad = math.ceil(spec.radius) - 1
    win = tile + 2 * pad
    n_ty, n_tx = -(-height // tile), -(-width // tile)
    hp, wp = n_ty * tile, n_tx * tile

    outputs = []
    if t_len:  # text rows: dense over text + image keys (never the pooled ones)
        outputs.append(F.scaled_dot_product_attention(q[:, :, :t_len], k[:, :, : t_len + n], v[:, :, : t_len + n],
                                                      scale=scale))
    q_img = q[:, :, t_len : t_len + n]
    context = None
    if t_len or spec.pooled:  # image rows vs text + pooled keys; the window results are merged into it in place
        k_ctx = torch.cat([k[:, :, :t_len], k[:, :, t_len + n :]], dim=2)
        v_ctx = torch.cat([v[:, :, :t_len], v[:, :, t_len + n :]], dim=2)
        out_c, lse_c = attention_with_lse(q_img, k_ctx, v_ctx, scale=scale)
        context = (out_c.reshape(b, heads, height, width, d), lse_c.reshape(b, heads, height, width))

    def grid(x, before, after):  # (B, h, HW, D) -> (B, h, H', W', D), zero-padded; D stays innermost
        x = x.reshape(b, heads, height, width, d)
        bottom, right = after + hp - height, after + wp - width
        return F.pad(x, (0, 0, before, right, before, bottom)) if before or bottom or right else x

    q_grid = grid(q_img, 0, 0)
    k_grid, v_grid = grid(k[:, :, t_len : t_len + n], pad, pad), grid(v[:, :, t_len : t_len + n], pad, pad)
    band_cols = wp + 2 * pad
    disc, key_bias = _tile_masks(spec, tile, q.device, q.dtype)

    def windows(x, y0):  # (h, H', W', D) -> a band of win key rows copied column-major (h, W', win, D), then
        band = x[:, y0 : y0 + win].transpose(1, 2).contiguous()  # every tile's window as a view (nTx, h, win^2, D)
        return band.as_strided((n_tx, heads, win * win, d), (tile * win * d, band_cols * win * d, d, 1))

    # per batch element, the merged output of each tile row; no in-place writes (the fused kernels' outputs are
    # needed by their backward)
    rows_out = [[] for _ in range(b)]
    for row in range(n_ty):
        y0, y1 = row * tile, min(height, row * tile + tile)
        mask = (disc + key_bias[row].unsqueeze(1)).unsqueeze(1)  # (nTx, 1, t^2, win^2)
        for i in range(b):
            # queries of the tile row, column-major per tile: (nTx, h, t^2, D)
            qt = q_grid[i, :, y0 : y0 + tile].reshape(heads, tile, n_tx, tile, d).permute(2, 0, 3, 1, 4)
            qt = qt.reshape(n_tx, heads, tile * tile, d)
            out_w, lse_w = attention_with_lse(qt, windows(k_grid[i], y0), windows(v_grid[i], y0), mask, scale)
            out_w = out_w.reshape(n_tx, heads, tile, tile, d).permute(1, 3, 0, 2, 4).reshape(heads, tile, wp, d)
            out_w = out_w[:, : y1 - y0, :width]
            if context is not None:
                # exact two-part softmax merge: out = out_c + (out_w - out_c) * exp(lse_w - logaddexp(lse_w, lse_c));
                # every image query sees at least its own key, so lse_w is finite (lse_c is -inf only with no context)
                lse_w = lse_w.reshape(n_tx, heads, tile, tile).permute(1, 3, 0, 2).reshape(heads, tile, wp)
                weight = torch.sigmoid(lse_w[:, : y1 - y0, :width] - context[1][i, :, y0:y1])
                out_w = torch.lerp(context[0][i, :, y0:y1], out_w, weight.unsqueeze(-1).to(out_w.dtype))
            rows_out[i].append(out_w)
    outputs.append(torch.stack([torch.cat(r, dim=1) for r in rows_out]).reshape(b, heads, n, d))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


@lru_cache(maxsize=8)
def _flex_plan(spec: LocalSpec, device: torch.device):
    """Tile-order permutation of image tokens and the flex block mask over the permuted sequence (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    th, tw = (8, 16) if spec.height % 8 == 0 and spec.width % 16 == 0 else (1, spec.width)
    ys, xs = _grid_coords(spec, device)
    order = torch.argsort(((ys // th) * (spec.width // tw + 1) + xs // tw) * (th * tw) + (ys % th) * tw + xs % tw)
    t_len, n = spec.text_len, spec.n_image
    key_y = torch.cat([torch.zeros(t_len, dtype=torch.long, device=device), ys[order],
                       torch.zeros(spec.pooled, dtype=torch.long, device=device)])
    key_x = torch.cat([torch.zeros(t_len, dtype=torch.long, device=device), xs[order],
                       torch.zeros(spec.pooled, dtype=torch.long, device=device)])
    r2 = spec.radius**2

    def mask_mod(b, h, qi, ki):
        q_text = qi < t_len
        k_text = ki < t_len
        k_pool = ki >= t_len + n
        near = (key_y[qi] - key_y[ki]) ** 2 + (key_x[qi] - key_x[ki]) ** 2 < r2
        return (q_text & ~k_pool) | (~q_text & (k_text | k_pool | near))

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=spec.n_query, KV_LEN=spec.n_key, device=device)
    return order, block_mask


_FLEX_COMPILED = None


def _flex(q, k, v, spec: LocalSpec, scale):
    from torch.nn.attention.flex_attention import flex_attention

    global _FLEX_COMPILED
    order, block_mask = _flex_plan(spec, q.device)
    t_len, n = spec.text_len, spec.n_image
    idx_q = torch.cat([torch.arange(t_len, device=q.device), t_len + order])
    idx_k = torch.cat([idx_q, torch.arange(t_len + n, spec.n_key, device=q.device)])
    fn = flex_attention
    if q.device.type == "cuda":
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX_COMPILED
    out = fn(q[:, :, idx_q], k[:, :, idx_k], v[:, :, idx_k], block_mask=block_mask, scale=scale)
    result = torch.empty_like(out)
    result[:, :, idx_q] = out
    return result


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(spec: LocalSpec, device: torch.device) -> str:
    """What ``backend="auto"`` runs for a spec on a device (``"full"`` = stock attention, exact here)."""
    if spec.covers_all:
        return "full"
    if device.type == "cuda" and _flex_available():
        return "flex"
    if spec.n_image <= _DENSE_MAX_TOKENS:
        return "dense"
    # tiling pays while its key window is small against the sequence (measured on CPU with benchmarks/clear.py:
    # 64x64 grid, r = 8 / 16 tiled x1.75 / x1.01 vs dense x0.93 / x0.91; r = 32 tiled x0.52 vs dense x1.14)
    win = _tile_size(spec) + 2 * (math.ceil(spec.radius) - 1)
    return "dense" if 3 * win * win >= spec.n_key and spec.n_key <= _DENSE_MASK_MAX_KEYS else "tiled"


def local_attention(q, k, v, spec: LocalSpec, backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """CLEAR local attention of ``q`` ``(B, h, T + HW, D)`` over ``k``, ``v`` ``(B, h, T + HW + P, D)``."""
    _check(q, k, v, spec)
    if backend not in BACKENDS:
        raise AttnCtrlError(f"unknown local-attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = choose_backend(spec, q.device)
        if backend == "full":
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "flex" and not _flex_available():
        raise AttnCtrlError("backend 'flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    return {"dense": _dense, "tiled": _tiled, "flex": _flex}[backend](q, k, v, spec, scale)


def pool_keys(x: torch.Tensor, spec_h: int, spec_w: int, weight: torch.Tensor) -> torch.Tensor:
    """CLEAR's down-sampled tokens: a weighted sum over each ``f x f`` cell of the image part ``x`` ``(B, h, HW, D)``
    with the learnable ``weight`` ``(f, f)`` (shared by heads and channels); returns ``(B, h, HW / f^2, D)``."""
    f = weight.shape[0]
    b, heads, n, d = x.shape
    if spec_h % f or spec_w % f:
        raise AttnCtrlError(
            f"the image grid {spec_h}x{spec_w} tokens is not divisible by down_factor {f}; use a height and width "
            f"that are multiples of {16 * f} px"
        )
    cells = x.reshape(b, heads, spec_h // f, f, spec_w // f, f, d)
    return torch.einsum("bhyixjd,ij->bhyxd", cells, weight.to(x.dtype)).reshape(b, heads, n // (f * f), d)


def tile_utilisation(spec: LocalSpec, backend: str = "tiled", block: int = 128) -> float:
    """Fraction of computed image-query/image-key pairs that lie inside the disc (CLEAR spec §9)."""
    h, w, r = spec.height, spec.width, spec.radius
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    # inside-disc pairs, clipped at the borders (what any exact backend must compute)
    inside = 0
    span = math.ceil(r) - 1
    for dy in range(-span, span + 1):
        for dx in range(-span, span + 1):
            if dy * dy + dx * dx < r * r:
                inside += max(0, h - abs(dy)) * max(0, w - abs(dx))
    if backend == "tiled":
        tile = _tile_size(spec)
        win = tile + 2 * span
        computed = (-(-h // tile)) * (-(-w // tile)) * tile * tile * win * win
    else:  # 128-token blocks over row-major ("rowmajor") or 8 x 16 tile order ("flex")
        if backend == "flex" and h % 8 == 0 and w % 16 == 0:
            th, tw = 8, 16
            by, bx = ys // th, xs // tw
            block_id = (by * (w // tw) + bx).flatten()
        else:
            block_id = (torch.arange(h * w) // block)
        n_blocks = int(block_id.max()) + 1
        member = torch.zeros(n_blocks, h, w, dtype=torch.bool)
        member[block_id, ys.flatten(), xs.flatten()] = True
        # a key block is computed for a query block if any of their pairs lies inside the disc
        ky, kx = torch.meshgrid(torch.arange(-span, span + 1), torch.arange(-span, span + 1), indexing="ij")
        disc = ((ky**2 + kx**2) < r * r).float().view(1, 1, 2 * span + 1, 2 * span + 1)
        dil = F.conv2d(member.float().unsqueeze(1), disc, padding=span).squeeze(1) > 0
        sizes = member.flatten(1).sum(1)
        hit = (dil.flatten(1).float() @ member.flatten(1).float().T) > 0  # (query block, key block)
        computed = int((hit.float() * sizes[:, None] * sizes[None, :]).sum())
    return inside / computed
