"""DiTCtrl: multi-prompt long video on CogVideoX by KV-sharing between adjacent segments (and mask guidance).

Cai et al., *DiTCtrl: Exploring Attention Control in Multi-Modal Diffusion Transformer for Tuning-Free Multi-Prompt
Longer Video Generation* (CVPR 2025); official code ``TencentARC/DiTCtrl`` (SwissArmyTransformer); spec
``ditctrl.md``. This is the first diffusers version.

Each denoiser call of a segment *pair* has the batch ``[uncond source, uncond target, cond source, cond target]``.
In the KV-sharing layers and steps the target's queries (text and video rows) read the source's keys and values of
the whole joint sequence ``[text | video]`` (spec §5): ``O_t = softmax(Q_t K_s^T / sqrt(d)) V_s``; the source keeps
its own attention. The mask-guided variant (spec §6) splits the source's video keys into foreground and background
by a threshold on the source's video->text attention of the subject word, and each target video query takes the
foreground result where the target's own map says foreground: ``O_t = M O_fg + (1 - M) O_bg``. Both come from one
pass over three key groups (text, source fg, source bg) merged by log-sum-exp, never two dense-mask attentions;
the video->text maps are only the subject-word columns, from the row log-sum-exp (``p = exp(s - lse)``), summed
over the layers of the current forward (mask at layer ``l`` = mean over layers ``0..l``, as the official
controller).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.controller import Controller, Method, MethodState
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor
from ..kernels.attention import attention_with_lse, merge_attention

__all__ = ["DiTCtrl", "DiTCtrlAttnProcessor", "DiTCtrlState"]


class DiTCtrlState(MethodState):
    """Per-call state: which pass is running, the sharing window, and the subject-map accumulators."""

    def __init__(self, steps: range, layers: set[str], mask_guided: bool, threshold: float):
        self.steps = steps
        self.layers = layers
        self.mask_guided = mask_guided
        self.threshold = threshold
        self.pair = False  # True while a [src, tgt] x CFG pair pass runs
        self.step = 0
        self.src_tokens: list[int] = []
        self.tgt_tokens: list[int] = []
        self.maps = None  # running sum (2, n_video) of the subject maps of [cond source, cond target]
        self.layers_seen = 0

    def begin_pass(self, pair: bool, src_tokens=(), tgt_tokens=()) -> None:
        self.pair = pair
        self.src_tokens, self.tgt_tokens = list(src_tokens), list(tgt_tokens)
        self.maps = None
        self.layers_seen = 0

    def sharing(self, layer: str) -> bool:
        return self.pair and self.step in self.steps and layer in self.layers


class DiTCtrlAttnProcessor(AttnCtrlProcessor):
    """KV-sharing / mask-guided KV-sharing for one CogVideoX attention layer."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: DiTCtrlState, config: DiTCtrl | None = None):
        super().__init__(layer, controller)
        self.state = state

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        state = self.state
        record = state.pair and state.mask_guided and query.shape[0] == 4
        if record:
            out, lse = attention_with_lse(query, key, value)
            self._record(query, key, lse, text_len)
        else:
            out = self.stock_attention(query, key, value, attention_mask)
        if not state.sharing(self.layer.name):
            return out
        if query.shape[0] != 4:
            raise AttnCtrlError(f"a DiTCtrl pair pass has 4 rows [uc_s, uc_t, c_s, c_t], got {query.shape[0]}")
        out = out.clone()
        src, tgt = [0, 2], [1, 3]
        q_t, k_s, v_s = query[tgt], key[src], value[src]
        if not state.mask_guided:
            out[tgt] = self.stock_attention(q_t, k_s, v_s)  # spec §5: target queries read the source's K/V
            return out
        out[tgt] = self._mask_guided(q_t, k_s, v_s, text_len).to(out.dtype)
        return out

    def _record(self, query, key, lse, text_len):
        """Add this layer's head-mean video->subject-token probabilities of [c_s, c_t] (LSE columns only)."""
        state = self.state
        scale = query.shape[-1] ** -0.5
        maps = []
        for row, tokens in ((2, state.src_tokens), (3, state.tgt_tokens)):
            if not tokens:
                maps.append(torch.zeros(query.shape[2] - text_len, device=query.device))
                continue
            q = query[row, :, text_len:].float()  # (h, n_video, d)
            k = key[row, :, tokens].float()  # (h, T_sel, d)
            p = torch.exp(q @ k.transpose(-1, -2) * scale - lse[row, :, text_len:, None])  # (h, n_video, T_sel)
            maps.append(p.sum(-1).mean(0))
        maps = torch.stack(maps)
        state.maps = maps if state.maps is None else state.maps + maps
        state.layers_seen += 1

    def _masks(self, text_len):
        """Foreground of the source video keys and of the target video queries (spec §6.1-6.2)."""
        state = self.state
        grid = self.ctl.call.grid  # (F, h, w) of the video tokens
        maps = (state.maps / max(1, state.layers_seen)).view(2, grid[0], -1)
        lo = maps.amin(-1, keepdim=True)
        hi = maps.amax(-1, keepdim=True)
        norm = (maps - lo) / (hi - lo + 1e-6)  # per-frame min-max
        fg = (norm >= state.threshold).flatten(1)
        return fg[0], fg[1]

    def _mask_guided(self, q_t, k_s, v_s, text_len):
        fg_src, fg_tgt = self._masks(text_len)
        fg_idx = torch.nonzero(fg_src).flatten() + text_len
        bg_idx = torch.nonzero(~fg_src).flatten() + text_len
        parts_text = attention_with_lse(q_t, k_s[:, :, :text_len], v_s[:, :, :text_len])
        groups = {}
        for name, idx in (("fg", fg_idx), ("bg", bg_idx)):
            if idx.numel():
                groups[name] = attention_with_lse(q_t, k_s.index_select(2, idx), v_s.index_select(2, idx))
        o_fg, _ = merge_attention([parts_text] + ([groups["fg"]] if "fg" in groups else []))
        o_bg, _ = merge_attention([parts_text] + ([groups["bg"]] if "bg" in groups else []))
        o_all, _ = merge_attention([parts_text] + list(groups.values()))
        m = fg_tgt.to(o_fg.dtype).view(1, 1, -1, 1)
        video = m * o_fg[:, :, text_len:] + (1 - m) * o_bg[:, :, text_len:]
        return torch.cat([o_all[:, :, :text_len], video], dim=2)  # text rows see every key in both branches


