"""Attention primitives on 4-D ``(batch, heads, tokens, head_dim)`` tensors.

Everything here goes through ``F.scaled_dot_product_attention`` with 4-D inputs and a 4-D (or broadcastable)
additive bias, the only form that keeps PyTorch's fused CPU kernel (5-D inputs or 3-D masks silently fall back to
the slow math path). The shapes of biases are part of the contract:

* a **key bias** has shape ``(B|1, H|1, 1, S_k)`` and is broadcast by the kernel over queries; no
  ``(S_q, S_k)`` tensor is ever built from it;
* :func:`multi_block_attention` takes one softmax over several key/value blocks (own + references), each with its
  own key bias and optional multiplicative key weight;
* :func:`grouped_attention` gives each group of queries its own key bias (one SDPA call per group on the sorted
  queries), so a query-dependent bias never becomes a ``(S_q, S_k)`` matrix either;
* :func:`attention_with_lse` returns the row log-sum-exp next to the output, :func:`merge_attention` merges partial
  attentions over disjoint key sets exactly, and :func:`attention_probs` computes probabilities for selected rows or
  key columns only (columns from the row log-sum-exp: ``p = exp(s - lse)``), never a full ``N x N`` map.

Log-sum-exps and probabilities are returned in float32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "sdpa",
    "KVBlock",
    "concat_kv_blocks",
    "multi_block_attention",
    "grouped_attention",
    "attention_with_lse",
    "merge_attention",
    "attention_probs",
    "NEG_INF",
]

NEG_INF = float("-inf")
_CHUNK_ELEMENTS = 1 << 25  # logits per chunk in the math fallbacks (128 MiB in fp32)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    if q.ndim != 4 or k.ndim != 4 or (v is not None and v.ndim != 4):
        shapes = [tuple(t.shape) for t in (q, k, v) if t is not None]
        raise ValueError(f"attention primitives take 4-D (batch, heads, tokens, dim) tensors, got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query and key head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if v is not None and k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key and value lengths differ: {k.shape[-2]} vs {v.shape[-2]}")


def _as_bias(bias, q: torch.Tensor, n_keys: int) -> torch.Tensor | None:
    """Bring a bias to a 4-D tensor broadcastable to (B, H, S_q, S_k) in the query's dtype, without expanding it."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        bias = torch.tensor(float(bias))
    if bias.dtype == torch.bool:
        raise TypeError("pass additive float biases (0 / -inf), not boolean masks")
    while bias.ndim < 4:
        bias = bias.unsqueeze(0)
    if bias.ndim > 4:
        raise ValueError(f"bias must have at most 4 dims (batch, heads, queries, keys), got {tuple(bias.shape)}")
    if bias.shape[-1] not in (1, n_keys):
        raise ValueError(f"bias has {bias.shape[-1]} key columns, attention has {n_keys} keys")
    return bias.to(device=q.device, dtype=q.dtype)


