"""IR-Diffusion: isolation and reposition attention for several consistent subjects.

He et al., *Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and Reposition
Attention* (arXiv 2411.19261); official code in ``hehuiguo/DreamStory`` (``DreamStoryScaledAttnProcessor``);
spec ``irdiffusion.md``. The target is generated with one reference per subject (spec §1, §4):

* **Isolation** (every self-attention layer, every step): a target query inside subject ``i``'s region never attends
  to target keys inside another subject's region (``-inf``), so subjects do not merge.
* **Reposition** (the decoder layers of spec §4.1, from ``start_layer``): each reference's masked tokens are cropped
  to its mask's box, resized (nearest) to the target region's box and pasted there, so matching parts sit at matching
  positions; target queries of subject ``i`` also attend to those repositioned keys of reference ``i`` (only inside
  the relocated mask, and only for query tokens that survive a per-step Bernoulli(0.5) dropout, ConsiStory's trick).
* **Mutual cross-attention** (every cross-attention layer, DreamStory, on by default with ``lambda = 0.9``): inside
  subject ``i``'s region the target's cross-attention output is blended with its attention to reference ``i``'s
  prompt: ``O = (1 - lambda) O + lambda M_i``.

Isolation is a query-dependent bias: it runs as :func:`~attnctrl.kernels.attention.grouped_attention` with one key-bias
vector per combination of subjects a query belongs to (and sees after the dropout), never a ``queries x keys`` mask. Only the rows inside subject
regions are recomputed; every other row is the stock output, bit for bit. Repositioning gathers the projected keys
and values (the key/value projections are linear, so this equals projecting repositioned hidden states on the
tokens the relocated mask lets through).

Decisions on official quirks (spec §4-8): subject masks reach every layer's grid by the official rule (bilinear,
min-max rescale, threshold 0.5 or the official ``thres=0`` histogram rule; ``mask_rule="official"``), built lazily
for every resolution (the official code handles two grids and asserts otherwise); a subject smaller than a token
keeps its best cells, as official; ``mask_rule="coverage"`` is attnctrl's earlier rule (see :class:`IRDiffusion`).
Repositioning takes torch's own nearest resize, as official. N <= 1 skips isolation (nothing to isolate) and N = 0
is the plain pipeline; a source mask that reaches a grid as one token is repositioned, where the official code
asserts; the dropout is drawn per subject from a seeded generator and resampled per step (official: the global RNG);
references are the FreeCustom-style re-noised clean latents of user images or of the pipeline's own rehearsal
(official: generated jointly from the same noise). Not reproduced: the official zeroing of the bottom sixth of each
rehearsed source mask (a portrait heuristic against hands and bodies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..core.controller import Controller, Method
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor
from ..kernels.attention import grouped_attention
from .reference import ReferenceState

__all__ = ["IRDiffusion", "IRAttnProcessor", "IRState"]


#: clamp of the official binarisation threshold (``binarize_mask`` in the official code)
_THRESHOLD_CLAMP = (1e-6, 1 - 1e-6)


def official_otsu(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """The official ``get_otsu_threshold`` (spec §4.2, ``thres=0``), op for op, quirks included.

    Its "between-class variance" is ``cumsum * (cumsum - bins) * (cummean - mean) ** 2`` over a ``histc`` of the
    values' own range, so on a grid of fewer than ``bins`` tokens every term is <= 0 and the argmax is the last
    bin: the threshold is ~1 and only the cells at the maximum survive. Returns a 0-dim float32 tensor.
    """
    x = values.float()
    hist = torch.histc(x, bins=bins)
    cumsum = torch.cumsum(hist, dim=0)
    cummean = torch.cumsum(hist * torch.arange(bins, device=x.device), dim=0) / cumsum
    variance = cumsum * (cumsum - bins) * (cummean - cummean[-1]) ** 2
    return torch.argmax(variance) / (bins - 1)


def rescaled_grid_masks(masks: torch.Tensor, grid, threshold: float | str = 0.5) -> torch.Tensor:
    """The official mask rule (spec §4.2): each mask bilinearly resized to the layer ``grid``, min-max rescaled to
    [0, 1] (``/ (max - min + 1e-8)``) and kept where it is ``> threshold`` (``"otsu"``: :func:`official_otsu`,
    the official ``thres=0``), the threshold clamped to ``[1e-6, 1 - 1e-6]`` as official. ``masks`` ``(N, H, W)``;
    returns ``(N, h * w)`` bool. A subject smaller than a token is kept: rescaling lifts its largest cell to 1.
    (The official code resizes bilinearly a second time to the same size, which is the identity.)
    """
    x = F.interpolate(masks.float()[:, None], size=tuple(grid), mode="bilinear")[:, 0]
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo + 1e-8)).flatten(1)
    out = []
    for m in x:
        t = official_otsu(m) if threshold == "otsu" else threshold
        t = t if t < _THRESHOLD_CLAMP[1] else _THRESHOLD_CLAMP[1]
        t = t if t > _THRESHOLD_CLAMP[0] else _THRESHOLD_CLAMP[0]
        out.append(m > t)
    return torch.stack(out)


def box_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` (end-exclusive) of the true cells of a non-empty 2-D mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def reposition_index(src_box, dst_box, grid, rule: str = "official") -> torch.Tensor:
    """``(n,)`` source token of every token of the ``dst_box`` when the ``src_box`` crop is resized onto it with
    nearest sampling (spec §4.3); tokens outside ``dst_box`` get 0.

    ``rule="official"``: torch's own ``F.interpolate(mode="nearest")`` on the crop, as the official code resizes the
    features (its source index is ``floor(d * float32(in / out))``, which lands on the neighbouring token for about
    1 % of box sizes and offsets); ``"exact"``: the exact ``floor(d * in / out)`` in integers.
    """
    h, w = grid
    s0y, s0x, s1y, s1x = src_box
    t0y, t0x, t1y, t1x = dst_box
    if rule == "official":
        tokens = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)[..., s0y:s1y, s0x:s1x]
        inner = F.interpolate(tokens, size=(t1y - t0y, t1x - t0x), mode="nearest")[0, 0].long()
    else:
        dy = torch.arange(t1y - t0y).view(-1, 1)
        dx = torch.arange(t1x - t0x).view(1, -1)
        inner = (s0y + dy * (s1y - s0y) // (t1y - t0y)) * w + s0x + dx * (s1x - s0x) // (t1x - t0x)
    index = torch.zeros(h, w, dtype=torch.long)
    index[t0y:t1y, t0x:t1x] = inner
    return index.flatten()


class IRState(ReferenceState):
    """Reference state plus IR-Diffusion's target regions and, per layer grid, the subjects' token masks, reposition
    maps and per-step dropout (what :class:`IRAttnProcessor` reads). Call :meth:`setup` before the call."""

    def setup(self, config: IRDiffusion, layers, target_masks: torch.Tensor, msa_layers: set[str],
              dropout_seed: int):
        """Bind to a config, the target regions ``(N, H, W)`` (disjoint, binary, at the image's size), the names of
        the reposition layers and the seed of the dropout's private generator."""
        self.config = config
        self.msa_layers = msa_layers
        self.target_full = target_masks  # (N, H, W) disjoint binary, at the image's resolution
        self._members: dict = {}
        self._sources: dict = {}
        self._source: dict = {}
        self._dropout: dict = {}
        self.dropout_gen = torch.Generator("cpu").manual_seed(int(dropout_seed))

    @staticmethod
    def _coverage(masks: torch.Tensor, grid) -> torch.Tensor:
        return F.adaptive_avg_pool2d(masks.float()[:, None], tuple(grid))[:, 0].flatten(1)  # (N, n) in [0, 1]

    def members(self, grid) -> torch.Tensor:
        """``(N, n)`` bool: the target tokens of each subject on a layer grid (``T_i``; see ``mask_rule``)."""
        grid = tuple(grid)
        if grid not in self._members:
            if self.config.mask_rule == "official":
                self._members[grid] = rescaled_grid_masks(self.target_full, grid, self.config.mask_threshold)
            else:  # a token belongs to the subject covering most of it (ties: the larger region), if over half
                cover = self._coverage(self.target_full, grid)
                areas = self.target_full.flatten(1).sum(1)
                best = (cover + 1e-6 * areas[:, None] / areas.max()).argmax(0)
                owned = F.one_hot(best, self.n).T.bool()
                self._members[grid] = owned & (cover.max(0).values > 0.5)
        return self._members[grid]

    def sources(self, grid) -> torch.Tensor:
        """``(N, n)`` bool: each reference's mask on a layer grid (``S_i``; see ``mask_rule``)."""
        grid = tuple(grid)
        if grid not in self._sources:
            if self.config.mask_rule == "official":
                self._sources[grid] = rescaled_grid_masks(self.full_masks, grid, self.config.mask_threshold)
            else:  # nearest sampling; a mask that misses every sample keeps its best-covered token
                masks = self.grid_masks(grid).clone()
                for i in torch.nonzero(~masks.any(1)).flatten().tolist():
                    masks[i, self._coverage(self.masks[i][None], grid)[0].argmax()] = True
                self._sources[grid] = masks
        return self._sources[grid]

    def _source_map(self, grid, i: int):
        grid = tuple(grid)
        key = (grid, i)
        if key not in self._source:
            h, w = grid
            src, tgt = self.sources(grid)[i], self.members(grid)[i]
            if not (torch.any(src) and torch.any(tgt)):  # absent on this grid: its reference block stays closed
                self._source[key] = (torch.zeros(h * w, dtype=torch.long), torch.zeros(h * w, dtype=torch.bool))
                return self._source[key]
            t0y, t0x, t1y, t1x = box = box_of(tgt.view(h, w))
            rule = "official" if self.config.mask_rule == "official" else "exact"
            index = reposition_index(box_of(src.view(h, w)), box, grid, rule)
            inside = torch.zeros(h, w, dtype=torch.bool)
            inside[t0y:t1y, t0x:t1x] = True
            self._source[key] = (index, inside.flatten() & src[index])
        return self._source[key]

    def source_index(self, grid, i: int) -> torch.Tensor:
        """``(n,)`` reference token copied to each target token by the reposition of subject ``i``."""
        return self._source_map(grid, i)[0]

    def relocated_mask(self, grid, i: int) -> torch.Tensor:
        """``(n,)`` bool: the relocated reference mask of subject ``i`` (inside its target box)."""
        return self._source_map(grid, i)[1]

    def dropout(self, grid, step: int) -> torch.Tensor:
        """``(N, n)`` bool, drawn per subject, step and grid (as official): the target tokens that see their
        reference this step; a subject that would lose every token keeps them all."""
        key = (tuple(grid), step)
        if key not in self._dropout:
            members = self.members(grid)
            keep = torch.rand(members.shape, generator=self.dropout_gen) >= self.config.dropout
            keep[~(keep & members).any(1)] = True
            self._dropout = {k: v for k, v in self._dropout.items() if k[1] == step}
            self._dropout[key] = keep
        return self._dropout[key]


class IRAttnProcessor(AttnCtrlProcessor):
    """Isolation + reposition in self-attention, mutual attention in cross-attention (see the module docstring)."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: IRState, config: IRDiffusion):
        super().__init__(layer, controller)
        self.state = state
        self.config = config

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        out = self.stock_attention(query, key, value, attention_mask)
        run, config = self.state, self.config
        if run.n == 0:
            return out
        targets, refs = run.rows(query.shape[0], self.ctl.cfg)
        grid = self.layer.grid(self.ctl.call.grid)
        members = run.members(grid).to(query.device)  # (N, n): target token in subject i's region (may overlap)
        if self.layer.kind == "cross":
            return self._mutual(query, key, value, out, targets, refs, members) if config.mutual_lambda > 0 else out
        step = self.ctl.step
        msa = (self.layer.name in run.msa_layers and step >= config.start_step
               and (config.end_step is None or step < config.end_step))
        n, n_sub = key.shape[2], run.n
        if n_sub <= 1 and not msa:
            return out
        rows = torch.nonzero(members.any(0)).flatten()
        if rows.numel() == 0:
            return out
        # queries with the same subjects (and, in reposition layers, the same subjects kept by the dropout) share
        # one key-bias row: a few groups, never a queries x keys mask
        kept = run.dropout(grid, step).to(query.device) & members if msa else torch.zeros_like(members)
        patterns, groups = torch.unique(torch.cat([members, kept]).T[rows].to(torch.uint8), dim=0,
                                        return_inverse=True)
        inside, sees = patterns[:, :n_sub].bool(), patterns[:, n_sub:].bool()  # (G, N) each
        width = n * (1 + n_sub) if msa else n
        bias = torch.zeros(len(patterns), width, device=query.device, dtype=query.dtype)
        # isolation (spec §4.3-4.4): key k of subject j is closed to a query that belongs to a subject other than j
        other = inside.sum(1, keepdim=True) - inside.long() > 0  # (G, N)
        closed = (other.float() @ members.float()) > 0  # (G, n)
        closed &= ~closed.all(1, keepdim=True)  # overlapping regions covering the grid: no softmax over nothing
        bias[:, :n][closed] = float("-inf")
        if msa:
            bias[:, n:] = float("-inf")  # reference blocks: closed unless opened below
            for i in range(n_sub):
                relocated = run.relocated_mask(grid, i).to(query.device)
                block = bias[:, n * (i + 1) : n * (i + 2)]
                block[sees[:, i : i + 1] & relocated] = config.ref_sa_lambda
        out = out.clone()
        for half, t in enumerate(targets):
            keys, values = [key[t : t + 1]], [value[t : t + 1]]
            if msa:
                for i, ref_rows in enumerate(refs):
                    r = ref_rows[half]
                    index = run.source_index(grid, i).to(query.device)
                    keys.append(key[r : r + 1].index_select(2, index))
                    values.append(value[r : r + 1].index_select(2, index))
            q_rows = query[t : t + 1].index_select(2, rows)
            result = grouped_attention(q_rows, torch.cat(keys, 2), torch.cat(values, 2), groups, bias)
            out[t : t + 1, :, rows] = result.to(out.dtype)
        return out

    def _mutual(self, query, key, value, out, targets, refs, members):
        """DreamStory's mutual cross-attention (spec §4.5): inside the subjects' regions, blend with the attention
        to each subject's prompt, averaged where regions overlap."""
        if not torch.any(members):
            return out
        lam = self.config.mutual_lambda
        out = out.clone()
        masks = members.to(out.dtype)  # (N, n)
        covered = masks.sum(0)
        inside = (covered > 0).to(out.dtype)
        for half, t in enumerate(targets):
            mixed = 0
            for i, ref_rows in enumerate(refs):
                r = ref_rows[half]
                m_i = F.scaled_dot_product_attention(query[t : t + 1], key[r : r + 1], value[r : r + 1])
                mixed = mixed + masks[i].view(1, 1, -1, 1) * m_i
            mixed = mixed / covered.clamp(min=1).view(1, 1, -1, 1)  # a count: the official "+ 1e-8" is 0 in fp16
            u = inside.view(1, 1, -1, 1)
            out[t : t + 1] = (1 - lam * u) * out[t : t + 1] + lam * u * mixed
        return out


@dataclass(frozen=True)
class IRDiffusion(Method):
    """IR-Diffusion settings (used by :class:`attnctrl.pipelines.IRDiffusionPipeline`, which supplies subjects;
    not a plugin: ``attnctrl.apply`` refuses it).

    Args that matter:
        mutual_lambda: blend of the mutual cross-attention inside subject regions (0.9 as the official run; 0 = off).
        dropout: probability that a target token of a subject does *not* see its reference in a step (0.5).
        mask_rule: how a subject's masks reach each layer's token grid. ``"official"`` (default, spec §4.2): bilinear
            resize, min-max rescale, ``> mask_threshold``; a subject smaller than a token keeps its best cells and
            regions may overlap; reposition indices from torch's nearest resize. ``"coverage"``: a token is the
            subject's that covers most of it, if over half (disjoint; a subject covering no token over half is
            absent on that grid); exact integer nearest indices.
        mask_threshold: threshold of the official rule: 0.5, or ``"otsu"`` for the official code's ``thres=0``
            histogram rule (see :func:`official_otsu`).
    Args to tinker with:
        msa_layers: layer selector of the reposition layers (None: SD 1.x/2.x blocks 10-15 = "decoder-high-res";
            SDXL: transformer blocks from 36/70 of the way on, i.e. spec §4.1's start_layer 36 of 70);
        start_step, end_step: reposition steps; ref_sa_lambda: logit bonus of reference keys (0 as official);
        rehearsal_layers: layer selector of the cross-attention maps that give the rehearsals' masks (the layout's
            regions and rehearsed references' masks; None: every layer with text keys, AttentionMaps' default).
    """

    mutual_lambda: float = field(default=0.9, metadata={"help": "irdiffusion: mutual cross-attention weight"})
    dropout: float = field(default=0.5, metadata={"help": "irdiffusion: target-side reference dropout"})
    msa_layers: object = field(default=None, metadata={"help": "irdiffusion: reposition layers (selector)"})
    mask_rule: str = field(default="official", metadata={"help": "irdiffusion: 'official' (bilinear, rescale, "
                                                           "threshold) or 'coverage' masks on each grid"})
    mask_threshold: float | Literal["otsu"] = field(default=0.5, metadata={"help": "irdiffusion: threshold of the official mask "
                                                               "rule, or 'otsu' (the official thres=0)"})
    start_step: int = field(default=0, metadata={"help": "first step with reference attention"})
    end_step: int | None = field(default=None, metadata={"help": "reference attention before this step"})
    ref_sa_lambda: float = field(default=0.0, metadata={"help": "irdiffusion: logit bonus of reference keys"})
    layers: object = field(default="all", metadata={"help": "layer selector"})
    rehearsal_layers: object = field(default=None, metadata={
        "help": "irdiffusion: layers whose cross-attention gives the rehearsals' masks (selector; default: every "
                "text layer)"})

    name = "irdiffusion"
    families = ("sd", "sdxl")
    kinds = ("self", "cross")
    pipeline = "IRDiffusionPipeline"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.mutual_lambda <= 1:
            raise AttnCtrlError(f"mutual_lambda must lie in [0, 1], got {self.mutual_lambda}")
        if not 0 <= self.dropout < 1:
            raise AttnCtrlError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.mask_rule not in ("official", "coverage"):
            raise AttnCtrlError(f"mask_rule must be 'official' or 'coverage', not {self.mask_rule!r}")
        t = self.mask_threshold
        if t != "otsu" and (isinstance(t, (bool, str)) or not 0 <= t <= 1):
            raise AttnCtrlError(f"mask_threshold must be a number in [0, 1] or 'otsu', not {t!r}")
        if self.start_step < 0 or (self.end_step is not None and self.end_step <= self.start_step):
            raise AttnCtrlError(f"need 0 <= start_step < end_step, got {self.start_step}, {self.end_step}")

    def msa_selection(self, ctl: Controller) -> list[LayerInfo]:
        """The self-attention layers that also attend to the repositioned references."""
        if self.msa_layers is not None:
            chosen = ctl.layers.select(self.msa_layers)
        elif ctl.family.name == "sdxl":
            first = round(36 / 70 * ctl.layers.num_blocks)  # spec §4.1: start_layer 36 of SDXL's 70 blocks
            chosen = ctl.layers.select(f"blocks[{first}:]")
        else:
            chosen = ctl.layers.select("decoder-high-res")
        chosen = [la for la in chosen if la.kind == "self"]
        if not chosen:
            raise AttnCtrlError(f"msa_layers {self.msa_layers!r} selects no self-attention layer")
        return chosen

    def weights(self, n: int) -> tuple[float, ...]:  # the reference pipeline checks per-reference weights
        return (0.0,) * n
