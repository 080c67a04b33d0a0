"""The per-call state the multi-reference processors read (FreeCustom, MagicFace, IR-Diffusion).

A reference generation runs the target and its N references in one batch, laid out for CFG exactly as the base
pipeline lays out a prompt list: ``[uncond: target, ref_1..ref_N; cond: target, ref_1..ref_N]``.
:class:`ReferenceState` knows that layout (:meth:`ReferenceState.rows`) and the references' masks on every layer
grid (:meth:`ReferenceState.grid_masks`); the pipeline side (:class:`attnctrl.pipelines.ReferenceRun`: images, VAE
latents, the UNet re-noising hook) extends it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.controller import MethodState
from ..core.errors import AttnCtrlError

__all__ = ["ReferenceState"]


class ReferenceState(MethodState):
    """The references' masks and the batch layout of one reference generation.

    ``full_masks``: ``(N, H, W)`` binary float masks at the image's size; ``latent_hw``: the latent grid ``(h, w)``.
    The masks are also kept at twice the latent resolution (128 x 128 for 512 px, as the official code) in
    ``masks`` and resized to each layer's grid with ``nearest`` on demand.
    """

    def __init__(self, full_masks: torch.Tensor, latent_hw: tuple[int, int]):
        self.full_masks = full_masks
        self.n = int(full_masks.shape[0])
        self.latent_hw = tuple(latent_hw)
        side = (2 * self.latent_hw[0], 2 * self.latent_hw[1])
        self.masks = [F.interpolate(m[None, None], size=side, mode="nearest")[0, 0] for m in full_masks]
        self._grid_masks: dict[tuple[int, int], torch.Tensor] = {}

    def grid_masks(self, grid) -> torch.Tensor:
        """``(N, h * w)`` boolean masks of the references on a layer grid, row-major (cached)."""
        grid = tuple(grid)
        if grid not in self._grid_masks:
            stacked = torch.stack(self.masks)[:, None]
            self._grid_masks[grid] = F.interpolate(stacked, size=grid, mode="nearest")[:, 0].flatten(1) > 0.5
        return self._grid_masks[grid]

    def rows(self, batch: int, cfg: bool) -> tuple[list[int], list[list[int]]]:
        """Batch rows of the target(s) and of each reference in a denoiser call of ``batch`` rows."""
        per = self.n + 1
        halves = 2 if cfg else 1
        if batch != per * halves:
            raise AttnCtrlError(
                f"a reference batch has {per * halves} rows (target + {self.n} references"
                f"{', x2 for CFG' if cfg else ''}) but the model got {batch}; generate one image per call"
            )
        targets = [h * per for h in range(halves)]
        refs = [[h * per + 1 + i for h in range(halves)] for i in range(self.n)]
        return targets, refs
