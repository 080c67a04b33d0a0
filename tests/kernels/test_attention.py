"""Attention primitives against dense references (property-based), and the no-(Sq x Sk) guarantees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from attnctrl.kernels import attention as A
from attnctrl.kernels.attention import (
    KVBlock,
    attention_probs,
    attention_with_lse,
    grouped_attention,
    merge_attention,
    multi_block_attention,
    sdpa,
)

pytestmark = pytest.mark.usefixtures("no_grad")


def dense(q, k, v, bias=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    p = torch.softmax(s, -1)
    return (p @ v.double()).float(), torch.logsumexp(s, -1).float(), p.float()


shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.sampled_from([4, 8, 16])
)


def qkv(b, h, sq, sk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, sq, d, generator=g), torch.randn(b, h, sk, d, generator=g),
            torch.randn(b, h, sk, d, generator=g))


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 1000))
def test_sdpa_key_bias_matches_dense(shape, seed):
    b, h, sq, sk, d = shape
    q, k, v = qkv(b, h, sq, sk, d, seed)
    bias = torch.randn(b, 1, 1, sk, generator=torch.Generator().manual_seed(seed)) * 2
    bias[..., 0] = 0.0
    if sk > 1:
        bias[..., -1] = float("-inf")
    out = sdpa(q, k, v, bias)
    ref, _, _ = dense(q, k, v, bias.expand(b, h, sq, sk))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_key_bias_is_never_expanded_to_a_query_key_matrix(monkeypatch):
    seen = []
    real = A.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(1, 2, 300, 200, 8)
    sdpa(q, k, v, torch.zeros(200))
    multi_block_attention(q, [KVBlock(k, v), KVBlock(k, v, bias=torch.zeros(1, 1, 1, 200))])
    grouped_attention(q, k, v, torch.randint(0, 3, (300,)), torch.zeros(3, 200))
    assert len(seen) == 5
    for mask in seen:
        assert mask.ndim == 4 and mask.shape[-2] == 1, mask.shape  # one row, broadcast over queries by the kernel
        assert mask.untyped_storage().nbytes() <= 3 * 400 * 4  # a few key rows behind it, never Sq x Sk


def test_key_bias_allocates_no_query_key_tensor():
    """Measured: the largest allocation of a key-bias SDPA is far below one (heads x Sq x Sk) float tensor."""
    q, k, v = qkv(1, 2, 2048, 2048, 32)
    bias = torch.zeros(1, 1, 1, 2048)
    bias[..., :100] = float("-inf")

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)

    full = 2 * 2048 * 2048 * 4
    assert peak(lambda: sdpa(q, k, v, bias)) < full / 8
    assert peak(lambda: sdpa(q, k, v, bias.expand(1, 2, 2048, 2048).contiguous())) >= full  # the probe works


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(0, 1000), st.booleans())
def test_multi_block_equals_dense_concatenation(n_blocks, sq, seed, with_weight):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, sq, 8, generator=g)
    blocks, keys, values, biases = [], [], [], []
    for i in range(n_blocks):
        n = int(torch.randint(1, 20, (1,), generator=g))
        k, v = torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)
        bias = None if i == 0 else torch.where(torch.rand(2, 1, 1, n, generator=g) > 0.5, 1.5, float("-inf"))
        weight = torch.rand(2, 1, n, generator=g) + 0.5 if with_weight and i else None
        blocks.append(KVBlock(k, v, bias=bias, key_weight=weight))
        keys.append(k * weight.unsqueeze(-1) if weight is not None else k)
        values.append(v)
        biases.append(torch.zeros(2, 1, 1, n) if bias is None else bias)
    out = multi_block_attention(q, blocks)
    k, v, bias = torch.cat(keys, -2), torch.cat(values, -2), torch.cat(biases, -1).expand(2, 2, sq, -1)
    ref, _, p = dense(q, k, v, bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(p[bias == float("-inf")] == 0)  # forbidden keys get exactly zero probability


def test_block_bias_scalar_and_weight_zero():
    q, k, v = qkv(1, 2, 10, 6, 8)
    k2, v2 = torch.randn_like(k), torch.randn_like(v)
    out = multi_block_attention(q, [KVBlock(k, v), KVBlock(k2, v2, bias=2.0)])
    ref, _, _ = dense(q, torch.cat([k, k2], -2), torch.cat([v, v2], -2),
                      torch.cat([torch.zeros(6), torch.full((6,), 2.0)]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a zero multiplicative weight turns the block's logits into 0 (the paper form of a masked-out key)
    out0 = multi_block_attention(q, [KVBlock(k, v), KVBlock(k2, v2, key_weight=torch.zeros(6))])
    ref0, _, _ = dense(q, torch.cat([k, torch.zeros_like(k2)], -2), torch.cat([v, v2], -2))
    torch.testing.assert_close(out0, ref0, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(1, 4), st.integers(0, 1000))
def test_grouped_attention_equals_dense_query_dependent_bias(shape, n_groups, seed):
    b, h, sq, sk, d = shape
    q, k, v = qkv(b, h, sq, sk, d, seed)
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, n_groups, (sq,), generator=g)
    group_bias = torch.where(torch.rand(n_groups, sk, generator=g) > 0.4, 0.0, float("-inf"))
    group_bias[:, 0] = 0.0  # every group sees at least one key
    out = grouped_attention(q, k, v, groups, group_bias)
    ref, _, p = dense(q, k, v, group_bias[groups])  # the (Sq, Sk) bias only the reference builds
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(p[..., group_bias[groups] == float("-inf")] == 0)


def test_grouped_attention_checks_inputs():
    q, k, v = qkv(1, 1, 5, 4, 8)
    with pytest.raises(ValueError, match="group ids"):
        grouped_attention(q, k, v, torch.tensor([0, 1, 2, 0, 0]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        grouped_attention(q, k, v, torch.zeros(4, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="4-D"):
        sdpa(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="additive"):
        sdpa(q, k, v, torch.ones(4, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 1000), st.booleans())
def test_lse_and_probability_columns_match_dense(shape, seed, with_bias):
    b, h, sq, sk, d = shape
    q, k, v = qkv(b, h, sq, sk, d, seed)
    bias = torch.randn(b, 1, 1, sk, generator=torch.Generator().manual_seed(seed)) if with_bias else None
    out, lse = attention_with_lse(q, k, v, bias)
    ref, ref_lse, p = dense(q, k, v, None if bias is None else bias.expand(b, h, sq, sk))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    cols = list(range(0, sk, 3))
    torch.testing.assert_close(attention_probs(q, k, bias, cols=cols, lse=lse), p[..., cols], atol=1e-6, rtol=0)
    torch.testing.assert_close(attention_probs(q, k, bias, cols=cols), p[..., cols], atol=1e-6, rtol=0)
    rows = list(range(0, sq, 2))
    torch.testing.assert_close(attention_probs(q, k, bias, rows=rows), p[..., rows, :], atol=1e-6, rtol=0)
    torch.testing.assert_close(attention_probs(q, k, bias, rows=rows, cols=cols, lse=lse), p[..., rows, :][..., cols],
                               atol=1e-6, rtol=0)


def test_lse_handles_inputs_with_a_strided_head_dim():
    """torch's fused CPU kernel mis-reads such views; attention_with_lse must not."""
    q = torch.randn(1, 1, 4, 8, 8).permute(0, 1, 3, 4, 2).reshape(1, 1, 64, 4)
    assert q.stride(-1) != 1
    k, v = torch.randn(1, 1, 64, 4), torch.randn(1, 1, 64, 4)
    out, lse = attention_with_lse(q, k, v)
    ref, ref_lse, _ = dense(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_lse_fast_path_is_bit_identical_to_sdpa():
    q, k, v = qkv(2, 3, 64, 48, 16)
    out, _ = attention_with_lse(q, k, v)
    assert torch.equal(out, sdpa(q, k, v))
    out_math, lse_math = A._math_attention_with_lse(q, k, v, None, 16**-0.5)
    torch.testing.assert_close(out_math, out, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(1, 4), st.integers(0, 1000))
def test_merge_of_disjoint_key_sets_is_exact(sk, parts, seed):
    q, k, v = qkv(1, 2, 7, sk, 8, seed)
    cuts = sorted(set(torch.randint(1, sk, (parts - 1,), generator=torch.Generator().manual_seed(seed)).tolist()))
    bounds = [0, *cuts, sk]
    pieces = [attention_with_lse(q, k[..., a:b, :], v[..., a:b, :]) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge_attention(pieces)
    ref, ref_lse, _ = dense(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_merge_ignores_parts_that_saw_no_key():
    q, k, v = qkv(1, 1, 4, 6, 8)
    blocked = torch.full((6,), float("-inf"))
    empty = A._math_attention_with_lse(q, k, v, blocked.view(1, 1, 1, 6), 8**-0.5)
    full = attention_with_lse(q, k, v)
    out, lse = merge_attention([empty, full])
    torch.testing.assert_close(out, full[0])
    out2, lse2 = merge_attention([empty])
    assert torch.all(out2 == 0) and torch.all(torch.isinf(lse2))


def test_half_precision_lse_is_float32():
    q, k, v = (t.to(torch.bfloat16) for t in qkv(1, 2, 16, 16, 8))
    out, lse = attention_with_lse(q, k, v)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    _, ref_lse, _ = dense(q.float(), k.float(), v.float())
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-2)
