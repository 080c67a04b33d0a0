"""CLEAR: convolution-like linearised attention for FLUX (Liu et al., "CLEAR: Conv-Like Linearization Revs
Pre-Trained Diffusion Transformers Up", NeurIPS 2025; spec ``clear.md``).

Every joint text-image attention of the FLUX transformer (double- and single-stream blocks) is restricted so that
image queries see the text keys plus the image keys strictly inside a disc of radius ``r`` tokens around their own
2-D position; text queries keep full attention (spec §2). With ``down_factor = f > 1`` the image keys and values are
also pooled over ``f x f`` cells with a learnable weight grid ``spatial_weight`` (initialised to ``1/f^2``, i.e.
average pooling, of post-RoPE keys as in the official code) and appended; image queries see all pooled tokens, text
queries none (spec §3). The kernels live in :mod:`attnctrl.kernels.local_attention`.

Decisions on the official code's quirks (spec §6, §9):
* block masks are keyed on (H, W, text length, r, f, device) and built lazily, never kept in module globals (the
  official ``lru_cache`` + globals returned a stale mask after a resolution change);
* the text length comes from the layer call (double-stream) or the controller (single-stream), never hard-coded 512;
* when the disc covers the whole image, ``backend="auto"`` runs the stock kernel: exactly the stock processor;
* released weights (full replacement projections, spec §4) are loaded on apply and the originals restored on
  remove; without weights CLEAR is training-free, which the paper does not evaluate: expect a quality loss,
  worst at small radii (a one-time warning says so).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..core.controller import Controller, MethodState, Plugin
from ..core.errors import AttnCtrlError, UnsupportedModelError
from ..core.layers import LayerInfo
from ..core.processor import AttnCtrlProcessor
from ..kernels.local_attention import BACKENDS, LocalSpec, choose_backend, local_attention, pool_keys

__all__ = ["CLEAR", "CLEARAttnProcessor", "clear_weight_keys", "load_clear_weights"]

logger = logging.getLogger("attnctrl")
_TRAIN_LENGTH = 64 * 64 + 512  # FLUX's training sequence length, for proportional attention (spec §5)
_WARNED = False
_PROJ = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.(to_q|to_k|to_v|to_out\.0)\."
                   r"(weight|bias)$")


class CLEARAttnProcessor(AttnCtrlProcessor, torch.nn.Module):
    """Local-window attention for one FLUX attention layer (an ``nn.Module`` so ``spatial_weight`` is a parameter
    stored under ``<layer>.processor.spatial_weight``, the official key)."""

    def __init__(self, layer: LayerInfo, controller: Controller | None, config: CLEAR):
        torch.nn.Module.__init__(self)
        AttnCtrlProcessor.__init__(self, layer, controller)
        self.radius = float(config.radius)
        self.backend = config.backend
        self.proportional = config.proportional_attention
        f = int(config.down_factor)
        # the official parameter shape (1, 1, 1, f, 1, f, 1), so released and distilled files load both ways
        self.spatial_weight = torch.nn.Parameter(torch.full(_official_shape(f), 1.0 / (f * f))) if f > 1 else None

    def attend(self, attn, query, key, value, attention_mask=None, text_len=0):
        if attention_mask is not None:
            raise AttnCtrlError("CLEAR does not combine with an attention mask on FLUX layers")
        grid = self.ctl.call.grid if self.ctl is not None else ()
        n_image = query.shape[2] - text_len
        if len(grid) != 2 or grid[0] * grid[1] != n_image:
            raise AttnCtrlError(
                f"CLEAR needs the image token grid: this call has {n_image} image tokens but img_ids give "
                f"{'x'.join(map(str, grid)) or 'none'} (reference-image tokens, as in FLUX Kontext, are not supported)"
            )
        h, w = grid
        pooled = 0
        if self.spatial_weight is not None:
            f = self.spatial_weight.shape[3]
            weight = self.spatial_weight.reshape(f, f)
            pk = pool_keys(key[:, :, text_len:], h, w, weight)
            pv = pool_keys(value[:, :, text_len:], h, w, weight)
            key, value = torch.cat([key, pk], dim=2), torch.cat([value, pv], dim=2)
            pooled = pk.shape[2]
        spec = LocalSpec(h, w, text_len, self.radius, pooled)
        scale = None
        if self.proportional:
            n_kv = text_len + h * w
            n_kv = 10 * n_kv if pooled else n_kv
            scale = math.sqrt(math.log(n_kv, _TRAIN_LENGTH) / query.shape[-1])
        if self.backend == "auto" and scale is None and choose_backend(spec, query.device) == "full":
            return self.stock_attention(query, key, value)  # the disc covers everything: exactly the stock layer
        return local_attention(query, key, value, spec, self.backend, scale)


def clear_weight_keys(transformer: torch.nn.Module, down_factor: int = 1) -> list[str]:
    """The state-dict keys a CLEAR weight file holds for ``transformer`` (spec §4, official layout)."""
    keys = [k for k in transformer.state_dict() if _PROJ.match(k)]
    if down_factor > 1:
        keys += [name[: -len(".processor")] + ".processor.spatial_weight" for name in transformer.attn_processors]
    return keys


def _read(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise AttnCtrlError(f"CLEAR weights file {path} does not exist")
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as e:  # safetensors raises several error types for damaged files
        raise AttnCtrlError(f"cannot read CLEAR weights {path}: {str(e).splitlines()[0]}") from e


def _official_shape(f: int) -> tuple[int, ...]:
    """The official ``spatial_weight`` shape: it multiplies keys unflattened to ``(B, heads, H/f, f, W/f, f, d)``."""
    return (1, 1, 1, f, 1, f, 1)


def load_clear_weights(transformer: torch.nn.Module, path: str, down_factor: int = 1) -> tuple[dict, dict]:
    """Check a released/distilled CLEAR file against ``transformer``; returns ``(projections, spatial_weights)``.

    Raises one clear error naming the first missing, unexpected or wrongly shaped key.
    """
    state = _read(path)
    params = transformer.state_dict()
    spatial = {k: v for k, v in state.items() if k.endswith(".processor.spatial_weight")}
    projections = {k: v for k, v in state.items() if k not in spatial}
    unexpected = [k for k in projections if not _PROJ.match(k) or k not in params]
    if unexpected:
        raise AttnCtrlError(
            f"{path} is not CLEAR weights for this transformer: unexpected key {unexpected[0]!r} "
            f"({len(unexpected)} unexpected in all)"
        )
    for k, v in projections.items():
        if tuple(v.shape) != tuple(params[k].shape):
            raise AttnCtrlError(
                f"{path} holds weights for another model: {k} has shape {tuple(v.shape)}, this transformer "
                f"{tuple(params[k].shape)}"
            )
    missing = [k for k in clear_weight_keys(transformer) if k not in projections]
    if missing:
        raise AttnCtrlError(f"{path} lacks {len(missing)} CLEAR projection weights, e.g. {missing[0]!r}")
    if spatial and down_factor == 1:
        f = round(next(iter(spatial.values())).numel() ** 0.5)
        raise AttnCtrlError(f"{path} holds down-sampled CLEAR weights: pass down_factor={f}")
    if down_factor > 1:
        want = clear_weight_keys(transformer, down_factor)[len(clear_weight_keys(transformer)):]
        lacking = [k for k in want if k not in spatial]
        if lacking:
            raise AttnCtrlError(f"{path} lacks spatial_weight for down_factor={down_factor}, e.g. {lacking[0]!r}")
        shapes = ((down_factor, down_factor), _official_shape(down_factor))  # ours before, and the official
        bad = [k for k in want if tuple(spatial[k].shape) not in shapes]
        if bad:
            raise AttnCtrlError(f"{path}: {bad[0]} is not {down_factor}x{down_factor}; check down_factor")
    return projections, spatial


class _ClearState(MethodState):
    def __init__(self, config: CLEAR, ctl: Controller):
        self.transformer = ctl.denoiser
        self.saved: dict[str, torch.Tensor] = {}
        self.spatial: dict[str, torch.Tensor] = {}
        if config.weights is not None:
            projections, self.spatial = load_clear_weights(self.transformer, config.weights, config.down_factor)
            params = dict(self.transformer.named_parameters())
            with torch.no_grad():
                for k, v in projections.items():
                    self.saved[k] = params[k].detach().clone()
                    params[k].copy_(v.to(params[k].dtype))
        else:
            global _WARNED
            if not _WARNED:
                _WARNED = True
                logger.warning(
                    "CLEAR without distilled weights is training-free, which the paper does not evaluate: expect a "
                    "quality loss, worst at small radii (load released weights with CLEAR(weights=...) or run "
                    "`attnctrl distill clear`)"
                )

    def close(self) -> None:
        params = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for k, v in self.saved.items():
                params[k].copy_(v)
        self.saved.clear()


@dataclass(frozen=True)
class CLEAR(Plugin):
    """CLEAR local attention for FLUX.

    Args that matter:
        radius: disc radius in image tokens (1 token = 16 px); released weights exist for 8, 16, 32.
        weights: a released or distilled ``.safetensors`` file (full replacement projections, spec §4).
    Args to tinker with:
        down_factor: ``f > 1`` adds ``f x f``-pooled keys/values every image query sees (released: f = 4 with r = 8
            or 16); the image grid must be divisible by ``f``.
        proportional_attention: scale logits by ``sqrt(log_4608(N) / d)`` for resolutions beyond training (spec §5).
        backend: ``auto``, ``dense``, ``tiled`` or ``flex`` (see :mod:`attnctrl.kernels.local_attention`).
        layers: which FLUX attention layers (default all 57 on FLUX.1).
    """

    radius: float = field(default=8, metadata={"help": "CLEAR: disc radius in image tokens (16 px each)"})
    down_factor: int = field(default=1, metadata={"help": "CLEAR: pooled keys over f x f cells (1 = off)"})
    weights: str | None = field(default=None, metadata={"help": "CLEAR: released/distilled .safetensors file"})
    proportional_attention: bool = field(default=False, metadata={"help": "CLEAR: length-adaptive logit scale"})
    backend: str = field(default="auto", metadata={"help": "CLEAR: auto, dense, tiled or flex"})

    name = "clear"
    families = ("flux",)
    kinds = ("joint", "single")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.radius, (int, float)) or not self.radius >= 1:
            raise AttnCtrlError(f"CLEAR radius must be a number >= 1 (image tokens), got {self.radius!r}")
        if not isinstance(self.down_factor, int) or self.down_factor < 1:
            raise AttnCtrlError(f"CLEAR down_factor must be an integer >= 1, got {self.down_factor!r}")
        if self.backend not in BACKENDS:
            raise AttnCtrlError(f"CLEAR backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.weights is not None:
            object.__setattr__(self, "weights", os.fspath(self.weights))
            if not os.path.isfile(self.weights):
                raise AttnCtrlError(f"CLEAR weights file {self.weights} does not exist")

    def create_state(self, ctl: Controller, layers: list[LayerInfo]) -> _ClearState:
        if self.weights is not None and len(layers) != len(ctl.layers):
            raise UnsupportedModelError("CLEAR weights replace every attention layer's projections: use all layers")
        return _ClearState(self, ctl)

    def make_processor(self, layer: LayerInfo, ctl: Controller, state: _ClearState) -> CLEARAttnProcessor:
        processor = CLEARAttnProcessor(layer, ctl, self)
        key = layer.name + ".spatial_weight"
        if processor.spatial_weight is not None:
            param = next(ctl.denoiser.get_submodule(layer.module_name).parameters(), None)
            if param is not None:
                processor.to(device=param.device, dtype=param.dtype)
            if key in state.spatial:
                with torch.no_grad():
                    processor.spatial_weight.copy_(state.spatial[key].reshape(processor.spatial_weight.shape))
        return processor
