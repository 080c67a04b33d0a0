"""Model families: which denoisers attnctrl understands and how each one lays out its attention.

| family      | denoiser class                | layers                                  | token order in joint attention | CFG |
|-------------|-------------------------------|-----------------------------------------|--------------------------------|-----|
| ``sd``      | UNet2DConditionModel (SD 1/2) | attn1 self, attn2 cross (text in ehs)   | image only                     | batch [uncond; cond] |
| ``sdxl``    | UNet2DConditionModel (SDXL)   | same, ``addition_embed_type="text_time"``| image only                     | batch [uncond; cond] |
| ``flux``    | FluxTransformer2DModel        | double-stream joint, single-stream      | [text, image]                  | none (true CFG = separate calls) |
| ``cogvideox``| CogVideoXTransformer3DModel  | joint attn1                             | [text, video]                  | batch [uncond; cond] |

A family is detected from the denoiser's class and config, never from counting calls. Everything family-specific
that a processor needs at run time (latent grid, text length for FLUX single-stream blocks, timestep) is read once
per denoiser call by the controller's forward pre-hook (:func:`read_call`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError

__all__ = ["Family", "FAMILIES", "detect_family", "find_denoiser", "CallInfo", "read_call"]


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    denoiser_attr: str  # attribute of the pipeline holding the denoiser
    text_encoder_attr: str  # text encoder whose tokens the attention layers see
    tokenizer_attr: str
    token_order: str  # "image" (text only as cross-attention context), "text,image" or "text,video"
    cfg: str  # "batch": [uncond; cond] halves in one call; "separate": one call per branch


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", "Stable Diffusion 1.x/2.x UNet", "unet", "text_encoder", "tokenizer", "image", "batch"),
    "sdxl": Family("sdxl", "Stable Diffusion XL UNet", "unet", "text_encoder", "tokenizer", "image", "batch"),
    "flux": Family("flux", "FLUX transformer", "transformer", "text_encoder_2", "tokenizer_2", "text,image", "separate"),
    "cogvideox": Family(
        "cogvideox", "CogVideoX transformer", "transformer", "text_encoder", "tokenizer", "text,video", "batch"
    ),
}

_SUPPORTED = "UNet2DConditionModel (SD 1.x/2.x, SDXL), FluxTransformer2DModel and CogVideoXTransformer3DModel"


def detect_family(denoiser: torch.nn.Module) -> Family:
    """The :class:`Family` of a denoiser, or :class:`UnsupportedModelError` naming what is supported."""
    name = type(denoiser).__name__
    config = getattr(denoiser, "config", None)
    if name == "UNet2DConditionModel":
        return FAMILIES["sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd"]
    if name == "FluxTransformer2DModel":
        return FAMILIES["flux"]
    if name == "CogVideoXTransformer3DModel":
        return FAMILIES["cogvideox"]
    raise UnsupportedModelError(f"attnctrl does not support {name}; it supports {_SUPPORTED}.")


def denoiser_of(pipe) -> torch.nn.Module | None:
    """The pipeline's UNet or transformer, ``None`` if it has neither (a ``torch.compile`` wrapper: its module; never
    ``pipe.unet or ...``, which asks a compiled module for its length)."""
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return getattr(module, "_orig_mod", module)
    return None


def find_denoiser(target) -> tuple[torch.nn.Module, object | None]:
    """``(denoiser, pipeline_or_None)`` for a pipeline, or for a denoiser given directly."""
    if isinstance(target, torch.nn.Module):
        target = getattr(target, "_orig_mod", target)  # torch.compile wrapper
        detect_family(target)
        return target, None
    denoiser = denoiser_of(target)
    if denoiser is not None:
        detect_family(denoiser)
        return denoiser, target
    raise UnsupportedModelError(
        f"{type(target).__name__} is neither a diffusers pipeline with a UNet/transformer nor a denoiser; "
        f"attnctrl supports {_SUPPORTED}."
    )


@dataclass
class CallInfo:
    """What one denoiser call tells the processors (read by the controller's forward pre-hook)."""

    timestep: float | None = None
    batch: int = 0
    grid: tuple[int, ...] = ()  # token grid at full resolution: SD latent (H, W); FLUX packed (h, w); CogVideoX (F, h, w)
    text_len: int = 0  # number of text tokens the attention layers see
    cfg: bool = False  # the batch is [uncond; cond] (set by the controller from the pipeline)


def _arg(args, kwargs, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _scalar(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return float(t)


def read_call(family: Family, denoiser: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    """Read timestep, batch size, latent grid and text length from the denoiser's forward arguments."""
    if family.name in ("sd", "sdxl"):
        sample = _arg(args, kwargs, 0, "sample")
        ehs = _arg(args, kwargs, 2, "encoder_hidden_states")
        return CallInfo(
            timestep=_scalar(_arg(args, kwargs, 1, "timestep")),
            batch=sample.shape[0],
            grid=tuple(sample.shape[-2:]),
            text_len=ehs.shape[1] if ehs is not None else 0,
        )
    if family.name == "flux":
        hidden = _arg(args, kwargs, 0, "hidden_states")
        ehs = _arg(args, kwargs, 1, "encoder_hidden_states")
        img_ids = kwargs.get("img_ids")
        if img_ids is not None:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        else:
            grid = ()
        return CallInfo(
            timestep=_scalar(kwargs.get("timestep")),
            batch=hidden.shape[0],
            grid=grid,
            text_len=ehs.shape[1] if ehs is not None else 0,
        )
    # cogvideox: hidden_states (B, F, C, H, W)
    hidden = _arg(args, kwargs, 0, "hidden_states")
    ehs = _arg(args, kwargs, 1, "encoder_hidden_states")
    cfg = denoiser.config
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    f, h, w = hidden.shape[1], hidden.shape[3], hidden.shape[4]
    return CallInfo(
        timestep=_scalar(_arg(args, kwargs, 2, "timestep")),
        batch=hidden.shape[0],
        grid=(-(-f // pt), h // p, w // p),
        text_len=ehs.shape[1] if ehs is not None else 0,
    )
