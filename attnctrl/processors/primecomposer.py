"""PrimeComposer: training-free image composition with a correlation diffuser, attention steering and
region-constrained cross-attention.

Wang, Zhang, Zheng, Jin, *PrimeComposer: Faster Progressively Combined Diffusion for Image Composition with
Attention Steering* (ACM MM 2024, arXiv 2403.05053); official code ``CodeGoat24/PrimeComposer`` (an ldm fork on
SD 2.1); spec ``primecomposer.md``. This is the first diffusers version.

Per self-attention layer (spec §6.1-6.2), with the object tokens ``O`` (the reference mask inside the location box,
at the layer's grid; the whole box if the mask vanishes there):

* **Correlation diffuser (CD) pass**: on the reference canvas ``R`` whose object pixels carry the synthesised
  subject, run as ``[R, R]`` with ``[uncond, cond]`` text, the queries of all tokens attend only to the object tokens
  of the unconditional item (pseudo cross-attention, official: context ``x[2]``): logits ``S = Q K_O^T / sqrt(d)``
  (``N x m``) are kept for the conditional half; the output ``softmax(S) V_O`` feeds the rest of the CD pass. Where
  the object mask vanishes on a layer's grid the box's tokens are the context and that layer is not steered
  (official).
* **Generator pass, attention steering** (conditional half, steps before ``tau_a``): every query's logits to the
  object keys are replaced by ``S`` (column write) and the object queries' logits by ``S^T`` (row write, applied
  second). Computed without an ``N x N`` map: the non-object queries merge, by log-sum-exp, stock attention over the
  non-object keys with ``softmax(S)`` over the object values; the object queries use ``softmax(S^T)`` directly.

Region-constrained cross-attention (RCA, spec §6.3; dead code in the official release, wired here and on whenever
``rca_words`` are given): in the conditional half, the marked words get probability exactly 0 outside the object.

Only ``S`` (``heads x N x m`` per layer) is kept between the CD and generator passes of a step; nothing is stored
across steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.controller import Controller, Method, MethodState
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor
from ..kernels.attention import attention_with_lse, grouped_attention, merge_attention

__all__ = ["PrimeComposer", "PrimeComposerAttnProcessor", "PrimeState", "DOMAIN_DEFAULTS"]

#: per-domain defaults (spec §2: same_run.sh; cross = the argparse defaults with the sampler's tau_c 0.2)
DOMAIN_DEFAULTS = {
    "same": {"guidance_scale": 2.0, "tau_a": 0.3, "tau_b": 0.8, "tau_c": 0.1},
    "cross": {"guidance_scale": 2.5, "tau_a": 0.4, "tau_b": 0.8, "tau_c": 0.2},
}


class PrimeState(MethodState):
    """What the processors of one composition share: mode, object tokens per grid, logits of the current step."""

    def __init__(self, object_mask: torch.Tensor, box: tuple[int, int, int, int], rca_tokens: list[int]):
        self.object_mask = object_mask  # (h, w) bool on the latent grid, inside the box
        self.box = box  # (y0, x0, y1, x1) on the latent grid, end-exclusive
        self.rca_tokens = rca_tokens
        self.mode = "plain"  # "cd", "gen" or "plain"
        self.inject = False
        self.logits: dict[str, torch.Tensor] = {}
        self._objects: dict = {}

    def objects(self, grid) -> tuple[torch.Tensor, bool]:
        """Flat indices of the object tokens on a layer grid (strided like the official code) and whether the mask
        survives there; where it vanishes, the box's tokens (the CD's context then; no steering, as official)."""
        grid = tuple(grid)
        if grid not in self._objects:
            h, w = self.object_mask.shape
            fy, fx = max(1, h // grid[0]), max(1, w // grid[1])
            mask = self.object_mask[::fy, ::fx][: grid[0], : grid[1]]
            found = bool(torch.any(mask))
            if not found:
                y0, x0, y1, x1 = self.box
                mask = torch.zeros(grid, dtype=torch.bool)
                mask[y0 // fy : max(y0 // fy + 1, -(-y1 // fy)), x0 // fx : max(x0 // fx + 1, -(-x1 // fx))] = True
            self._objects[grid] = (torch.nonzero(mask.flatten()).flatten(), found)
        return self._objects[grid]


class PrimeComposerAttnProcessor(AttnCtrlProcessor):
    """CD pseudo cross-attention, attention steering and RCA (see the module docstring)."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: PrimeState, config: PrimeComposer | None = None):
        super().__init__(layer, controller)
        self.state = state

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        state = self.state
        grid = self.layer.grid(self.ctl.call.grid)
        if self.layer.kind == "cross":
            out = self.stock_attention(query, key, value, attention_mask)
            if state.mode == "gen" and state.rca_tokens:
                out = self._rca(query, key, value, out, grid)
            return out
        if state.mode == "cd":  # batch [canvas (uncond text), canvas (cond text)]; keys from the first, as official
            objects = state.objects(grid)[0].to(query.device)
            k_o, v_o = key[:1].index_select(2, objects), value[:1].index_select(2, objects)
            scale = query.shape[-1] ** -0.5
            logits = (query.float() @ k_o.float().transpose(-1, -2)) * scale  # (2, h, N, m)
            state.logits[self.layer.name] = logits[-1:]  # the conditional item
            return (torch.softmax(logits, -1) @ v_o.float()).to(query.dtype)
        out = self.stock_attention(query, key, value, attention_mask)
        if state.mode == "gen" and state.inject and self.layer.name in state.logits and state.objects(grid)[1]:
            out = self._steer(query, key, value, out, grid)
        return out

    def _steer(self, query, key, value, out, grid):
        """Cond half: object columns from ``S``, object rows from ``S^T`` (spec §6.2), no ``N x N`` map."""
        s = self.state.logits[self.layer.name][0].to(query.device)  # (h, N, m)
        objects = self.state.objects(grid)[0].to(query.device)
        n = query.shape[2]
        c = query.shape[0] - 1  # the conditional row of the CFG batch [uncond, cond]
        q, k, v = query[c : c + 1], key[c : c + 1], value[c : c + 1]
        # non-object queries: own logits on non-object keys (+) S on object keys, merged by log-sum-exp
        key_bias = torch.zeros(n, device=query.device, dtype=query.dtype)
        key_bias[objects] = float("-inf")
        own = attention_with_lse(q, k, v, key_bias.view(1, 1, 1, n))
        v_o = v.index_select(2, objects).float()
        lse_s = torch.logsumexp(s, -1)  # (h, N)
        part_s = ((torch.softmax(s, -1) @ v_o[0]).unsqueeze(0).to(q.dtype), lse_s.unsqueeze(0))
        steered, _ = merge_attention([own, part_s])
        # object queries: row write S^T (their logits over every key come from the CD pass)
        rows = torch.softmax(s.transpose(-1, -2), -1) @ v[0].float()  # (h, m, d)
        steered = steered.clone()
        steered[0, :, objects] = rows.to(steered.dtype)
        out = out.clone()
        out[c] = steered[0].to(out.dtype)
        return out

    def _rca(self, query, key, value, out, grid):
        """Cond half: the marked words get probability exactly 0 outside the object (spec §6.3)."""
        objects, found = self.state.objects(grid)
        n = query.shape[2]
        inside = torch.zeros(n, dtype=torch.long, device=query.device)
        if found:  # group 1: object queries (no constraint); group 0: the rest (all of them if the object vanishes)
            inside[objects.to(query.device)] = 1
        bias = torch.zeros(2, key.shape[2], device=query.device, dtype=query.dtype)
        bias[0, self.state.rca_tokens] = float("-inf")
        c = query.shape[0] - 1
        out = out.clone()
        out[c : c + 1] = grouped_attention(query[c : c + 1], key[c : c + 1], value[c : c + 1], inside, bias)
        return out


