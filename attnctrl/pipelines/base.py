"""What every method pipeline shares: the ``from_pipe`` that makes it a real diffusers pipeline, one VAE
encode/decode path, and the ``callback_on_step_end`` contract of the method loops.

A method pipeline class (``FreeCustomPipeline``, ``CLoRAPipeline``, ...) is a mixin over :class:`MethodPipeline`.
``FreeCustomPipeline.from_pipe(pipe)`` builds, once per base class, the subclass ``(FreeCustomPipeline,
type(pipe))`` (named e.g. ``FreeCustomStableDiffusionPipeline``) and instantiates it the way diffusers' own
``DiffusionPipeline.from_pipe`` does: the base class's ``__init__`` with the very component objects of ``pipe`` and
its config. So the result is a ``DiffusionPipeline`` *and* a ``FreeCustomPipeline``; ``.to(...)`` returns the
same object; offloading, ``set_progress_bar_config`` and ``save_pretrained`` are the base class's own; the
method's ``__call__`` runs its loop, or the base class's ``__call__`` on itself (``_base_call``) for the methods
that only change the batch and the attention. Unlike diffusers' ``from_pipe`` it casts nothing (diffusers' moves
every shared module to float32 unless told a dtype) and leaves the shared components' configs as they were
(a base ``__init__`` may "fix" a shared scheduler's config). Attributes set on ``pipe`` after its construction
(``attnctrl_model_id``, a changed ``default_sample_size``, the progress-bar and offload settings) carry over.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from typing import ClassVar

import torch

from ..core.controller import Method
from ..core.errors import AttnCtrlError, UnsupportedModelError
from ..core.families import detect_family

__all__ = ["MethodPipeline", "upcast_vae", "encode", "decode", "check_callback", "run_callback", "call_config"]

_FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flux": "FLUX", "cogvideox": "CogVideoX"}

#: private attributes of the base pipeline that are settings, not per-call state (they carry over in from_pipe)
_CARRIED_PRIVATE = ("_progress_bar_config", "_offload_gpu_id", "_offload_device", "_all_hooks")

#: (method class, diffusers class) -> the method pipeline class over that diffusers class
_SUBCLASSES: dict[tuple[type, type], type] = {}


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


def _denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, "unet", None) or pipe.transformer


@torch.no_grad()
def encode(pipe, images, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Clean latents of ``images`` (what ``pipe.image_processor.preprocess`` takes, resized to ``height x width``
    when given): the VAE posterior mean, shifted and scaled as the denoiser sees latents, in the denoiser's dtype.
    The VAE runs in float32 where diffusers upcasts it (:func:`upcast_vae`); the pixels go to the pipeline's
    execution device (an offloaded VAE is moved there by its hook)."""
    pixels = pipe.image_processor.preprocess(images, height=height, width=width)
    with upcast_vae(pipe.vae) as vae:
        latents = vae.encode(pixels.to(pipe._execution_device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(_denoiser(pipe).dtype)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, output_type: str | None = "pil"):
    """Latents as the denoiser sees them -> the pipeline's output of ``output_type``, as the base pipeline makes it.

    ``"latent"``: ``latents`` unchanged; ``"pil"`` / ``"np"`` / ``"pt"``: post-processed by the pipeline's image
    (or video) processor; ``None``: the decoder's raw output (images in [-1, 1], or video frames) for a method that
    works on pixels before post-processing. Images: un-scaled (``latents_mean`` / ``latents_std`` where the VAE has
    them, else ``/ scaling_factor + shift_factor``) and decoded in float32 where diffusers upcasts the VAE. Video
    latents ``(B, F, C, h, w)`` go through the pipeline's own ``decode_latents`` (CogVideoX)."""
    if output_type == "latent":
        return latents
    if latents.ndim == 5 and hasattr(pipe, "video_processor"):
        frames = pipe.decode_latents(latents.to(pipe.vae.dtype))
        return frames if output_type is None else pipe.video_processor.postprocess_video(video=frames,
                                                                                         output_type=output_type)
    with upcast_vae(pipe.vae) as vae:
        z = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(std).view(1, -1, 1, 1).to(z)
            z = z * std / vae.config.scaling_factor + mean
        else:
            z = z / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift:
                z = z + shift
        images = vae.decode(z, return_dict=False)[0]
    return images if output_type is None else pipe.image_processor.postprocess(images, output_type=output_type)


def call_config(config_class: type, config, options: dict):
    """A call's method config: ``config=`` (built and validated once, where the request was checked) or one built
    from the option keywords, not both."""
    if config is None:
        return config_class(**options)
    if not isinstance(config, config_class):
        raise AttnCtrlError(f"config must be a {config_class.__name__}, not a {type(config).__name__}")
    if options:
        raise AttnCtrlError(f"give config= or option keywords, not both (got {', '.join(sorted(options))})")
    return config


def check_callback(callback, tensor_inputs, allowed) -> list[str]:
    """The tensor inputs ``callback_on_step_end`` asks for (a diffusers ``PipelineCallback`` names its own), checked
    against what the method's loop offers; raises before any work."""
    if callback is None:
        return []
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    elif not callable(callback):
        raise AttnCtrlError(f"callback_on_step_end must be callable, not {type(callback).__name__}")
    names = list(tensor_inputs or ())
    bad = [k for k in names if k not in allowed]
    if bad:
        raise AttnCtrlError(f"callback_on_step_end_tensor_inputs: {', '.join(map(repr, bad))} not offered by this "
                            f"method's loop; it offers {', '.join(map(repr, allowed))}")
    return names


def run_callback(pipe, callback, names: list[str], step: int, timestep, values: dict) -> dict:
    """diffusers' step-end contract: ``callback(pipe, step, timestep, {name: tensor})``; the tensors it returns replace
    those in ``values`` (returned updated)."""
    if callback is None:
        return values
    out = callback(pipe, step, timestep, {k: values[k] for k in names}) or {}
    return {**values, **{k: v for k, v in out.items() if k in values}}


def _diffusers_class(pipe) -> type | None:
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        return None
    return getattr(type(pipe), "_attnctrl_base", None) or type(pipe)


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, tuple))


