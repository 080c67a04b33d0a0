"""Reference images for multi-reference self-attention (FreeCustom, MagicFace, IR-Diffusion).

* :class:`Reference` holds one concept image, its mask and a prompt describing the image in context.
* :class:`ReferenceRun` runs a base diffusers pipeline with the target and the N references in one batch, laid
  out for CFG exactly as the base pipeline lays out a prompt list: ``[uncond: target, ref_1..ref_N; cond: target,
  ref_1..ref_N]``. The references are never denoised for real: a forward pre-hook on the UNet replaces their rows of
  the model input at every step with the clean reference latent (VAE posterior mean) re-noised to the current
  timestep by the scheduler's own ``add_noise`` and ``scale_model_input``, with fresh noise from a private, seeded
  generator (the official code draws it from the global RNG stream after `seed_everything`; ours does not depend on
  what else drew from that stream). Only the target's image is returned.

The target's initial noise is the first slice of the batch's noise, so a run with references starts from the same
noise as a plain run with the same generator, and a run without references *is* the plain pipeline call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import AttnCtrlError
from ..core.masks import load_mask
from ..processors.reference import ReferenceState
from .base import encode

__all__ = ["Reference", "ReferenceRun", "ReferenceError"]


class ReferenceError(AttnCtrlError):
    """A reference image or mask that cannot be used."""


def _load_image(image, label: str) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ReferenceError(f"{label}: cannot read image {os.fspath(image)}: {e}") from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ReferenceError(f"{label}: an image array must be (H, W, 3), got {arr.shape}")
        return Image.fromarray(arr[..., :3])
    raise ReferenceError(f"{label}: an image must be a path, PIL image or array, not {type(image).__name__}")


@dataclass
class Reference:
    """One reference concept: ``image``, its ``mask`` (where the concept is) and a ``prompt`` describing the image.

    ``mask`` is binarised with ``value > mask_threshold`` on 0..255 (127 by default; ``mask_threshold=254``
    reproduces the official "exactly 255" rule, under which JPEG noise punches holes). ``fit="pad"`` keeps the aspect
    ratio by padding to the target's shape (images with their border colour, masks with 0); ``fit="stretch"``
    resizes both to the target size like the official code. ``mask=None`` means the whole image.
    """

    image: object
    mask: object = None
    prompt: str = ""
    mask_threshold: int = 127
    fit: str = "pad"
    name: str = ""

    def load(self, index: int, label: str | None = None) -> tuple[Image.Image, torch.Tensor]:
        """The RGB image and the binary float mask ``(H, W)``, checked (errors name the reference, or ``label``)."""
        label = (label or f"reference {index + 1}") + (f" ({self.name})" if self.name else "")
        if self.fit not in ("pad", "stretch"):
            raise ReferenceError(f"{label}: fit must be 'pad' or 'stretch', not {self.fit!r}")
        image = _load_image(self.image, label)
        if self.mask is None:
            mask = torch.ones(image.height, image.width)
        else:
            try:
                mask = load_mask(self.mask, threshold=self.mask_threshold)
            except AttnCtrlError as e:
                raise ReferenceError(f"{label}: {e}") from e
            if tuple(mask.shape) != (image.height, image.width):
                raise ReferenceError(
                    f"{label}: the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{image.width}x{image.height}; they must have the same size"
                )
            mask = (mask > 0.5).float()
        if mask.sum() == 0:
            raise ReferenceError(
                f"{label}: the mask is empty after binarising at > {self.mask_threshold} (is the concept white on "
                f"black?)"
            )
        return image, mask

    def prepared(self, index: int, height: int, width: int) -> tuple[Image.Image, torch.Tensor]:
        """Image and mask fitted to ``height x width`` (see ``fit``)."""
        image, mask = self.load(index)
        if self.fit == "stretch":  # torch's nearest (sample floor(d * s)), as the official code; PIL's differs
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float()
            pixels = F.interpolate(pixels, size=(height, width), mode="nearest")[0].permute(1, 2, 0)
            image = Image.fromarray(pixels.to(torch.uint8).numpy())
            mask = F.interpolate(mask[None, None], size=(height, width), mode="nearest")[0, 0]
            return image, mask
        scale = min(width / image.width, height / image.height)
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        x0, y0 = (width - w) // 2, (height - h) // 2
        arr = np.asarray(image)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        canvas = Image.new("RGB", (width, height), tuple(int(c) for c in np.median(border, axis=0)))
        canvas.paste(image.resize((w, h), Image.LANCZOS), (x0, y0))
        m = torch.zeros(height, width)
        m[y0 : y0 + h, x0 : x0 + w] = F.interpolate(mask[None, None], size=(h, w), mode="nearest")[0, 0]
        return canvas, m


class ReferenceRun(ReferenceState):
    """The per-call state of a multi-reference generation (see the module docstring): the references' masks and
    batch layout the processors read (:class:`~attnctrl.processors.reference.ReferenceState`), plus the pipeline
    side: the prepared images, their clean latents ``z0`` and the UNet pre-hook that re-noises the reference rows
    (installed while the run is entered as a context manager)."""

    def __init__(self, pipe, references: Sequence[Reference], height: int, width: int, seed: int):
        self.pipe = pipe
        self.unet = pipe.unet
        self.height, self.width = height, width
        latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        images, masks = [], []
        for i, ref in enumerate(references):
            image, mask = ref.prepared(i, height, width)
            images.append(image)
            masks.append(mask)
        self.images = images
        super().__init__(torch.stack(masks) if masks else torch.zeros(0, height, width), latent_hw)  # (N, H, W)
        self.z0 = encode(pipe, images, height, width)
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self._hook = None

    # -- the UNet input hook ---------------------------------------------------------------------------------------
    def _renoise(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        cfg = sample.shape[0] == 2 * (self.n + 1)
        _, refs = self.rows(sample.shape[0], cfg)
        scheduler = self.pipe.scheduler
        noise = torch.randn(self.z0.shape, generator=self.generator).to(self.z0.device, self.z0.dtype)
        t_tensor = torch.as_tensor(t, device=self.z0.device).reshape(-1)[:1]
        noised = scheduler.add_noise(self.z0, noise, t_tensor.expand(self.n))
        noised = scheduler.scale_model_input(noised, t)
        sample = sample.clone()
        for i, rows in enumerate(refs):
            for r in rows:
                sample[r] = noised[i].to(sample.dtype)
        if args:
            return (sample, *args[1:]), kwargs
        return args, {**kwargs, "sample": sample}

    def __enter__(self):
        self._hook = self.unet.register_forward_pre_hook(self._renoise, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
