"""An attention-map store that records only what a method asks for, aggregated in place.

A method decides which layers record (by installing recording processors only there); the store decides which
batch rows (CFG half) and which key columns (token indices) it keeps, and sums head-averaged maps per token grid.
:meth:`AttentionStore.mean` upsamples every grid to the largest one and returns the count-weighted mean, i.e. the
average over heads, layers and calls (DAAM-style). Bilinear upsampling is a convex combination of cells, so rows
that were probability distributions stay probability distributions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["AttentionStore"]

_HALVES = ("cond", "uncond", "both")


class AttentionStore:
    """Running sums of ``(batch, h, w, columns)`` attention maps, one sum per token grid.

    ``half``: ``"cond"`` keeps the conditional rows of a CFG batch, ``"uncond"`` the unconditional ones, ``"both"``
    everything (when a call has no CFG batch, every row counts as conditional). ``columns``: key indices to keep
    (None = all).
    """

    def __init__(self, half: str = "cond", columns: Sequence[int] | None = None):
        if half not in _HALVES:
            raise ValueError(f"half must be one of {_HALVES}, not {half!r}")
        self.half = half
        self.columns = None if columns is None else torch.as_tensor(list(columns), dtype=torch.long)
        self.sums: dict[tuple[int, ...], torch.Tensor] = {}
        self.counts: dict[tuple[int, ...], int] = {}

    def __bool__(self) -> bool:
        return bool(self.counts)

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def rows(self, batch: int, cfg: bool) -> slice:
        """The batch rows this store keeps for a call of ``batch`` rows (``cfg``: the batch is [uncond; cond])."""
        if not cfg or self.half == "both":
            return slice(0, batch)
        if batch % 2:
            raise ValueError(f"a CFG batch must have an even size, got {batch}")
        return slice(batch // 2, batch) if self.half == "cond" else slice(0, batch // 2)

    def record(self, maps: torch.Tensor, grid: Sequence[int], cfg: bool = False) -> None:
        """Add head-averaged maps ``(batch, tokens, keys)`` of one layer call whose queries lie on ``grid``."""
        grid = tuple(int(g) for g in grid)
        n = 1
        for g in grid:
            n *= g
        if maps.ndim != 3 or maps.shape[1] != n:
            raise ValueError(f"maps must be (batch, {n}, keys) for grid {grid}, got {tuple(maps.shape)}")
        maps = maps[self.rows(maps.shape[0], cfg)]
        if self.columns is not None:
            maps = maps.index_select(-1, self.columns.to(maps.device))
        maps = maps.detach().float().reshape(maps.shape[0], *grid, maps.shape[-1])
        if grid in self.sums:
            if self.sums[grid].shape != maps.shape:
                raise ValueError(
                    f"maps of shape {tuple(maps.shape)} do not match the {tuple(self.sums[grid].shape)} recorded "
                    f"so far (batch or prompt length changed without a reset)"
                )
            self.sums[grid].add_(maps)
            self.counts[grid] += 1
        else:
            self.sums[grid] = maps.clone()
            self.counts[grid] = 1

    def mean(self, grid: Sequence[int] | None = None) -> torch.Tensor:
        """Count-weighted mean over everything recorded, on ``grid`` (default: the largest recorded grid).

        Returns ``(batch, *grid, keys)``.
        """
        if not self.counts:
            raise ValueError("nothing has been recorded yet")
        if grid is None:
            grid = max(self.sums, key=lambda g: (len(g), *g))
        grid = tuple(grid)
        total = None
        for g, s in self.sums.items():
            if g != grid:
                if len(g) != len(grid):
                    raise ValueError(f"cannot combine maps on grids {g} and {grid}")
                spatial = s.movedim(-1, 1)  # (B, keys, *g)
                mode = "bilinear" if len(g) == 2 else "trilinear"
                s = F.interpolate(spatial, size=grid, mode=mode, align_corners=False).movedim(1, -1)
            total = s if total is None else total + s
        return total / sum(self.counts.values())