def sdpa(q, k, v, bias=None, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` with SDPA. ``bias`` broadcasts to (B, H, S_q, S_k) and is never expanded."""
    _check_qkv(q, k, v)
    mask = _as_bias(bias, q, k.shape[-2])
    if mask is not None and mask.shape[-1] == 1 and k.shape[-2] != 1:
        mask = mask.expand(*mask.shape[:-1], k.shape[-2])  # a view: stride 0, no allocation
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@dataclass
class KVBlock:
    """One block of keys/values in a joint softmax.

    ``bias`` is an additive key bias (a number, or a tensor broadcastable to ``(B, H, 1, S_block)``; ``-inf`` forbids
    a key). ``key_weight`` multiplies the logits of each key (broadcastable to ``(B, H, S_block)``): the
    multiplicative masks of papers (``M_w * QK^T``) are exactly a scaling of the key vectors.
    """

    key: torch.Tensor
    value: torch.Tensor
    bias: float | torch.Tensor | None = None
    key_weight: torch.Tensor | None = None


def concat_kv_blocks(blocks: Sequence[KVBlock]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Concatenate blocks along the key axis; returns ``(key, value, key_bias)`` with a key-only bias."""
    if not blocks:
        raise ValueError("need at least one key/value block")
    keys, values, biases = [], [], []
    any_bias = any(b.bias is not None for b in blocks)
    ref = blocks[0].key
    for block in blocks:
        _check_qkv(block.key, block.key, block.value)
        key = block.key
        if block.key_weight is not None:
            w = block.key_weight.to(device=key.device, dtype=key.dtype)
            while w.ndim < 3:
                w = w.unsqueeze(0)
            key = key * w.unsqueeze(-1)
        keys.append(key)
        values.append(block.value)
        if any_bias:
            n = block.key.shape[-2]
            b = _as_bias(0.0 if block.bias is None else block.bias, ref, n)
            if b.shape[-2] != 1:
                raise ValueError(f"block biases must be key-only (query dim 1), got {tuple(b.shape)}")
            biases.append(b.expand(*b.shape[:-1], n))
    if any_bias:
        lead = torch.broadcast_shapes(*(b.shape[:2] for b in biases))
        bias = torch.cat([b.expand(*lead, 1, b.shape[-1]) for b in biases], dim=-1)
    else:
        bias = None
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), bias


def multi_block_attention(q: torch.Tensor, blocks: Sequence[KVBlock], scale: float | None = None) -> torch.Tensor:
    """One softmax over ``[block_0 keys; block_1 keys; ...]`` with a per-block key bias (e.g. FreeCustom's MRSA)."""
    key, value, bias = concat_kv_blocks(blocks)
    return sdpa(q, key, value, bias, scale)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: torch.Tensor,
    group_bias: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention where the queries of group ``g`` see the key bias ``group_bias[..., g, :]``.

    ``groups`` is a ``(S_q,)`` integer tensor of group ids in ``[0, G)``, shared by the batch; ``group_bias`` is
    broadcastable to ``(B, H, G, S_k)``. Queries are sorted by group once and each group runs one SDPA call with a
    key-only bias, so no ``(S_q, S_k)`` bias is materialised (e.g. IR-Diffusion's isolation: subject regions are
    groups, other subjects' keys get ``-inf``).
    """
    _check_qkv(q, k, v)
    if groups.ndim != 1 or groups.shape[0] != q.shape[-2]:
        raise ValueError(f"groups must be a ({q.shape[-2]},) tensor of group ids, got {tuple(groups.shape)}")
    bias = _as_bias(group_bias, q, k.shape[-2])
    n_groups = bias.shape[-2]
    groups = groups.to(q.device)
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise ValueError(f"group ids must lie in [0, {n_groups}) to match group_bias")
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=n_groups).tolist()
    sorted_q = q.index_select(-2, order)
    outs = []
    for g, q_g in enumerate(sorted_q.split(counts, dim=-2)):
        if q_g.shape[-2]:
            outs.append(sdpa(q_g, k, v, bias[..., g : g + 1, :], scale))
    out_sorted = torch.cat(outs, dim=-2)
    out = torch.empty_like(out_sorted)
    out.index_copy_(-2, order, out_sorted)
    return out


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _math_attention_with_lse(q, k, v, bias, scale):
    rows = max(1, _CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[-2]))
    outs, lses = [], []
    kt = k.float().transpose(-1, -2)
    for start in range(0, q.shape[-2], rows):
        s = q[..., start : start + rows, :].float() @ kt * scale
        if bias is not None:
            s = s + (bias if bias.shape[-2] == 1 else bias[..., start : start + rows, :]).float()
        # softmax and log-sum-exp with rows that see no key (all -inf) giving 0 and -inf, NaN-free under autograd
        m = s.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        total = e.sum(-1, keepdim=True)
        empty = total == 0
        total = torch.where(empty, torch.ones_like(total), total)
        outs.append(((e / total) @ v.float()).to(q.dtype))
        lses.append(torch.where(empty, float("-inf"), torch.log(total) + m).squeeze(-1))
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def attention_with_lse(q, k, v, bias=None, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale + bias) v, logsumexp_k(q k^T * scale + bias))``; the log-sum-exp is float32.

    On CPU this is PyTorch's fused flash kernel (same output as :func:`sdpa`, bit for bit); on CUDA the
    memory-efficient kernel; elsewhere (or if a fused kernel refuses the inputs) a chunked float32 math path. Under
    autograd the math path always: the fused kernels' backward ignores the gradient of the log-sum-exp, which a merge
    of partial results (:func:`merge_attention`, CLEAR's tiles) needs.
    """
    _check_qkv(q, k, v)
    scale = _default_scale(q, scale)
    mask = _as_bias(bias, q, k.shape[-2])
    if mask is not None and mask.shape[-1] == 1:
        mask = mask.expand(*mask.shape[:-1], k.shape[-2])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _math_attention_with_lse(q, k, v, mask, scale)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # the fused CPU kernel returns garbage for inputs whose head dim is strided (torch 2.13); SDPA itself copies
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=mask, scale=scale
            )
            return out, lse.float()
        except (RuntimeError, AttributeError):  # pragma: no cover - depends on the torch build
            pass
    elif q.device.type == "cuda":
        try:
            out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
                True, 0.0, False, scale=scale,
            )
            return out, lse[..., : q.shape[-2]].float()
        except (RuntimeError, AttributeError):  # pragma: no cover - depends on the GPU and dtype
            pass
    return _math_attention_with_lse(q, k, v, mask, scale)


def merge_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attentions of the same queries over disjoint key sets: exact softmax over the union of the keys.

    ``parts`` are ``(out, lse)`` pairs from :func:`attention_with_lse`. A part whose rows saw no key (lse ``-inf``)
    contributes nothing; rows that saw no key at all come out as zeros with lse ``-inf``.
    """
    if not parts:
        raise ValueError("nothing to merge")
    lses = torch.stack([lse for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lses - safe).nan_to_num_(0.0)
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts))
    return out.to(parts[0][0].dtype), lse


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    bias=None,
    scale: float | None = None,
    rows: torch.Tensor | Sequence[int] | None = None,
    cols: torch.Tensor | Sequence[int] | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities (float32) for selected query ``rows`` and/or key ``cols`` only.

    * ``rows``: ``softmax`` of those rows, ``(B, H, R, S_k)`` (cost ``R x S_k``);
    * ``cols``: ``exp(s[:, cols] - lse)``, ``(B, H, S_q, C)``, with the row log-sum-exp ``lse`` given (e.g. from the
      :func:`attention_with_lse` call that produced the layer's output) or computed with the fused kernel; no
      ``S_q x S_k`` map is built;
    * neither: the full map (for small layers such as 77-token cross-attention).
    ``bias`` must broadcast to (B, H, S_q, S_k).
    """
    _check_qkv(q, k)
    scale = _default_scale(q, scale)
    mask = _as_bias(bias, q, k.shape[-2])
    if rows is not None:
        rows = torch.as_tensor(rows, device=q.device, dtype=torch.long)
        q = q.index_select(-2, rows)
        if mask is not None and mask.shape[-2] != 1:
            mask = mask.index_select(-2, rows)
    if cols is None:
        s = q.float() @ k.float().transpose(-1, -2) * scale
        if mask is not None:
            s = s + mask.float()
        return torch.softmax(s, dim=-1)
    cols = torch.as_tensor(cols, device=q.device, dtype=torch.long)
    if lse is None:
        _, lse = attention_with_lse(q, k, k, mask, scale)
    elif rows is not None:
        lse = lse.index_select(-1, rows)
    s = q.float() @ k.index_select(-2, cols).float().transpose(-1, -2) * scale
    if mask is not None:
        s = s + (mask.index_select(-1, cols) if mask.shape[-1] != 1 else mask).float()
    return torch.exp(s - lse.float().unsqueeze(-1))
