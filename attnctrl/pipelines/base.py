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

A method pipeline shares its components with its base pipeline, so a call must leave them exactly as it found them.
Every ``__call__`` a method pipeline class defines is wrapped (by :meth:`MethodPipeline.__init_subclass__`, so a
third-party method gets it too) in :func:`keeping_shared_state`: a :class:`SharedState` snapshot taken before the call
and restored after it, on success and on error alike (LoRA adapters loaded by the call unloaded and the adapters,
active adapters and enabled state put back; attention processors; hooks left on a component; the scheduler object,
class and config; the progress-bar settings; the global torch RNG when the caller gave a generator).
"""

from __future__ import annotations

import functools
import inspect
import json
from contextlib import contextmanager
from typing import ClassVar

import torch

from ..core.controller import Method
from ..core.errors import AttnCtrlError, UnsupportedModelError
from ..core.families import denoiser_of, detect_family

__all__ = ["MethodPipeline", "SharedState", "keeping_shared_state", "upcast_vae", "encode", "decode", "check_callback",
           "run_callback", "call_config"]

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
        return ((latents - shift) * vae.config.scaling_factor).to(denoiser_of(pipe).dtype)


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


# -- what a call leaves as it found it -----------------------------------------------------------------------------

_MISSING = object()

#: a module's hook dictionaries (a hook a call adds and leaves behind is removed from them)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")

#: the attributes PEFT / diffusers' LoRA loaders set on a model
_PEFT_ATTRS = ("peft_config", "_hf_peft_config_loaded")

#: ids of the pipelines whose call is running: a call inside the call (IR-Diffusion's ``super().__call__``) keeps
#: the outer snapshot
_CALLING: set[int] = set()


def _tuner_layer_class() -> type | None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no PEFT: no LoRA can be loaded either
        return None
    return BaseTunerLayer


def _adapter_names(layer) -> set[str]:
    """The adapters a PEFT tuner layer holds (``lora_A``, ``lora_B``, ... keys)."""
    names = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        names.update(getattr(layer, attr, {}).keys())
    return names


class _ModuleState:
    """One shared ``nn.Module`` component: train/eval flags, ``requires_grad``, its own hooks and its PEFT state
    (tuner layers with their adapters, active adapters, enabled flag and scales; ``peft_config``)."""

    def __init__(self, module: torch.nn.Module, tuner: type | None):
        self.module = module
        modules = list(module.modules())
        self.training = [(m, m.training) for m in modules]
        self.grads = [(p, p.requires_grad) for p in module.parameters()]
        self.hooks = {name: set(getattr(module, name, {})) for name in _HOOK_DICTS}
        self.attrs = {name: vars(module).get(name, _MISSING) for name in _PEFT_ATTRS}
        config = self.attrs["peft_config"]
        self.peft_keys = set(config) if isinstance(config, dict) else None
        self.layers = {}  # id -> (layer, adapters, active adapter, disabled, scaling)
        if tuner is not None:
            for m in modules:
                if isinstance(m, tuner):
                    active = getattr(m, "_active_adapter", None)
                    self.layers[id(m)] = (m, _adapter_names(m), list(active) if isinstance(active, list) else active,
                                          getattr(m, "_disable_adapters", False), dict(getattr(m, "scaling", {}) or {}))

    def restore(self, tuner: type | None) -> None:
        module = self.module
        if tuner is not None:
            # tuner layers that appeared (a LoRA loaded into modules that had none): their very base layers back
            for parent in list(module.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, tuner) and id(child) not in self.layers:
                        setattr(parent, name, child.get_base_layer())
            # tuner layers that were there: the adapters added to them deleted, their settings put back
            for layer, adapters, active, disabled, scaling in self.layers.values():
                if hasattr(layer, "_active_adapter"):  # first, so that no deleted adapter is active
                    layer._active_adapter = list(active) if isinstance(active, list) else active
                if hasattr(layer, "_disable_adapters"):
                    layer._disable_adapters = disabled
                for name in sorted(_adapter_names(layer) - adapters):
                    layer.delete_adapter(name)
                current = getattr(layer, "scaling", None)
                if isinstance(current, dict) and current != scaling:
                    current.clear()
                    current.update(scaling)
        for name, value in self.attrs.items():
            if value is _MISSING:
                vars(module).pop(name, None)
            else:
                vars(module)[name] = value
        if self.peft_keys is not None:
            for key in set(self.attrs["peft_config"]) - self.peft_keys:
                del self.attrs["peft_config"][key]
        for name, keys in self.hooks.items():
            hooks = getattr(module, name, None)
            if hooks is not None:
                for key in set(hooks) - keys:
                    del hooks[key]
        for m, flag in self.training:
            m.training = flag
        for p, flag in self.grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


class SharedState:
    """A snapshot of what a call of a method pipeline may change on what it shares with its base pipeline;
    :meth:`restore` puts it back exactly.

    It covers the pipeline's components (the objects, their classes and diffusers configs, so a swapped or
    reconfigured scheduler comes back), the shared modules (LoRA adapters: those added are unloaded, down to the
    PEFT layers when the module had none, and the active adapters, enabled flag and scales of the others restored;
    hooks left on a component; train/eval flags and ``requires_grad``), the attention processors of every attention
    layer (attnctrl's handles bound for the call are removed first), the pipeline's progress-bar settings and, with
    ``rng``, the global torch RNG (CPU, and CUDA when initialised). A scheduler's run state (timesteps, step index)
    is not part of it: every call sets it anew with ``set_timesteps``.
    """

    def __init__(self, pipe, rng: bool = False):
        from diffusers.configuration_utils import ConfigMixin

        self.pipe = pipe
        self.tuner = _tuner_layer_class()
        state = vars(pipe)
        self.pipe_config = state.get("_internal_dict", _MISSING)
        self.components = dict(pipe.components)
        objects = list({id(v): v for v in self.components.values() if v is not None}.values())
        self.classes = [(v, type(v)) for v in objects]
        self.configs = [(v, v._internal_dict) for v in objects if isinstance(v, ConfigMixin)
                        and "_internal_dict" in vars(v)]
        modules = [v for v in objects if isinstance(v, torch.nn.Module)]
        self.modules = [_ModuleState(m, self.tuner) for m in modules]
        self.processors = [(m, dict(m.attn_processors)) for m in modules if hasattr(m, "attn_processors")]
        progress = state.get("_progress_bar_config", _MISSING)
        self.progress = (progress, dict(progress) if isinstance(progress, dict) else None)
        self.rng = None
        if rng:
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            self.rng = (torch.get_rng_state(), cuda)

    def restore(self) -> None:
        from ..core.controller import Controller

        pipe = self.pipe
        # the components: the same objects, classes and configs
        for name, value in self.components.items():
            if getattr(pipe, name, None) is not value:
                setattr(pipe, name, value)
        if self.pipe_config is not _MISSING:
            vars(pipe)["_internal_dict"] = self.pipe_config
        # attnctrl's handles bound for the call and still installed (a method that failed to remove its own)
        denoiser = denoiser_of(pipe)
        try:
            ctl = Controller.of(denoiser, create=False) if denoiser is not None else None
        except AttnCtrlError:  # a denoiser attnctrl does not support: nothing of attnctrl's on it
            ctl = None
        if ctl is not None:
            for handle in [h for h in ctl.handles if h.caller is not None and h.caller() is pipe]:
                ctl.uninstall(handle)
        for obj, cls in self.classes:
            if type(obj) is not cls:
                obj.__class__ = cls
        for obj, config in self.configs:
            if obj._internal_dict is not config:
                obj._internal_dict = config
        for state in self.modules:
            state.restore(self.tuner)
        # the attention processors of every attention layer: the very same objects
        for module, processors in self.processors:
            current = module.attn_processors
            for name, processor in processors.items():
                if name in current and current[name] is not processor:
                    module.get_submodule(name[: -len(".processor")]).set_processor(processor)
        progress, items = self.progress
        if progress is _MISSING:
            vars(pipe).pop("_progress_bar_config", None)
        else:
            vars(pipe)["_progress_bar_config"] = progress
            if isinstance(progress, dict) and progress != items:
                progress.clear()
                progress.update(items)
        if self.rng is not None:
            cpu, cuda = self.rng
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


@contextmanager
def keeping_shared_state(pipe, rng: bool = False):
    """Inside the block, anything may change what ``pipe`` shares with other pipelines (LoRAs loaded, processors,
    scheduler, ...); when it ends, errors included, :class:`SharedState` puts it all back."""
    state = SharedState(pipe, rng)
    try:
        yield state
    finally:
        state.restore()


def _keeps_shared_state(call):
    """``call`` (a method pipeline's ``__call__``) inside :func:`keeping_shared_state`, restoring the global RNG when
    the caller gave a generator (the method must then draw from none other)."""
    if getattr(call, "_attnctrl_keeps_shared_state", False):
        return call

    @functools.wraps(call)
    def keeping(self, *args, **kwargs):
        if id(self) in _CALLING:  # a call of the method inside its own call: the outer snapshot covers it
            return call(self, *args, **kwargs)
        _CALLING.add(id(self))
        try:
            with keeping_shared_state(self, rng=kwargs.get("generator") is not None):
                return call(self, *args, **kwargs)
        finally:
            _CALLING.discard(id(self))

    keeping._attnctrl_keeps_shared_state = True
    return keeping


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

    def __init_subclass__(cls, **kwargs):
        """Every ``__call__`` a method pipeline class defines leaves the shared components as it found them."""
        super().__init_subclass__(**kwargs)
        if "__call__" in vars(cls):
            cls.__call__ = _keeps_shared_state(vars(cls)["__call__"])

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """A pipeline of this method sharing the components of ``pipe`` (a diffusers pipeline of a supported family,
        or another method's pipeline: its base is used). ``kwargs`` replace components or config values, as in
        ``DiffusionPipeline.from_pipe``."""
        method = cls._attnctrl_method or cls
        base = _diffusers_class(pipe)
        denoiser = denoiser_of(pipe) or torch.nn.Module()
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
        return detect_family(denoiser_of(self)).name == "sdxl"

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