class MethodPipeline:
    """Mixin of every method pipeline (see the module docstring); build one with :meth:`from_pipe`.

    Subclasses set ``config_class``, whose ``families`` are the denoisers the method supports; any other model
    raises :class:`UnsupportedModelError` in :meth:`from_pipe`, before any work.
    """

    config_class: ClassVar[type[Method]]
    _attnctrl_base: ClassVar[type | None] = None  # the diffusers pipeline class (on the built subclasses)
    _attnctrl_method: ClassVar[type | None] = None  # the method pipeline class (on the built subclasses)

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """A pipeline of this method sharing the components of ``pipe`` (a diffusers pipeline of a supported family,
        or another method's pipeline: its base is used). ``kwargs`` replace components or config values, as in
        ``DiffusionPipeline.from_pipe``."""
        method = cls._attnctrl_method or cls
        base = _diffusers_class(pipe)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) or torch.nn.Module()
        family = detect_family(denoiser)
        if family.name not in method.config_class.families:
            names = " and ".join(_FAMILY_NAMES.get(f, f) for f in method.config_class.families)
            raise UnsupportedModelError(f"{method.__name__} supports {names} pipelines, not "
                                        f"{(base or type(pipe)).__name__} ({family.name})")
        if base is None:
            raise UnsupportedModelError(f"{method.__name__} is built from a diffusers pipeline (DiffusionPipeline), "
                                        f"not a {type(pipe).__name__}")
        return method._build(base, pipe, kwargs)

    @classmethod
    def _pipeline_class(cls, base: type) -> type:
        """The subclass ``(cls, base)``, built once per pair."""
        key = (cls, base)
        if key not in _SUBCLASSES:
            name = f"{cls.__name__.removesuffix('Pipeline')}{base.__name__}"
            _SUBCLASSES[key] = type(name, (cls, base), {
                "__module__": cls.__module__, "__doc__": cls.__doc__, "_attnctrl_base": base, "_attnctrl_method": cls,
            })
        return _SUBCLASSES[key]

    @classmethod
    def _build(cls, base: type, pipe, overrides: dict):
        from diffusers.configuration_utils import ConfigMixin

        sub = cls._pipeline_class(base)
        expected, optional = base._get_signature_keys(base)
        if {"torch_dtype", "dtype"} & set(overrides):
            raise TypeError(f"{cls.__name__}.from_pipe() shares pipe's modules and casts nothing; to change the dtype, "
                            f"call .to(dtype) on either pipeline (it changes the shared modules)")
        unknown = sorted(set(overrides) - set(expected) - set(optional))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pipe() got unexpected arguments: {', '.join(unknown)}")
        components = {k: v for k, v in pipe.components.items() if k in expected}
        config = {k: pipe.config[k] for k in optional if k in pipe.config}
        if "add_watermarker" in optional and hasattr(pipe, "watermark"):  # SDXL: not in the config; as pipe has it
            config["add_watermarker"] = pipe.watermark is not None
        init = {**components, **config, **overrides}
        # a base __init__ may rewrite a shared component's config (StableDiffusionPipeline "fixes" a scheduler's
        # steps_offset); the shared components stay exactly as they were
        configs = [(m, m._internal_dict) for m in init.values()
                   if isinstance(m, ConfigMixin) and "_internal_dict" in vars(m)]
        try:
            new = sub(**init)
        finally:
            for module, internal in configs:
                module._internal_dict = internal
        name_or_path = pipe.config.get("_name_or_path")
        if name_or_path is not None:
            new.register_to_config(_name_or_path=name_or_path)
        # what was set on pipe after its construction carries over (a method pipeline: what its own base carried)
        source, fresh = vars(pipe), vars(new)
        candidates = getattr(pipe, "_attnctrl_carried", None)
        candidates = source.keys() if candidates is None else candidates
        carried = set()
        for k in candidates:
            if k in init or k == "_internal_dict" or k not in source:
                continue
            value = source[k]
            public = not k.startswith("_")
            if k in _CARRIED_PRIVATE or (public and (k not in fresh or (_plain(value) and fresh[k] != value))):
                fresh[k] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
                carried.add(k)
        fresh["_attnctrl_carried"] = frozenset(carried)
        return new

    # -- the base pipeline ---------------------------------------------------------------------------------------
    def _base_call(self, *args, **kwargs):
        """The base diffusers class's ``__call__`` on this pipeline (same components, this pipeline's state)."""
        return self._attnctrl_base.__call__(self, *args, **kwargs)

    def _base_defaults(self) -> dict:
        """The base ``__call__``'s parameters (defaults of ``num_inference_steps``, ``guidance_scale``, ...)."""
        return inspect.signature(self._attnctrl_base.__call__).parameters

    @property
    def _sdxl(self) -> bool:
        return detect_family(_denoiser(self)).name == "sdxl"

    def to_json_string(self) -> str:
        """The config as the base class saves it: ``save_pretrained`` writes a pipeline that
        ``DiffusionPipeline.from_pretrained`` loads as the base class (the method adds no weights)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self._attnctrl_base.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # -- helpers of the method loops -----------------------------------------------------------------------------
    def encode_cfg(self, prompt: str, device, negative: str | None = None):
        """``(embeds, pooled)`` for classifier-free guidance, batch ``[negative; prompt]`` (``pooled``: SDXL only)."""
        if self._sdxl:
            pe, ne, pooled, npooled = self.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True, negative_prompt=negative)
            return torch.cat([ne, pe]), torch.cat([npooled, pooled])
        pe, ne = self.encode_prompt(prompt, device, 1, True, negative)
        return torch.cat([ne, pe]), None

    def shown_masks(self):
        """Masks of the last call worth showing a user, ``(N, h, w)`` (one per subject / LoRA / reference), or None."""
        return None
