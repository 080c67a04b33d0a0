"""``FreeCustomPipeline``: a base SD 1.x/2.x or SDXL pipeline plus references in the target's self-attention.

    pipe = attnctrl.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    fc = attnctrl.pipelines.FreeCustomPipeline.from_pipe(pipe)
    image = fc("a cat wearing a hat", references=[
        attnctrl.Reference("cat.png", "cat_mask.png", "a photo of a cat"),
        attnctrl.Reference("hat.png", "hat_mask.png", "a dog wearing a hat"),
    ], mask_weights=3.0, generator=torch.Generator().manual_seed(2)).images[0]

Every argument of the base pipeline's ``__call__`` passes through; one target image per call. Without references
the call *is* the base pipeline call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import torch

from ..core.controller import Method, bind
from ..core.errors import AttnCtrlError
from ..processors.freecustom import FreeCustom, MRSAAttnProcessor
from .base import MethodPipeline, call_config
from .reference import Reference, ReferenceRun

__all__ = ["ReferencePipeline", "FreeCustomPipeline"]


def _slice_target(out, n: int):
    """Keep the target (row 0) of an output whose batch holds the target and its ``n`` references."""
    if isinstance(out, tuple):
        return tuple(_slice_target(o, n) if i == 0 else (o[:1] if isinstance(o, list) else o)
                     for i, o in enumerate(out))
    if hasattr(out, "images"):
        out.images = out.images[:1]
        if getattr(out, "nsfw_content_detected", None) is not None:
            out.nsfw_content_detected = out.nsfw_content_detected[:1]
        return out
    return out[:1]


class ReferencePipeline(MethodPipeline):
    """Base of the multi-reference pipelines (FreeCustom, MagicFace, IR-Diffusion): the base pipeline's own call on
    the batch ``[target, ref_1..ref_N]`` (one prompt each), with the method's processors bound for the call and the
    reference rows re-noised before every UNet call; only the target comes back.

    Every argument of the base ``__call__`` keeps its meaning: ``output_type``, ``return_dict``, ``latents`` (the
    target's initial noise) and ``callback_on_step_end`` (called by the base loop once per step; its ``latents``
    hold the whole batch, row 0 the target, rows 1..N the references, which are re-noised before the next UNet
    call, so changing them has no effect). ``num_images_per_prompt`` other than 1 and ``prompt_embeds`` raise with
    references (one target per call); without references the call *is* the base call.
    """

    config_class: type[Method] = FreeCustom
    processor_class: type = MRSAAttnProcessor

    def _size(self, kwargs) -> tuple[int, int]:
        default = getattr(self, "default_sample_size", None) or self.unet.config.sample_size
        default = default * self.vae_scale_factor
        return int(kwargs.get("height") or default), int(kwargs.get("width") or default)

    @staticmethod
    def _seed(generator, reference_seed):
        if reference_seed is not None:
            return int(reference_seed)
        gen = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
        return (int(gen.initial_seed()) + 1) % 2**63 if isinstance(gen, torch.Generator) else 0

    def _config(self, options: dict):
        """The call's config: ``config=`` or the option keywords among ``options`` (taken out of it)."""
        names = {f.name for f in fields(self.config_class)}
        config_kwargs = {k: options.pop(k) for k in list(options) if k in names}
        return call_config(self.config_class, options.pop("config", None), config_kwargs)

    run_class = ReferenceRun

    @staticmethod
    def _distinct(words, what: str) -> None:
        """One concept per word: a clear error naming the repeated ``words``."""
        repeated = sorted({w for w in words if list(words).count(w) > 1})
        if repeated:
            raise AttnCtrlError(f"{what} must differ (one concept per word): {', '.join(repeated)} repeated")

    def _validate(self, config, prompt: str, references) -> object:
        """Method-specific checks before any work (MagicFace resolves its words here)."""
        return None

    def _prepare(self, run: ReferenceRun, config, context, handle, kwargs) -> list:
        """Method-specific setup once the processors are installed; returns hooks to remove after the call."""
        return []

    def __call__(self, prompt: str, references: Sequence[Reference] = (), reference_seed: int | None = None,
                 **kwargs):
        """Generate one target image of ``prompt`` with the references (see the method's docstring)."""
        config = self._config(kwargs)
        references = list(references or ())
        if not references:
            return self._base_call(prompt, **kwargs)
        if not isinstance(prompt, str):
            raise AttnCtrlError("reference pipelines take one prompt (a string) per call")
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise AttnCtrlError("reference pipelines make one image per call; loop over seeds for more")
        if kwargs.get("prompt_embeds") is not None:
            raise AttnCtrlError("prompt_embeds cannot be combined with references (the batch holds the references too)")
        latents = kwargs.get("latents")
        if latents is not None:  # the target's initial noise; the reference rows are re-noised every step anyway
            if latents.ndim != 4 or latents.shape[0] != 1:
                raise AttnCtrlError(f"latents: give the target's initial noise, shape (1, C, h, w), not "
                                    f"{tuple(latents.shape)}")
            kwargs["latents"] = latents.expand(1 + len(references), -1, -1, -1).clone()
        if not all(isinstance(r, Reference) for r in references):
            raise AttnCtrlError("references must be attnctrl.Reference(image, mask, prompt) objects")
        config.weights(len(references))  # more weights than references -> a clear error before any work
        steps = kwargs.get("num_inference_steps") or self._base_defaults()["num_inference_steps"].default
        if getattr(config, "start_step", 0) >= steps:  # never a silent no-op
            raise AttnCtrlError(f"start_step {config.start_step} is not below the {steps} steps: the references would "
                                f"never be attended")
        context = self._validate(config, prompt, references)
        height, width = self._size(kwargs)
        kwargs.update(height=height, width=width)
        run = self.run_class(self, references, height, width, self._seed(kwargs.get("generator"), reference_seed))
        prompts = [prompt] + ["" if getattr(config, "use_null_ref_prompts", False) else r.prompt for r in references]
        negative = kwargs.pop("negative_prompt", None)
        if isinstance(negative, str):
            negative = [negative] * len(prompts)
        with bind(self, config, run, self.processor_class) as handle:
            extra = self._prepare(run, config, context, handle, kwargs)
            try:
                with run:
                    out = self._base_call(prompts, negative_prompt=negative, **kwargs)
            finally:
                for h in extra:
                    h.remove()
        self.last_run = run
        return _slice_target(out, run.n)


class FreeCustomPipeline(ReferencePipeline):
    """FreeCustom (see :mod:`attnctrl.processors.freecustom`). Extra call arguments: ``references``,
    ``mask_weights``, ``style_fidelity``, ``layers``, ``start_step``, ``end_step``, ``use_null_ref_prompts``,
    ``mask_mode``, ``reference_seed``; everything else goes to the base pipeline."""

    config_class = FreeCustom
    processor_class = MRSAAttnProcessor
