"""AttentionMaps: DAAM-style cross-attention heat maps of named words, recorded by our own processors.

For every selected layer whose keys include text (UNet cross-attention, FLUX/CogVideoX joint attention), the
probabilities of image queries over text keys are computed next to the unchanged attention output, averaged over
heads, and summed per token grid in an :class:`~attnctrl.core.store.AttentionStore`. The result is the average over
heads, layers and steps (Tang et al., "What the DAAM", ACL 2023, Eq. 2-3, with a mean instead of a sum), upsampled
to the largest recorded grid.

For joint attention the image->text block is re-normalised over the text keys (a softmax over the text logits
only), so on every family each query row is a distribution over the prompt's tokens (sums to 1). The generated
image is unchanged: the output still comes from the stock kernel; probabilities are an extra small computation
(``queries x text tokens``) on the selected layers only.

Words are resolved to token indices at read-out time, from the token ids the pipeline's text encoder saw (captured
by a forward pre-hook), or from ``prompt=`` when you passed ``prompt_embeds`` yourself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.controller import Controller, Handle, MethodState, Plugin
from ..core.errors import AttnCtrlError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor
from ..core.store import AttentionStore
from ..core.tokens import find_token_indices

__all__ = ["AttentionMaps", "AttentionMapsProcessor", "AttentionMapsHandle", "heat_overlay"]

_HEAD_CHUNK_ELEMENTS = 1 << 24


class _MapsState(MethodState):
    def __init__(self, config, ctl: Controller):
        self.config = config
        self.ctl = ctl
        self.store = AttentionStore(half=config.half)
        self.token_ids: list[list[int]] | None = None
        self.tokenizer = None
        self._encoder_hook = None
        self._fresh_capture = True
        pipe = ctl.pipe
        if pipe is not None:
            encoder = getattr(pipe, ctl.family.text_encoder_attr, None)
            self.tokenizer = getattr(pipe, ctl.family.tokenizer_attr, None)
            if isinstance(encoder, torch.nn.Module):
                self._encoder_hook = encoder.register_forward_pre_hook(self._capture_ids, with_kwargs=True)

    def _capture_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            if self._fresh_capture:  # the first text-encoder call of a generation encodes the prompt
                self.token_ids = ids.detach().cpu().tolist()
                self._fresh_capture = False
        return None

    def on_run(self, ctl: Controller) -> None:
        self.store.reset()
        self._fresh_capture = True

    def recording(self) -> bool:
        c, ctl = self.config, self.ctl
        if ctl.step < c.start_step or (c.end_step is not None and ctl.step >= c.end_step):
            return False
        if ctl.family.cfg == "separate" and c.half != "both":  # FLUX true CFG: call 0 is cond, call 1 uncond
            return ctl.call_in_step == (0 if c.half == "cond" else 1)
        return True

    def close(self) -> None:
        if self._encoder_hook is not None:
            self._encoder_hook.remove()
            self._encoder_hook = None


class AttentionMapsProcessor(AttnCtrlProcessor):
    """Stock attention output plus head-averaged image->text probabilities recorded into the state's store."""

    def __init__(self, layer: LayerInfo, controller: Controller, state: _MapsState):
        super().__init__(layer, controller)
        self.state = state

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        out = self.stock_attention(query, key, value, attention_mask)
        if self.state.recording():
            if self.layer.kind == "cross":
                q_img, k_txt = query, key
            else:
                q_img, k_txt = query[:, :, text_len:], key[:, :, :text_len]
            grid = self.layer.grid(self.ctl.call.grid)
            self.state.store.record(_text_probs(q_img, k_txt), grid, cfg=self.ctl.cfg)
        return out


