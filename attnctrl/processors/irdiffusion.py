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

Isolation is a query-dependent bias: it runs as :func:`~attnctrl.core.attention.grouped_attention` with one key-bias
vector per subject region (and per dropout state), never a ``queries x keys`` mask. Only the rows inside subject
regions are recomputed; every other row is the stock output, bit for bit. Repositioning gathers the projected keys
and values (the key/value projections are linear, so this equals projecting repositioned hidden states on the
tokens the relocated mask lets through).

Decisions on official quirks (spec §5-8): masks are built lazily for every resolution (the official code handles
two and asserts otherwise); on a grid where a subject covers no token over half it is absent (no isolation,
reposition or mutual cross-attention there: forcing it onto one coarse token spread its prompt over a far larger
area and raised attribute swaps on the toyworld model); N <= 1
skips isolation (nothing to isolate) and N = 0 is the plain pipeline; the dropout is seeded and resampled per step;
references are the FreeCustom-style re-noised clean latents of user images or of the pipeline's own rehearsal
(official: generated jointly from the same noise). Not reproduced: the official zeroing of the bottom sixth of each
rehearsed source mask (a portrait heuristic against hands and bodies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.attention import grouped_attention
from ..core.controller import Controller, Method
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor

__all__ = ["IRDiffusion", "IRAttnProcessor"]


class IRAttnProcessor(AttnCtrlProcessor):
    """Isolation + reposition in self-attention, mutual attention in cross-attention (see the module docstring)."""

    def __init__(self, layer: LayerInfo, controller: Controller, run, config: IRDiffusion):
        super().__init__(layer, controller)
        self.run = run
        self.config = config

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        out = self.stock_attention(query, key, value, attention_mask)
        run, config = self.run, self.config
        if run.n == 0:
            return out
        targets, refs = run.rows(query.shape[0], self.ctl.cfg)
        grid = self.layer.grid(self.ctl.call.grid)
        if self.layer.kind == "cross":
            return self._mutual(query, key, value, out, targets, refs, grid) if config.mutual_lambda > 0 else out
        step = self.ctl.step
        msa = (self.layer.name in run.msa_layers and step >= config.start_step
               and (config.end_step is None or step < config.end_step))
        if run.n <= 1 and not msa:
            return out
        owner = run.owner(grid).to(query.device)  # (n,) 0 = background, i = subject i
        rows = torch.nonzero(owner > 0).flatten()
        if rows.numel() == 0:
            return out
        n, n_sub = key.shape[2], run.n
        groups = owner[rows] - 1  # 0 .. N-1
        n_groups = n_sub
        if msa:
            keep = run.dropout(grid, step).to(query.device)  # (n,) bool: query token survives the dropout
            groups = torch.where(keep[rows], groups, groups + n_sub)  # dropped tokens: isolation only
            n_groups = 2 * n_sub
        width = n * (1 + n_sub) if msa else n
        bias = torch.zeros(n_groups, width, device=query.device, dtype=query.dtype)
        bias[:, n:] = float("-inf")  # reference blocks: closed unless opened below
        for i in range(n_sub):
            others = (owner > 0) & (owner != i + 1)  # isolation: other subjects' target keys
            bias[i, :n][others] = float("-inf")
            if msa:
                bias[i + n_sub, :n][others] = float("-inf")
        if msa:
            for i in range(n_sub):
                relocated = run.relocated_mask(grid, i).to(query.device)
                block = bias[i, n * (i + 1) : n * (i + 2)]
                block[relocated] = config.ref_sa_lambda
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

    def _mutual(self, query, key, value, out, targets, refs, grid):
        """DreamStory's mutual cross-attention (spec §4.5): blend with the attention to the subject's prompt."""
        owner = self.run.owner(grid).to(query.device)
        if not torch.any(owner > 0):
            return out
        lam = self.config.mutual_lambda
        out = out.clone()
        masks = torch.stack([owner == i + 1 for i in range(self.run.n)]).to(out.dtype)  # (N, n)
        covered = masks.sum(0)
        inside = (covered > 0).to(out.dtype)
        for half, t in enumerate(targets):
            mixed = 0
            for i, ref_rows in enumerate(refs):
                r = ref_rows[half]
                m_i = F.scaled_dot_product_attention(query[t : t + 1], key[r : r + 1], value[r : r + 1])
                mixed = mixed + masks[i].view(1, 1, -1, 1) * m_i
            mixed = mixed / (covered.view(1, 1, -1, 1) + 1e-8)
            u = inside.view(1, 1, -1, 1)
            out[t : t + 1] = (1 - lam * u) * out[t : t + 1] + lam * u * mixed
        return out


@dataclass(frozen=True)
class IRDiffusion(Method):
    """IR-Diffusion settings (used by :class:`attnctrl.pipelines.IRDiffusionPipeline`, which supplies subjects).

    Args that matter:
        mutual_lambda: blend of the mutual cross-attention inside subject regions (0.9 as the official run; 0 = off).
        dropout: probability that a target token of a subject does *not* see its reference in a step (0.5).
    Args to tinker with:
        msa_layers: layer selector of the reposition layers (None: SD 1.x/2.x blocks 10-15 = "decoder-high-res";
            SDXL: transformer blocks from 36/70 of the way on, i.e. spec §4.1's start_layer 36 of 70);
        start_step, end_step: reposition steps; ref_sa_lambda: logit bonus of reference keys (0 as official);
    """

    mutual_lambda: float = field(default=0.9, metadata={"help": "irdiffusion: mutual cross-attention weight"})
    dropout: float = field(default=0.5, metadata={"help": "irdiffusion: target-side reference dropout"})
    msa_layers: object = field(default=None, metadata={"help": "irdiffusion: reposition layers (selector)"})
    start_step: int = field(default=0, metadata={"help": "first step with reference attention"})
    end_step: int | None = field(default=None, metadata={"help": "reference attention before this step"})
    ref_sa_lambda: float = field(default=0.0, metadata={"help": "irdiffusion: logit bonus of reference keys"})
    layers: object = field(default="all", metadata={"help": "layer selector"})

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

    def create_state(self, ctl, layers):
        raise AttnCtrlError(
            "IR-Diffusion needs subjects: use attnctrl.pipelines.IRDiffusionPipeline.from_pipe(pipe)"
            "(prompt, subjects=[attnctrl.pipelines.Subject(...)])"
        )

    def make_processor(self, layer, ctl, state):  # pragma: no cover - create_state raises first
        raise NotImplementedError
