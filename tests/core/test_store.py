"""AttentionStore: only the asked-for rows/columns, in-place sums, count-weighted mean across grids."""

from __future__ import annotations

import pytest
import torch

from attnctrl.core import AttentionStore


def probs(b, n, t, seed=0):
    return torch.softmax(torch.randn(b, n, t, generator=torch.Generator().manual_seed(seed)), -1)


def test_cfg_halves_and_columns():
    p = probs(4, 16, 5)
    cond = AttentionStore("cond")
    cond.record(p, (4, 4), cfg=True)
    assert torch.equal(cond.mean(), p[2:].reshape(2, 4, 4, 5))
    unc = AttentionStore("uncond", columns=[1, 3])
    unc.record(p, (4, 4), cfg=True)
    assert torch.equal(unc.mean(), p[:2, :, [1, 3]].reshape(2, 4, 4, 2))
    both = AttentionStore("both")
    both.record(p, (4, 4), cfg=True)
    assert both.mean().shape == (4, 4, 4, 5)
    nocfg = AttentionStore("cond")
    nocfg.record(p, (4, 4), cfg=False)
    assert nocfg.mean().shape[0] == 4


def test_mean_over_grids_keeps_distributions():
    s = AttentionStore()
    s.record(probs(1, 64, 7, 1), (8, 8))
    s.record(probs(1, 64, 7, 2), (8, 8))
    s.record(probs(1, 16, 7, 3), (4, 4))
    m = s.mean()
    assert m.shape == (1, 8, 8, 7) and s.counts == {(8, 8): 2, (4, 4): 1}
    torch.testing.assert_close(m.sum(-1), torch.ones(1, 8, 8))
    assert s.mean((4, 4)).shape == (1, 4, 4, 7)
    s.reset()
    assert not s
    with pytest.raises(ValueError, match="nothing"):
        s.mean()


def test_shape_checks():
    s = AttentionStore()
    with pytest.raises(ValueError, match="grid"):
        s.record(probs(1, 15, 3), (4, 4))
    with pytest.raises(ValueError, match="even"):
        s.record(probs(3, 16, 3), (4, 4), cfg=True)
    s.record(probs(1, 16, 3), (4, 4))
    with pytest.raises(ValueError, match="reset"):
        s.record(probs(2, 16, 3), (4, 4))
    with pytest.raises(ValueError):
        AttentionStore("middle")