def _text_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged ``softmax(q k^T / sqrt(d))`` over the text keys, (B, S_q, S_txt), chunked over heads."""
    b, h, n, d = q.shape
    scale = d**-0.5
    step = max(1, _HEAD_CHUNK_ELEMENTS // max(1, b * n * k.shape[2]))
    total = None
    for i in range(0, h, step):
        s = q[:, i : i + step].float() @ k[:, i : i + step].float().transpose(-1, -2) * scale
        p = torch.softmax(s, dim=-1).sum(1)
        total = p if total is None else total + p
    return total / h


class AttentionMapsHandle(Handle):
    """Handle of :class:`AttentionMaps` with the read-out methods."""

    state: _MapsState

    def reset(self) -> None:
        """Forget what was recorded (a new generation resets automatically)."""
        self.state.store.reset()

    def token_maps(self, index: int = 0) -> torch.Tensor:
        """Mean attention of batch item ``index`` as ``(h, w, text_tokens)`` (video: ``(F, h, w, tokens)``).

        Each cell is a distribution over the text tokens (sums to 1).
        """
        maps = self.state.store.mean()
        if not -maps.shape[0] <= index < maps.shape[0]:
            raise AttnCtrlError(f"batch item {index} was not recorded; {maps.shape[0]} item(s) were")
        return maps[index]

    def word_indices(self, word: str, index: int = 0, prompt: str | None = None) -> list[int]:
        tokenizer = self.state.tokenizer
        if prompt is not None:
            if tokenizer is None:
                raise AttnCtrlError("no tokenizer known: apply AttentionMaps to a pipeline, not a bare denoiser")
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True).input_ids
        else:
            if self.state.token_ids is None or tokenizer is None:
                raise AttnCtrlError(
                    "the prompt's tokens were not seen (prompt_embeds passed, or a bare denoiser); "
                    "pass prompt='...' to heat_maps()"
                )
            n_prompts = len(self.state.token_ids)
            n_items = self.state.store.mean().shape[0] if self.state.store else n_prompts
            ids = self.state.token_ids[(index % n_items) * n_prompts // max(1, n_items)]
        return find_token_indices(tokenizer, ids, word)

    def check_prompt(self, prompt: str) -> None:
        if self.state.tokenizer is not None:
            for word in self.config.words:
                self.word_indices(word, prompt=prompt)

    def heat_maps(
        self, words=None, index: int = 0, prompt: str | None = None, size: tuple[int, int] | None = None,
        normalize: bool = True,
    ) -> dict[str, np.ndarray]:
        """One ``(h, w)`` float array per word: the summed attention on the word's tokens.

        ``normalize`` scales each map to [0, 1] by its maximum (DAAM); ``size=(H, W)`` upsamples bilinearly.
        Video models give ``(F, h, w)`` arrays.
        """
        words = self.config.words if words is None else ([words] if isinstance(words, str) else list(words))
        if not words:
            raise AttnCtrlError("no words given: AttentionMaps(words=[...]) or heat_maps(words=[...])")
        maps = self.token_maps(index)
        out = {}
        for word in words:
            idx = self.word_indices(word, index, prompt)
            m = maps[..., idx].sum(-1)
            if size is not None:
                m = torch.nn.functional.interpolate(
                    m.reshape(-1, 1, *m.shape[-2:]), size=tuple(size), mode="bilinear", align_corners=False
                ).reshape(*m.shape[:-2], *size)
            if normalize:
                m = m / m.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
            out[word] = m.cpu().numpy()
        return out

    def overlays(self, image, words=None, index: int = 0, prompt: str | None = None, alpha: float = 0.5) -> dict:
        """Heat maps of ``words`` blended over a PIL ``image`` (one PIL image per word)."""
        size = (image.height, image.width)
        return {w: heat_overlay(image, m, alpha) for w, m in self.heat_maps(words, index, prompt, size).items()}

    def artifacts(self, index: int = 0, image=None) -> dict:
        if image is None or not self.config.words or not self.state.store:
            return {}
        return {f"attn-{w}": im for w, im in self.overlays(image, index=index).items()}


@dataclass(frozen=True)
class AttentionMaps(Plugin):
    """Record cross-attention heat maps of ``words`` (DAAM-style).

    Args that matter:
        words: words (or phrases) whose heat maps :meth:`AttentionMapsHandle.heat_maps` returns by default.
        layers: layer selector; default ``"text"`` = every layer whose keys include text tokens.
    Args to tinker with:
        start_step, end_step: record steps ``[start_step, end_step)`` only (None = to the end).
        half: ``"cond"`` (default) records the prompt's branch of CFG, ``"uncond"`` the negative one, ``"both"`` all.
    """

    words: tuple[str, ...] = field(default=(), metadata={"help": "words to make heat maps of (comma-separated)"})
    layers: object = field(default="text", metadata={"help": "layer selector, e.g. 'cross', 'up', 'res>=16'"})
    start_step: int = field(default=0, metadata={"help": "first step to record"})
    end_step: int | None = field(default=None, metadata={"help": "record steps before this one (default: all)"})
    half: str = field(default="cond", metadata={"help": "CFG half to record: cond, uncond or both"})

    name = "attention-maps"
    handle_class = AttentionMapsHandle
    kinds = ("cross", "joint", "single")
    default_layers = "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.words, str):
            object.__setattr__(self, "words", tuple(w.strip() for w in self.words.split(",") if w.strip()))
        if any(not isinstance(w, str) or not w.strip() for w in self.words):
            raise AttnCtrlError(f"words must be non-empty strings, got {self.words!r}")
        if self.half not in ("cond", "uncond", "both"):
            raise AttnCtrlError(f"half must be 'cond', 'uncond' or 'both', not {self.half!r}")
        if self.start_step < 0 or (self.end_step is not None and self.end_step <= self.start_step):
            raise AttnCtrlError(f"need 0 <= start_step < end_step, got {self.start_step}, {self.end_step}")

    def create_state(self, ctl: Controller, layers: list[LayerInfo]) -> _MapsState:
        return _MapsState(self, ctl)

    def make_processor(self, layer: LayerInfo, ctl: Controller, state: _MapsState) -> AttentionMapsProcessor:
        return AttentionMapsProcessor(layer, ctl, state)



# A perceptually ordered colour ramp (dark blue -> cyan -> yellow -> red) for heat maps, interpolated in numpy.
_RAMP = np.array([[0, 0, 64], [0, 96, 255], [0, 220, 220], [255, 230, 0], [230, 30, 0]], dtype=np.float32)


def heat_overlay(image, heat: np.ndarray, alpha: float = 0.5):
    """Blend a ``[0, 1]`` heat map (same size as the image) over a PIL image with a colour ramp."""
    from PIL import Image

    heat = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
    if heat.shape != (image.height, image.width):
        raise AttnCtrlError(f"heat map {heat.shape} does not match the image {(image.height, image.width)}")
    pos = heat * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    colour = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8))
