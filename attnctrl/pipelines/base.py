"""The wrapper every method pipeline shares: it holds a diffusers pipeline and delegates everything else to it."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..core.controller import Method
from ..core.errors import UnsupportedModelError
from ..core.families import detect_family

__all__ = ["MethodPipeline", "upcast_vae"]

_FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flux": "FLUX", "cogvideox": "CogVideoX"}


@contextmanager
def upcast_vae(vae):
    """``vae`` in float32 inside the block where diffusers upcasts it (float16 with ``force_upcast``), back to float16
    after it, errors included (``.to`` changes the shared module in place)."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            vae.to(torch.float16)


class MethodPipeline:
    """Wraps a loaded diffusers pipeline (``.pipe``; its modules are shared, nothing is copied).

    Subclasses set ``config_class``, whose ``families`` are the denoisers the method supports; any other model
    raises :class:`UnsupportedModelError` here, before any work.
    """

    config_class: type[Method]

    def __init__(self, pipe):
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) or torch.nn.Module()
        family = detect_family(denoiser)
        if family.name not in self.config_class.families:
            names = " and ".join(_FAMILY_NAMES.get(f, f) for f in self.config_class.families)
            raise UnsupportedModelError(f"{type(self).__name__} supports {names} pipelines, not "
                                        f"{type(pipe).__name__} ({family.name})")
        self.pipe = pipe
        self.xl = family.name == "sdxl"

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """Wrap ``pipe`` (or the pipeline inside another method pipeline)."""
        return cls(pipe.pipe if isinstance(pipe, MethodPipeline) else pipe, **kwargs)

    def __getattr__(self, name):
        if name == "pipe":  # not set yet (failed __init__, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def encode_cfg(self, prompt: str, device, negative: str | None = None):
        """``(embeds, pooled)`` for classifier-free guidance, batch ``[negative; prompt]`` (``pooled``: SDXL only)."""
        pipe = self.pipe
        if self.xl:
            pe, ne, pooled, npooled = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True, negative_prompt=negative)
            return torch.cat([ne, pe]), torch.cat([npooled, pooled])
        pe, ne = pipe.encode_prompt(prompt, device, 1, True, negative)
        return torch.cat([ne, pe]), None

    def shown_masks(self):
        """Masks of the last call worth showing a user, ``(N, h, w)`` (one per subject / LoRA / reference), or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipe).__name__})"
