"""The two attention hooks of toyworld training, installed through attnctrl's own controller (exact undo).

* :func:`record_cross_attention` puts CLoRA's recorder (:class:`attnctrl.processors.clora.CrossAttnRecorder`: the
  stock output, plus head-averaged probabilities that keep their gradient) on every cross-attention layer (16x16
  down to the 2x2 mid block); the grounding loss (:func:`.losses.grounding_terms`) reads its maps.
* :func:`reference_attention` puts :class:`ReferenceAttnProcessor` on the decoder's 16x16 and 8x8 self-attention
  layers (``"decoder-high-res"``, the layers of FreeCustom, MagicFace and IR-Diffusion): FreeCustom's MRSA (spec
  §3.5) for a training batch ``[targets; references]``.

Why reference training has its own processor and not :class:`attnctrl.processors.freecustom.MRSAAttnProcessor`:
the math is the same (a target's queries take one softmax over its own keys and each reference's keys, with an
additive bonus inside the reference's mask and ``-inf`` outside; both build it with
:func:`attnctrl.kernels.attention.multi_block_attention`), but FreeCustom's processor reads a generation run: one
target per CFG half, the same references and one bonus per reference for every target, masks from the pipeline's
reference run. Training needs up to two references per target that differ across the 32 targets of a batch, a
bonus drawn per (target, reference) and no CFG halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.controller import Handle, MethodState, Plugin, apply
from ...core.processor import AttnCtrlProcessor
from ...kernels.attention import KVBlock, multi_block_attention
from ...processors.clora import CrossAttnRecorder

__all__ = ["CrossAttentionMaps", "record_cross_attention", "ReferencePlan", "ReferenceAttnProcessor",
           "reference_attention"]


class CrossAttentionMaps(MethodState):
    """The recorder's state: while ``maps`` is a list, each cross-attention call appends its head-averaged
    probabilities ``(batch, queries, tokens)`` to it (every batch row: a training batch has no CFG halves)."""

    cfg = False
    record_uncond = False

    def __init__(self):
        self.maps: list[torch.Tensor] | None = None

    @property
    def recording(self) -> bool:
        return self.maps is not None

    def add(self, probs: torch.Tensor, grid) -> None:
        self.maps.append(probs)


@dataclass(frozen=True)
class _RecordCrossAttention(Plugin):
    name = "toyworld-cross-attention-maps"
    families = ("sd",)
    kinds = ("cross",)

    def create_state(self, ctl, layers) -> CrossAttentionMaps:
        return CrossAttentionMaps()

    def make_processor(self, layer, ctl, state) -> CrossAttnRecorder:
        return CrossAttnRecorder(layer, ctl, state)


def record_cross_attention(unet) -> Handle:
    """Record every cross-attention layer of ``unet``: set ``handle.state.maps = []`` before a forward pass and read
    it after; ``handle.remove()`` puts the previous processors back."""
    return apply(unet, _RecordCrossAttention())


class ReferencePlan(MethodState):
    """The references of the current batch, or None (then every layer is the stock attention).

    ``plan`` (from :meth:`.data.ScenePool.references`): ``slots`` ``(B, S)`` long, each target's references as
    offsets into the reference rows that follow the ``B`` targets in the batch (-1 = none); ``weights`` ``(B, S)``
    the in-mask bonus of each; ``masks`` ``(R, 16, 16)`` each reference object's coverage (> 0.5 is inside).
    """

    def __init__(self):
        self.plan: dict | None = None


class ReferenceAttnProcessor(AttnCtrlProcessor):
    """MRSA for a batch ``[targets; references]`` (see the module docstring). Target ``b`` attends to one softmax
    over ``[its own keys; the keys of reference slots[b, 0]; ... slots[b, S-1]]``, each reference's keys biased by
    ``weights[b, s]`` inside its mask and ``-inf`` outside (an empty slot: ``-inf`` everywhere, i.e. no reference);
    reference rows attend to themselves only, as at inference. No plan: the stock attention, bit for bit."""

    def __init__(self, layer, controller, state: ReferencePlan):
        super().__init__(layer, controller)
        self.state = state

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        plan = self.state.plan
        if plan is None:
            return self.stock_attention(query, key, value, attention_mask)
        slots, weights, masks = plan["slots"], plan["weights"], plan["masks"]
        n = slots.shape[0]
        grid = self.layer.grid(self.ctl.call.grid)
        inside = F.interpolate(masks[:, None], size=grid, mode="nearest").flatten(1) > 0.5  # (R, tokens)
        blocks = [KVBlock(key[:n], value[:n])]
        for s in range(slots.shape[1]):
            slot = slots[:, s]
            rows = n + slot.clamp(min=0)
            allowed = inside[slot.clamp(min=0)] & (slot >= 0)[:, None]  # (B, tokens)
            bias = torch.where(allowed, weights[:, s, None], float("-inf"))
            blocks.append(KVBlock(key[rows], value[rows], bias=bias[:, None, None]))
        return torch.cat([multi_block_attention(query[:n], blocks),
                          self.stock_attention(query[n:], key[n:], value[n:])])


@dataclass(frozen=True)
class _ReferenceTraining(Plugin):
    name = "toyworld-reference-training"
    families = ("sd",)
    kinds = ("self",)
    default_layers = "decoder-high-res"

    def create_state(self, ctl, layers) -> ReferencePlan:
        return ReferencePlan()

    def make_processor(self, layer, ctl, state) -> ReferenceAttnProcessor:
        return ReferenceAttnProcessor(layer, ctl, state)


def reference_attention(unet) -> Handle:
    """Install :class:`ReferenceAttnProcessor` on ``unet``'s decoder-high-res self-attention layers; set
    ``handle.state.plan`` for a batch with references; ``handle.remove()`` puts the previous processors back."""
    return apply(unet, _ReferenceTraining())