@dataclass(frozen=True)
class DiTCtrl(Method):
    """DiTCtrl settings (used by :class:`attnctrl.pipelines.DiTCtrlPipeline`, which supplies the prompts).

    Args that matter:
        num_transition_blocks: interpolated-prompt segments between two prompts (2; the paper used 1).
        overlap: latent frames shared by adjacent segments; None = the official 9 of CogVideoX's 13-frame segments
            and the same share of shorter ones (:meth:`overlap_for`; the paper used 6).
        kv_steps: ``(start, end)`` steps with KV-sharing; None = the official (2, 25) of 50 steps and the same
            share of other step counts (:meth:`step_range`).
        kv_layers: ``(start, end)`` transformer blocks with KV-sharing; None = the official (25, 30) on 30-layer
            models (2B), the last sixth of the blocks otherwise (5B: (35, 42), our documented default).
        mask_guided: the mask-guided variant; needs ``subject_words``.
    Args to tinker with:
        longer_mid_segment: extra segments for middle prompts; mask_threshold (0.3); dedupe (compute each segment
        once per step outside the sharing window; identical results).
    """

    num_transition_blocks: int = field(default=2, metadata={"help": "ditctrl: transition segments per prompt pair"})
    overlap: int | None = field(default=None, metadata={
        "help": "ditctrl: overlapping latent frames of adjacent segments (default: 9 of 13, the same share of others)"})
    longer_mid_segment: int = field(default=0, metadata={"help": "ditctrl: extra segments for middle prompts"})
    kv_steps: tuple[int, int] | None = field(default=None, metadata={
        "help": "ditctrl: KV-sharing steps start,end (default: 2,25 of 50 steps, the same share of others)"})
    kv_layers: tuple[int, int] | None = field(default=None, metadata={"help": "ditctrl: KV-sharing blocks start,end"})
    mask_guided: bool = field(default=False, metadata={"help": "ditctrl: mask-guided KV-sharing"})
    subject_words: tuple[str, ...] = field(default=(), metadata={"help": "ditctrl: subject word(s) per prompt"})
    mask_threshold: float = field(default=0.3, metadata={"help": "ditctrl: foreground threshold"})
    dedupe: bool = field(default=True, metadata={"help": "ditctrl: one pass per segment outside the window"})
    layers: object = field(default="all", metadata={"help": "layer selector"})

    name = "ditctrl"
    families = ("cogvideox",)
    kinds = ("joint",)
    pipeline = "DiTCtrlPipeline"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.subject_words, str):
            object.__setattr__(self, "subject_words",
                               tuple(w.strip() for w in self.subject_words.split(",") if w.strip()))
        if self.num_transition_blocks < 0 or self.longer_mid_segment < 0 or (self.overlap or 0) < 0:
            raise AttnCtrlError("num_transition_blocks, longer_mid_segment and overlap must be >= 0")
        for name in ("kv_steps", "kv_layers"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or value[0] < 0 or value[1] < value[0]):
                raise AttnCtrlError(f"{name} must be (start, end) with 0 <= start <= end, got {value!r}")
        if not 0 <= self.mask_threshold <= 1.5:
            raise AttnCtrlError(f"mask_threshold must lie in [0, 1.5], got {self.mask_threshold}")
        if self.mask_guided and not self.subject_words:
            raise AttnCtrlError("mask_guided needs subject_words (the subject's word in the prompts)")

    def words_for(self, n: int) -> list[str]:
        """``subject_words`` for ``n`` prompts (one word serves every prompt); [] when none are given."""
        words = list(self.subject_words)
        if len(words) == 1:
            words = words * n
        if words and len(words) != n:
            raise AttnCtrlError(f"{len(self.subject_words)} subject_words given for {n} prompts; give one, or one "
                                f"per prompt")
        return words

    def overlap_for(self, segment: int) -> int:
        """Latent frames shared by adjacent segments of ``segment`` latent frames: ``overlap``, or the official 9 of
        13 (the 49-frame segments of CogVideoX) scaled to ``segment`` (3 of 5 for 17 frames), below the segment."""
        if self.overlap is not None:
            return self.overlap
        return min(segment - 1, max(1, round(9 * segment / 13)))

    def step_range(self, num_steps: int) -> range:
        """The steps with KV-sharing: ``kv_steps``, or the official 2..25 of 50 scaled to ``num_steps``."""
        if self.kv_steps is not None:
            return range(*self.kv_steps)
        return range(round(2 * num_steps / 50), round(25 * num_steps / 50))

    def layer_range(self, num_blocks: int) -> tuple[int, int]:
        if self.kv_layers is not None:
            return tuple(self.kv_layers)
        if num_blocks == 30:
            return (25, 30)
        return (num_blocks - max(1, num_blocks // 6), num_blocks)
