"""Token merging (ToMe for SD) with the extra agent merge of AgentSD, in pure PyTorch (gather / scatter_reduce).

:func:`bipartite_plan` is ``bipartite_soft_matching_random2d`` of tomesd (Bolya & Hoffman, 2023) as AgentSD uses it
(agentsd spec §2): the ``h x w`` token grid is cut into ``sy x sx`` cells; one token per full cell is a "dst" token
(a random position drawn from a private generator, shared by the whole batch; the top-left one without
randomness); every other token, including those of partial border cells, is "src". Each src token is matched to its
most cosine-similar dst token (on the metric, e.g. the raw block input); src tokens are ranked by that similarity.
A merge with ``r`` averages the top-``r`` src tokens into their dst (``scatter_reduce`` "mean", dst included) and
keeps ``[remaining src (ranked order), all dst]``; :meth:`MergePlan.unmerge` copies each merged src its dst's value.
The agent merge uses the same ranking with ``agent_r``. No Python loop runs over tokens.

``order="row-major"`` (default) lists dst and src tokens in row-major grid order and ranks src tokens with a stable
sort, so ties (equal similarities) break by position, the same on every device. ``order="official"`` reproduces
tomesd / AgentSD's own order op for op: dst|src from a non-stable ``argsort`` of the ``-1/0`` partition buffer and the
ranking from a non-stable ``argsort`` of the similarities, so the kept tokens, their order and the tie-breaking
are those of the official code on the same device and torch build. Both give the same merged values wherever no two
similarities tie; only the token order (and float summation order) differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MergePlan", "bipartite_plan", "random_picks"]


@dataclass
class MergePlan:
    """Indices of one bipartite matching; ``merge`` / ``unmerge`` apply it to any ``(B, N, C)`` tensor."""

    n: int  # tokens before merging
    src_pos: torch.Tensor  # (N_src,) grid positions of src tokens
    dst_pos: torch.Tensor  # (N_dst,) grid positions of dst tokens
    order: torch.Tensor  # (B, N_src) src tokens ranked by best similarity, descending
    best_dst: torch.Tensor  # (B, N_src) index (into dst) of each src token's best match

    @property
    def n_src(self) -> int:
        return self.src_pos.numel()

    @property
    def n_dst(self) -> int:
        return self.dst_pos.numel()

    def merged_len(self, r: int) -> int:
        return self.n - min(r, self.n_src)

    def _parts(self, x: torch.Tensor):
        b, _, c = x.shape
        src = x.index_select(1, self.src_pos)
        dst = x.index_select(1, self.dst_pos)
        return src, dst, b, c

    def merge(self, x: torch.Tensor, r: int, mode: str = "mean") -> torch.Tensor:
        """``[unmerged src (ranked), dst with the top-r src averaged in]``, shape ``(B, N - r, C)``."""
        r = min(r, self.n_src)
        src, dst, b, c = self._parts(x)
        unm_idx = self.order[:, r:]
        src_idx = self.order[:, :r]
        unm = src.gather(1, unm_idx.unsqueeze(-1).expand(b, -1, c))
        moved = src.gather(1, src_idx.unsqueeze(-1).expand(b, -1, c))
        targets = self.best_dst.gather(1, src_idx)
        dst = dst.scatter_reduce(1, targets.unsqueeze(-1).expand(b, -1, c), moved, reduce=mode, include_self=True)
        return torch.cat([unm, dst], dim=1)

    def unmerge(self, x: torch.Tensor, r: int) -> torch.Tensor:
        """Inverse layout of :meth:`merge`: ``(B, N - r, C)`` back to ``(B, N, C)``; merged src tokens take their
        dst's value."""
        r = min(r, self.n_src)
        b, _, c = x.shape
        n_unm = self.n_src - r
        unm, dst = x[:, :n_unm], x[:, n_unm:]
        src_idx = self.order[:, :r]
        moved = dst.gather(1, self.best_dst.gather(1, src_idx).unsqueeze(-1).expand(b, -1, c))
        out = x.new_empty(b, self.n, c)
        out[:, self.dst_pos] = dst
        src_positions = self.src_pos[self.order]  # (B, N_src) grid positions in ranked order
        out.scatter_(1, src_positions[:, r:].unsqueeze(-1).expand(b, -1, c), unm)
        out.scatter_(1, src_positions[:, :r].unsqueeze(-1).expand(b, -1, c), moved)
        return out


def random_picks(h: int, w: int, sx: int, sy: int, generator: torch.Generator) -> torch.Tensor:
    """A random dst position (``0 .. sy * sx - 1``) in each full ``sy x sx`` cell of an ``h x w`` grid."""
    return torch.randint(sy * sx, (h // sy, w // sx), generator=generator)


def bipartite_plan(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int,
    sy: int,
    pick: torch.Tensor | None = None,
    order: str = "row-major",
) -> MergePlan:
    """Match the tokens of ``metric`` ``(B, h * w, C)`` (row-major grid) as described in the module docstring.

    ``pick`` ``(h // sy, w // sx)``: the dst position in each cell (:func:`random_picks`); ``None`` takes the
    top-left token of every cell. ``order``: ``"row-major"`` or ``"official"`` (see the module docstring).
    """
    if order not in ("row-major", "official"):
        raise ValueError(f"order must be 'row-major' or 'official', not {order!r}")
    b, n, _ = metric.shape
    if n != h * w:
        raise ValueError(f"metric has {n} tokens, the grid {h}x{w} has {h * w}")
    device = metric.device
    hsy, wsx = h // sy, w // sx
    if hsy == 0 or wsx == 0:
        raise ValueError(f"the {h}x{w} grid has no full {sy}x{sx} cell")
    if pick is not None and tuple(pick.shape) != (hsy, wsx):
        raise ValueError(f"pick has shape {tuple(pick.shape)}, the {h}x{w} grid has {hsy}x{wsx} cells")
    with torch.no_grad():
        pick = torch.zeros(hsy, wsx, dtype=torch.long, device=device) if pick is None else pick.to(device)
        cy, cx = torch.arange(hsy, device=device).view(-1, 1), torch.arange(wsx, device=device).view(1, -1)
        dst_y = cy * sy + pick // sx
        dst_x = cx * sx + pick % sx
        dst_pos = (dst_y * w + dst_x).flatten()
        buffer = torch.zeros(h, w, dtype=torch.int64, device=device)  # -1 = dst, 0 = src
        buffer.view(-1)[dst_pos] = -1
        if order == "official":  # tomesd: ``idx_buffer.reshape(1, -1, 1).argsort(dim=1)`` (not stable)
            split = buffer.reshape(1, -1, 1).argsort(dim=1)[0, :, 0]
        else:
            split = buffer.flatten().argsort(stable=True)  # row-major dst, then row-major src
        dst_pos, src_pos = split[: hsy * wsx], split[hsy * wsx :]
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m.index_select(1, src_pos) @ m.index_select(1, dst_pos).transpose(-1, -2)
        node_max, best_dst = scores.max(dim=-1)
        ranked = node_max.argsort(dim=-1, descending=True, stable=order == "row-major")
    return MergePlan(n=n, src_pos=src_pos, dst_pos=dst_pos, order=ranked, best_dst=best_dst)