@dataclass(frozen=True)
class PrimeComposer(Method):
    """PrimeComposer settings (used by :class:`attnctrl.pipelines.PrimeComposerPipeline`).

    Args that matter:
        domain: "same" (photo into photo: the object is pasted into the background first) or "cross" (a painting,
            sketch or cartoon background); sets the defaults of the taus and the guidance (spec §2).
        tau_a: fraction of steps with the correlation diffuser and attention steering.
        tau_b: fraction of steps blended with the inverted background outside the box (the rest runs free; see
            ``paste_back``).
        tau_c: fraction of steps whose object pixels are frozen (the official quirk, see the pipeline docstring).
        rca_words: words of the prompt confined to the object region (RCA); none = RCA off.
    """

    domain: str = field(default="cross", metadata={"help": "primecomposer: same or cross"})
    tau_a: float | None = field(default=None, metadata={"help": "primecomposer: injection fraction"})
    tau_b: float | None = field(default=None, metadata={"help": "primecomposer: background blending fraction"})
    tau_c: float | None = field(default=None, metadata={"help": "primecomposer: object freezing fraction"})
    rca_words: tuple[str, ...] = field(default=(), metadata={"help": "primecomposer: words confined to the object"})
    paste_back: bool = field(default=True, metadata={"help": "primecomposer: exact background outside the box"})
    exceptional_token: int = field(default=7788, metadata={"help": "primecomposer: token of the inversion prompt"})
    layers: object = field(default="all", metadata={"help": "layer selector"})

    name = "primecomposer"
    families = ("sd", "sdxl")
    kinds = ("self", "cross")
    pipeline = "PrimeComposerPipeline"

    def __post_init__(self) -> None:
        super().__post_init__()
        words = self.rca_words or ()
        if isinstance(words, str):
            words = [w.strip() for w in words.split(",") if w.strip()]
        object.__setattr__(self, "rca_words", tuple(words))
        if self.domain not in DOMAIN_DEFAULTS:
            raise AttnCtrlError(f"domain must be 'same' or 'cross', not {self.domain!r}")
        for name in ("tau_a", "tau_b", "tau_c"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise AttnCtrlError(f"{name} must lie in [0, 1], got {value}")
        if self.exceptional_token < 0:
            raise AttnCtrlError(f"exceptional_token is a token id (>= 0), got {self.exceptional_token}")

    def resolved(self) -> dict:
        """The taus and guidance after the per-domain defaults."""
        out = dict(DOMAIN_DEFAULTS[self.domain])
        for name in ("tau_a", "tau_b", "tau_c"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out
