"""CLoRA: compose several LoRAs by contrastive attention steering and masked fusion.

Meral, Simsar, Tombari, Yanardag, *Contrastive Test-Time Composition of Multiple LoRA Models for Image Generation*
(ICCV 2025, arXiv 2403.19776); official code ``gemlab-vt/clora``; spec ``clora.md``.

N prompts, each with one LoRA (prompt 0 usually the plain prompt without one), run on the same latent every step.
Cross-attention maps of the concept tokens, recorded at 1/32 of the image resolution (spec §3.2), are pulled
together across prompts when they describe the same concept and pushed apart across concepts by an NT-Xent loss
(spec §3.4); the latent moves down its gradient (Attend-and-Excite style); then each LoRA's mask is thresholded
from its own maps and the N noise predictions are fused as a mask-weighted average before CFG (spec §3.5).

This module holds the per-layer recorder, the per-call state it fills and the loss/mask maths; the orchestration is
:class:`attnctrl.pipelines.CLoRAPipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.controller import Controller, Method, MethodState
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.masks import degenerate_warning
from ..core.processor import AttnCtrlProcessor

__all__ = ["CLoRA", "CLoRAState", "CrossAttnRecorder", "nt_xent", "min_max", "lora_masks", "dilate", "erode", "record_layers",
           "fusion_mask_warning"]


def min_max(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - min) / (max - min + eps)`` over the last dim (the official code has no epsilon: NaN on flat maps)."""
    lo = x.min(-1, keepdim=True).values
    hi = x.max(-1, keepdim=True).values
    return (x - lo) / (hi - lo + eps)


