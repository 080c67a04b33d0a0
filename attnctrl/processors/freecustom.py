"""FreeCustom: multi-reference self-attention (MRSA) with weighted concept masks.

Ding et al., *FreeCustom: Tuning-Free Customized Image Generation for Multi-Concept Composition* (CVPR 2024);
official code ``aim-uofa/FreeCustom``; spec ``freecustom.md``.

In the selected decoder self-attention layers (default ``"decoder-high-res"``: SD 1.5's blocks 10-15, the last two
decoder resolutions; the equivalent decoder levels on SD 2.1 and SDXL) and steps ``[start_step, end_step)``, the
target's queries attend to one softmax over ``[own keys; ref_1 keys; ...; ref_N keys]`` (spec §3.5)::

    S = Q_tgt [K_tgt; K_1; ...; K_N]^T / sqrt(d),   S[:, block_i] += w_i inside mask_i, -inf outside,
    O = softmax(S) [V_tgt; V_1; ...; V_N]

computed as SDPA over the concatenated keys with a *key-only* bias (no ``queries x keys`` bias, no probability
tensor). ``mask_mode="multiply"`` is the paper's form ``softmax(M_w * QK^T)``: reference logits are scaled by
``w_i`` inside the mask and become 0 (not ``-inf``) outside. The unconditional target row mixes
``(1 - sf) MRSA + sf SA`` (``style_fidelity``; 1 = plain self-attention, so CFG pushes away from the reference-free
prediction). Reference rows, cross-attention and every other layer are untouched (bit for bit).

Decisions on the official quirks (spec §5): masks binarise at > 127 (the official exact-255 rule is
``Reference(mask_threshold=254)``); references keep their aspect ratio (``fit="stretch"`` is the official torch-nearest
stretch); reference noise is seeded; the additive code form is the default. Masks go to 128 x 128 and then to each
layer with ``nearest``, as the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.controller import Controller, Method
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor
from ..kernels.attention import KVBlock, multi_block_attention
from .reference import ReferenceState

__all__ = ["FreeCustom", "MRSAAttnProcessor"]


class MRSAAttnProcessor(AttnCtrlProcessor):
    """FreeCustom's multi-reference self-attention for one ``attn1`` layer (see the module docstring)."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: ReferenceState, config: FreeCustom):
        super().__init__(layer, controller)
        self.state = state
        self.config = config
        self.now = False  # MRSA at this step (set before each step)

    def on_step(self, ctl) -> None:
        c = self.config
        self.now = self.state.n > 0 and ctl.step >= c.start_step and (c.end_step is None or ctl.step < c.end_step)

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        out = self.stock_attention(query, key, value, attention_mask)
        if not self.now:
            return out
        cfg = self.ctl.cfg
        targets, refs = self.state.rows(query.shape[0], cfg)
        grid = self.layer.grid(self.ctl.call.grid)
        weights = self.config.weights(self.state.n)
        masks = self.state.grid_masks(grid).to(query.device)
        out = out.clone()
        for half, t_row in enumerate(targets):
            blocks = [KVBlock(key[t_row : t_row + 1], value[t_row : t_row + 1])]
            for i, rows in enumerate(refs):
                r = rows[half]
                m = masks[i]
                if self.config.mask_mode == "add":
                    bias = torch.where(m, torch.tensor(float(weights[i])), torch.tensor(float("-inf")))
                    blocks.append(KVBlock(key[r : r + 1], value[r : r + 1], bias=bias.view(1, 1, 1, -1)))
                else:
                    blocks.append(KVBlock(key[r : r + 1], value[r : r + 1], key_weight=(m.float() * weights[i])))
            mrsa = multi_block_attention(query[t_row : t_row + 1], blocks)
            uncond = cfg and half == 0
            sf = self.config.style_fidelity
            if uncond and sf == 1:
                continue  # plain self-attention, bit for bit
            if uncond:
                mrsa = (1 - sf) * mrsa + sf * out[t_row : t_row + 1]
            out[t_row : t_row + 1] = mrsa.to(out.dtype)
        return out


def per_reference(mask_weights, n: int) -> tuple[float, ...]:
    """One mask weight per reference (a single value is shared); raises unless one or ``n`` values are given."""
    w = mask_weights if isinstance(mask_weights, tuple) else (mask_weights,)
    if len(w) == 1:
        return w * n
    if len(w) != n:
        raise AttnCtrlError(f"{len(w)} mask weights given for {n} reference(s); give one, or one per reference")
    return w


@dataclass(frozen=True)
class FreeCustom(Method):
    """FreeCustom settings (used by :class:`attnctrl.pipelines.FreeCustomPipeline`, which supplies the references;
    not a plugin: ``attnctrl.apply`` refuses it).

    Args that matter:
        mask_weights: bonus ``w_i`` of each reference's in-mask keys (one number for all, or one per reference);
            the paper finds 2-3 works across cases.
        style_fidelity: ``sf`` in [0, 1]: the unconditional target row is ``(1 - sf) MRSA + sf SA``.
    Args to tinker with:
        layers: layer selector (default ``"decoder-high-res"``); start_step, end_step: MRSA steps.
        mask_mode: ``"add"`` (official code, default) or ``"multiply"`` (paper formula).
        use_null_ref_prompts: encode the references with empty prompts instead of theirs.
    """

    mask_weights: float | tuple[float, ...] = field(default=3.0, metadata={
        "help": "freecustom/magicface: bonus of in-mask reference keys (one value or one per reference)"})
    style_fidelity: float = field(default=1.0, metadata={"help": "freecustom: uncond row = (1-sf) MRSA + sf SA"})
    layers: object = field(default="decoder-high-res", metadata={"help": "layer selector"})
    start_step: int = field(default=0, metadata={"help": "first step with reference attention"})
    end_step: int | None = field(default=None, metadata={"help": "reference attention before this step"})
    use_null_ref_prompts: bool = field(default=False, metadata={"help": "reference prompts replaced by ''"})
    mask_mode: str = field(default="add", metadata={"help": "freecustom: 'add' (code) or 'multiply' (paper)"})

    name = "freecustom"
    families = ("sd", "sdxl")
    kinds = ("self",)
    pipeline = "FreeCustomPipeline"

    def __post_init__(self) -> None:
        super().__post_init__()
        weights = self.mask_weights if isinstance(self.mask_weights, tuple) else (self.mask_weights,)
        if not weights or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
            raise AttnCtrlError(f"mask_weights must be non-negative numbers, got {self.mask_weights!r}")
        if not 0 <= self.style_fidelity <= 1:
            raise AttnCtrlError(f"style_fidelity must lie in [0, 1], got {self.style_fidelity}")
        if self.start_step < 0 or (self.end_step is not None and self.end_step <= self.start_step):
            raise AttnCtrlError(f"need 0 <= start_step < end_step, got {self.start_step}, {self.end_step}")
        if self.mask_mode not in ("add", "multiply"):
            raise AttnCtrlError(f"mask_mode must be 'add' or 'multiply', not {self.mask_mode!r}")

    def weights(self, n: int) -> tuple[float, ...]:
        return per_reference(self.mask_weights, n)