def nt_xent(samples: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (InfoNCE) over ``samples`` ``(S, D)`` with class ``labels`` ``(S,)`` (spec §3.4).

    For every ordered positive pair ``(a, b)`` (same label, ``a != b``)::

        l_ab = -log( exp(s_ab / t) / (exp(s_ab / t) + sum_{n: y_n != y_a} exp(s_an / t)) ),   s = cosine similarity

    and the loss is the mean over positive pairs, as ``pytorch_metric_learning.losses.NTXentLoss``.
    """
    if samples.ndim != 2 or labels.shape != samples.shape[:1]:
        raise ValueError("samples must be (S, D) with one label per sample")
    z = F.normalize(samples, dim=-1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=samples.device)
    positive = same & ~eye
    if not torch.any(positive):
        raise AttnCtrlError("CLoRA's contrastive loss needs a positive pair: a concept named in at least two prompts")
    negative = ~same
    sim = sim - sim.max().detach()  # stability, as the library
    neg_sum = (torch.exp(sim) * negative).sum(1, keepdim=True)  # (S, 1)
    pos = torch.exp(sim)
    losses = -torch.log(pos / (pos + neg_sum) + 1e-12)
    return losses[positive].mean()


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """3 x 3 binary dilation of ``(..., h, w)`` masks: a max-pool, as the official ``dilate``."""
    return F.max_pool2d(mask[..., None, :, :], 3, 1, 1)[..., 0, :, :]


def erode(mask: torch.Tensor) -> torch.Tensor:
    """3 x 3 binary erosion: ``1 - dilate(1 - mask)``, as the official ``erode`` (outside the map counts as set)."""
    return 1 - dilate(1 - mask)


def lora_masks(maps: torch.Tensor, mask_tokens: list[list[int]], threshold: float, *, mask_erode: bool = False,
               mask_dilate: bool = False, mask_opening: bool = False, mask_closing: bool = False) -> torch.Tensor:
    """Binary fusion masks ``(N, h, w)`` from aggregated maps ``(N, h, w, T)`` (spec §3.5).

    Branch j's mask is the union over its ``mask_tokens[j]`` of ``A[..., k] > threshold * max A[..., k]`` (empty list:
    zeros), then the official optional 3 x 3 morphology in the official order: dilate, erode, opening (erode then
    dilate), closing (dilate then erode); finally branch 0 also takes every pixel no mask covers, so the masks sum
    to >= 1 everywhere.
    """
    n, h, w, _ = maps.shape
    masks = torch.zeros(n, h, w, dtype=maps.dtype, device=maps.device)
    for j, tokens in enumerate(mask_tokens):
        for k in tokens:
            a = maps[j, :, :, k]
            masks[j] = torch.maximum(masks[j], (a > threshold * a.max()).to(maps.dtype))
    official_order = ((mask_dilate, (dilate,)), (mask_erode, (erode,)), (mask_opening, (erode, dilate)),
                      (mask_closing, (dilate, erode)))
    for wanted, steps in official_order:
        for step in steps if wanted else ():
            masks = step(masks)
    masks[0] = torch.maximum(masks[0], (masks.sum(0) == 0).to(maps.dtype))
    return masks


def fusion_mask_warning(coverage: torch.Tensor, steps: int, mask_words) -> str | None:
    """The warning for degenerate fusion masks, or None.

    ``coverage`` ``(N,)``: the fraction of the latent each branch's fusion mask covered, averaged over the ``steps``
    steps that fused with masks; ``mask_words`` per branch, its mask words. A LoRA branch (not branch 0, whose mask
    also holds the background) with mask words is degenerate when its mean mask covers more than 95 % of the latent
    (its LoRA acts on the whole image: the fusion composes nothing) or less than 0.5 % (it acts nowhere);
    thresholds :data:`attnctrl.core.masks.MASK_FULL` / ``MASK_EMPTY``. Spec §3.5: the mask is ``A > alpha max A``,
    so a flat map (cross-attention that is not local) gives all ones.
    """
    if steps <= 0:
        return None
    items = [(f"branch {j + 1} ({', '.join(repr(w) for w in words)})", coverage[j], "its LoRA acts on the whole image",
              "its LoRA acts nowhere") for j, words in enumerate(mask_words) if j > 0 and words]
    return degenerate_warning(
        "CLoRA's fusion masks", f"{steps} step{'s' * (steps != 1)}", items,
        "this model's cross-attention at the recorded layers is not local: choose other layers with record_layers (a "
        "layer selector such as 'res==16' or 'up.2') or another mask_threshold")


def record_layers(ctl: Controller, selector=None) -> list[LayerInfo]:
    """The cross-attention layers CLoRA records: those at 1/32 of the image (SD 1.5 at 512 px: 16 x 16, 5 layers),
    or the nearest existing level for other autoencoders."""
    if selector is not None:
        chosen = [la for la in ctl.layers.select(selector) if la.kind == "cross"]
    else:
        pipe = ctl.pipe
        vae_factor = getattr(pipe, "vae_scale_factor", 8) if pipe is not None else 8
        want = max(1, 32 // vae_factor)
        levels = sorted({la.downsample for la in ctl.layers if la.kind == "cross"})
        best = min(levels, key=lambda d: (abs(d - want), d))
        chosen = [la for la in ctl.layers if la.kind == "cross" and la.downsample == best]
    if not chosen:
        raise AttnCtrlError(f"CLoRA: no cross-attention layer selected by {selector!r}")
    return chosen


class CLoRAState(MethodState):
    """What the recorders of one CLoRA call share: whether a branch pass is recording, the CFG layout, and the maps
    recorded during that pass (mean over the recorded layers)."""

    def __init__(self, record_uncond: bool):
        self.record_uncond = record_uncond
        self.recording = False
        self.cfg = True
        self._sum = None
        self._count = 0
        self.grid = None

    def add(self, probs: torch.Tensor, grid) -> None:
        if self.grid is None:
            self.grid = tuple(grid)
        elif tuple(grid) != self.grid:
            raise AttnCtrlError(f"CLoRA records one resolution; got {tuple(grid)} and {self.grid}")
        self._sum = probs if self._sum is None else self._sum + probs
        self._count += 1

    def take(self) -> torch.Tensor:
        """``(h, w, T)`` mean map of the last pass; resets."""
        if not self._count:
            raise AttnCtrlError("no cross-attention was recorded (is the image size a multiple of 32 px?)")
        mean = (self._sum / self._count)[0]
        out = mean.reshape(*self.grid, mean.shape[-1])
        self._sum, self._count = None, 0
        return out


class CrossAttnRecorder(AttnCtrlProcessor):
    """Stock cross-attention output plus head-averaged probabilities of the selected CFG half (differentiable)."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: CLoRAState, config: CLoRA | None = None):
        super().__init__(layer, controller)
        self.state = state

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        out = self.stock_attention(query, key, value, attention_mask)
        if self.state.recording:
            scale = query.shape[-1] ** -0.5
            probs = torch.softmax((query.float() @ key.float().transpose(-1, -2)) * scale, dim=-1).mean(1)
            b = probs.shape[0]
            if self.state.cfg:
                halves = probs.view(2, b // 2, *probs.shape[1:])
                probs = halves.mean(0) if self.state.record_uncond else halves[1]  # official parity: mean
            self.state.add(probs, self.layer.grid(self.ctl.call.grid))
        return out


@dataclass(frozen=True)
class CLoRA(Method):
    """CLoRA settings (used by :class:`attnctrl.pipelines.CLoRAPipeline`, which supplies prompts and LoRAs; not a
    plugin: ``attnctrl.apply`` refuses it).

    Args that matter:
        step_size: latent update step ``eta`` (20 as official); 0 disables the contrastive update.
        max_iter_to_alter: steps ``i < max_iter_to_alter`` update the latent (with gradients); later steps run
            without autograd.
        mask_threshold: ``alpha`` of the fusion masks (``A > alpha * max A``).
    Args to tinker with:
        iterative_steps, iterative_steps_steps: refinement steps and how many extra updates they run.
        temperature: NT-Xent temperature (0.5). apply_mask_after: masks from this step on (before: all ones).
        mask_erode, mask_dilate, mask_opening, mask_closing: the official optional 3 x 3 morphology of the fusion
            masks (all off, as official), applied in the official order (see :func:`lora_masks`).
        record_uncond: average the unconditional half into the maps (official parity; default off).
        record_layers: selector of the recorded cross-attention layers (default: 1/32 of the image).
        text_encoder_lora: each branch's prompt is encoded with its LoRA in the text encoder too (the official
            notebook; the official code's default is off). The style LoRA always is.

    Defaults, each from the spec's table (§4): ``max_iter_to_alter=25`` is the paper's (official code 30, notebook
    50); ``iterative_steps=(0, 10, 20)`` and ``mask_threshold=0.3`` as the notebook and code; latent updates are on
    whenever concepts are given (the code's ``latent_update`` defaults to off, the notebook's to on). A concept named
    in only one prompt is only a negative, as official.
    """

    step_size: float = field(default=20.0, metadata={"help": "clora: latent update step"})
    max_iter_to_alter: int = field(default=25, metadata={"help": "clora: steps with latent updates"})
    iterative_steps: tuple[int, ...] = field(default=(0, 10, 20), metadata={"help": "clora: refinement steps"})
    iterative_steps_steps: int = field(default=20, metadata={"help": "clora: extra updates per refinement step"})
    temperature: float = field(default=0.5, metadata={"help": "clora: temperature of the steering's contrastive "
                                                                  "(NT-Xent) loss; lower is stricter"})
    mask_threshold: float = field(default=0.3, metadata={"help": "clora: fusion mask threshold alpha"})
    apply_mask_after: int = field(default=0, metadata={"help": "clora: first step with fusion masks"})
    mask_erode: bool = field(default=False, metadata={"help": "clora: 3x3 erosion of the fusion masks"})
    mask_dilate: bool = field(default=False, metadata={"help": "clora: 3x3 dilation of the fusion masks"})
    mask_opening: bool = field(default=False, metadata={"help": "clora: 3x3 opening of the fusion masks"})
    mask_closing: bool = field(default=False, metadata={"help": "clora: 3x3 closing of the fusion masks"})
    record_uncond: bool = field(default=False, metadata={"help": "clora: average the uncond half into the maps"})
    record_layers: object = field(default=None, metadata={"help": "clora: recorded cross-attention layers"})
    style_lora_weight: float = field(default=1.0, metadata={"help": "clora: weight of the style LoRA"})
    text_encoder_lora: bool = field(default=True, metadata={"help": "clora: each branch's LoRA also in its text encoder"})

    name = "clora"
    families = ("sd", "sdxl")
    kinds = ("cross",)
    pipeline = "CLoRAPipeline"

    def select_layers(self, ctl: Controller) -> list[LayerInfo]:
        return record_layers(ctl, self.record_layers)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:  # inherited from Method; CLoRA's layers are the recorded ones, never ignored
            raise AttnCtrlError("CLoRA chooses the layers it records with record_layers; it has no layers option")
        if self.step_size < 0 or self.max_iter_to_alter < 0 or self.iterative_steps_steps < 0:
            raise AttnCtrlError("step_size, max_iter_to_alter and iterative_steps_steps must be >= 0")
        if self.temperature <= 0:
            raise AttnCtrlError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.mask_threshold <= 1:
            raise AttnCtrlError(f"mask_threshold must lie in [0, 1], got {self.mask_threshold}")

    def morphology(self) -> dict[str, bool]:
        """The fusion-mask morphology switches, as :func:`lora_masks` takes them."""
        return {name: getattr(self, name) for name in ("mask_erode", "mask_dilate", "mask_opening", "mask_closing")}
