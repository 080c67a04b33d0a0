"""``load_pipeline``: one entry point for every kind of model reference, with one clear sentence when it fails.

Accepted references, tried in this order:

1. an embedded model trained here on procedural shapes (:data:`EMBEDDED_MODELS`: ``toyworld``, a UNet, and
   ``toyworld-flux``, a FLUX-architecture transformer; ``attnctrl/assets/models/<name>``);
   ``tiny-<family>`` (``tiny-sd15``, ``tiny-sd21``, ``tiny-sdxl``, ``tiny-flux``, ``tiny-cogvideox``): built in code;
2. a local diffusers folder (with ``model_index.json``);
3. a single checkpoint file (``.safetensors`` / ``.ckpt``) of SD 1.x/2.x or SDXL (its config must be in the cache);
4. a hub id (``org/name``) found in the local Hugging Face cache; if it is not cached and ``HF_HUB_OFFLINE`` is not
   set, one download attempt is made.
Anything else raises :class:`ModelNotAvailableError` naming what was tried and how to fix it.
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import resources
from pathlib import Path

import torch

from ..core.errors import AttnCtrlError, ModelNotAvailableError
from ..errors import quiet_libraries
from .tiny import TINY_FAMILIES, tiny_pipeline

__all__ = ["DEFAULT_MODEL", "OFFLOAD_MODES", "check_attention_backend", "check_model", "check_offload", "enable_offload", "load_pipeline", "parse_dtype",
           "resolve_device", "recommended_settings", "set_attention_backend", "size_rule", "EMBEDDED_MODELS",
           "embedded_path",
           "toyworld_path"]

#: The model every surface uses when none is given (the tiny SD 1.5 until the trained toy model lands).
DEFAULT_MODEL = "toyworld"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise the device given (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise AttnCtrlError(f"unknown device {str(device)!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AttnCtrlError(f"device {str(device)!r} was requested but PyTorch {torch.__version__} sees no CUDA "
                                f"GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AttnCtrlError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AttnCtrlError("device 'mps' was requested but this PyTorch has no Apple GPU; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise AttnCtrlError(f"device {str(device)!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device, family: str | None = None) -> torch.dtype:
    """``None``/``"auto"`` -> float32 on CPU, bfloat16 (FLUX, CogVideoX) or float16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        if family in ("flux", "cogvideox") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise AttnCtrlError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16 or auto") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _from_pretrained(ref: str, dtype, local_only: bool):
    from diffusers import DiffusionPipeline

    with quiet_libraries():
        return DiffusionPipeline.from_pretrained(ref, dtype=dtype, local_files_only=local_only)


def _from_single_file(path: Path, dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    cls = StableDiffusionPipeline
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            if any(k.startswith("conditioner.embedders.1") for k in f.keys()):
                cls = StableDiffusionXLPipeline
    with quiet_libraries():
        return cls.from_single_file(str(path), dtype=dtype, local_files_only=True)


#: The models shipped inside the package (``attnctrl/assets/models/<name>``), with the command that trains one.
EMBEDDED_MODELS = {
    "toyworld": "attnctrl train-toy -o DIR",
    "toyworld-flux": "attnctrl train-toy --arch flux -o DIR",
}


def embedded_path(name: str) -> Path:
    """Folder of the embedded model ``name`` (inside the installed package)."""
    return Path(str(resources.files("attnctrl").joinpath(f"assets/models/{name}")))


def toyworld_path() -> Path:
    """Folder of the embedded toyworld model (inside the installed package)."""
    return embedded_path("toyworld")


def model_folder(model: str) -> Path:
    """The local folder a model reference names: the embedded model's for an embedded name, else the path."""
    return embedded_path(model) if model in EMBEDDED_MODELS else Path(model).expanduser()


def pipeline_class_name(model: str | None) -> str:
    """The pipeline class a model reference names, read before loading it: ``model_index.json`` of its folder (or of
    its Hugging Face cache entry), ``tiny-<family>``'s class, else ``""``."""
    model = str(model or DEFAULT_MODEL)
    if model.startswith("tiny-"):
        return {"sd15": "StableDiffusionPipeline", "sd21": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                "flux": "FluxPipeline", "cogvideox": "CogVideoXPipeline"}.get(model[5:], "")
    index = model_folder(model) / "model_index.json"
    if not index.is_file() and _HUB_ID.match(model) and "/" in model:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "model_index.json")
            index = Path(cached) if isinstance(cached, str) else index
        except Exception:  # an unusual cache layout: decide from the loaded model instead
            pass
    try:
        return str(json.loads(index.read_text()).get("_class_name", "")) if index.is_file() else ""
    except (OSError, ValueError):
        return ""


def family_of(model: str | None) -> str | None:
    """``"flux"`` or ``"cogvideox"`` when the checkpoint's own ``model_index.json`` says so (never the name)."""
    name = pipeline_class_name(model)
    return "flux" if "Flux" in name else "cogvideox" if "CogVideoX" in name else None


def makes_video(model: str | None) -> bool:
    """Whether ``model`` is a video model, read before loading it from its ``model_index.json`` class."""
    return bool(model) and "video" in pipeline_class_name(model).lower()


def _config(model: str, name: str) -> dict | None:
    """``name`` (``vae/config.json``, ...) of a model's folder or Hugging Face cache entry, None when absent."""
    path = model_folder(model) / name
    if not path.is_file() and _HUB_ID.match(model) and "/" in model:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, name)
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # an unusual cache layout: the loaded pipeline is checked instead
            pass
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def size_rule(model: str | None) -> tuple[int | None, int] | None:
    """``(native side in pixels or None, the multiple every side must be)`` of a model, read from the configs of its
    folder or cache entry without loading it (the VAE's downsampling times the denoiser's patch, at least 8); None
    where they are not there to read (tiny models, single files): the run layer checks the loaded pipeline then."""
    model = str(model or DEFAULT_MODEL)
    if model.startswith("tiny-"):
        return None
    vae = _config(model, "vae/config.json")
    denoiser = _config(model, "unet/config.json") or _config(model, "transformer/config.json")
    blocks = (vae or {}).get("block_out_channels")
    if denoiser is None or not blocks:
        return None
    scale = 2 ** (len(blocks) - 1)
    name = str(denoiser.get("_class_name", ""))
    sample = None if name.startswith("Flux") else denoiser.get("sample_size") or denoiser.get("sample_height")
    if isinstance(sample, (tuple, list)):
        sample = max(sample)
    return (sample * scale if isinstance(sample, int) else None), side_multiple(scale, name, denoiser.get("patch_size"))


def side_multiple(vae_scale: int, denoiser_class: str, patch_size: int | None) -> int:
    """What every image side must be a multiple of: the VAE's downsampling times the denoiser's patch (FLUX packs 2x2
    latents), and at least 8."""
    patch = 2 if denoiser_class.startswith("Flux") else int(patch_size or 1)
    return math.lcm(8, int(vae_scale) * patch)


def recommended_settings(pipe) -> dict:
    """Generation settings a model folder recommends (``attnctrl.json`` next to ``model_index.json``), else {}."""
    return dict(getattr(pipe, "attnctrl_defaults", {}) or {})


def check_model(model: str | None) -> str:
    """What kind of reference ``model`` is (``embedded``, ``tiny``, ``folder``, ``file`` or ``hub``), checked without
    loading it: the same sentence :func:`load_pipeline` would fail with, before any work. A hub id is refused here
    only when it is neither cached nor downloadable (``HF_HUB_OFFLINE``)."""
    model = str(model or DEFAULT_MODEL).strip()
    if model in EMBEDDED_MODELS:
        path = embedded_path(model)
        if not (path / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"the embedded {model} model is missing from this installation ({path}); reinstall attnctrl or "
                f"train one with `{EMBEDDED_MODELS[model]}` and pass --model DIR/model"
            )
        return "embedded"
    if model.startswith("tiny-"):
        if model[len("tiny-"):] not in TINY_FAMILIES:
            tiny = ", ".join("tiny-" + f for f in TINY_FAMILIES)
            raise ModelNotAvailableError(f"unknown tiny model {model!r}; choose one of {tiny}")
        return "tiny"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotAvailableError(f"folder {path} is not a diffusers pipeline (it has no model_index.json)")
        return "folder"
    if path.is_file():
        return "file"
    if not _HUB_ID.match(model):
        raise ModelNotAvailableError(
            f"model {model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a tiny model, an existing folder or file, nor a hub id like 'org/name'"
        )
    if _offline() and not pipeline_class_name(model):
        raise _not_available(model, offline=True)
    return "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _not_available(model: str, offline: bool) -> ModelNotAvailableError:
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    tiny = ", ".join("tiny-" + f for f in TINY_FAMILIES)
    return ModelNotAvailableError(
        f"model {model!r} is not available offline: it is not an embedded ({', '.join(EMBEDDED_MODELS)}) or tiny model ({tiny}), not a local folder or "
        f"file, and not in the Hugging Face cache under {hf_home}"
        f"{'' if offline else ' (the hub could not be reached either)'}; download it where there is network "
        f"(`hf download {model}`) or pass a local path"
    )


def _load(model: str, dtype):
    kind = check_model(model)
    if kind == "embedded":
        return _from_pretrained(str(embedded_path(model)), dtype, local_only=True)
    if kind == "tiny":
        return tiny_pipeline(model[len("tiny-"):])
    path = Path(model).expanduser()
    if kind == "folder":
        try:
            return _from_pretrained(str(path), dtype, local_only=True)
        except Exception as e:
            raise ModelNotAvailableError(f"could not load the pipeline in {path}: {_first_line(e)}") from e
    if kind == "file":
        try:
            return _from_single_file(path, dtype)
        except Exception as e:
            raise ModelNotAvailableError(
                f"could not load checkpoint file {path} (a single file needs its base model's config in the Hugging "
                f"Face cache, or convert it to a diffusers folder first): {_first_line(e)}"
            ) from e
    try:
        return _from_pretrained(model, dtype, local_only=True)
    except Exception as cached_error:
        offline = _offline()
        if not offline:
            try:
                return _from_pretrained(model, dtype, local_only=False)
            except Exception:
                pass
        raise _not_available(model, offline) from cached_error


OFFLOAD_MODES = ("model", "sequential")


def check_offload(offload: str | None, device: torch.device) -> str | None:
    """``None``/``"none"`` or one of :data:`OFFLOAD_MODES`, on an accelerator; else one clear error."""
    if offload in (None, "none", ""):
        return None
    if offload not in OFFLOAD_MODES:
        raise AttnCtrlError(f"unknown offload {offload!r}; use none, model (whole modules, little slower) or "
                            f"sequential (layer by layer: least memory, slowest)")
    if device.type == "cpu":
        raise AttnCtrlError("offload moves the model between the CPU and a GPU, and runs here on the CPU anyway: "
                            "leave it out (or pick a GPU with --device)")
    return offload


def enable_offload(pipe, mode: str, device) -> None:
    """diffusers' own offload (``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``) onto ``device``:
    the modules stay on the CPU and move to ``device`` when they run. attnctrl's processors and method states follow
    the modules' devices. (The CPU is accepted here so that tests can check the hooks on a machine without a GPU.)"""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise AttnCtrlError(f"unknown offload {mode!r}; use model or sequential")
    pipe.attnctrl_offload = mode


#: diffusers attention backends that run on the CPU (the others need CUDA and their own package).
CPU_BACKENDS = ("native", "_native_math", "flex")


def check_attention_backend(backend: str | None, device: torch.device) -> str | None:
    """``None``/``"auto"`` (diffusers' active backend, native SDPA unless changed) or a backend of diffusers'
    attention dispatcher that can run here (its package installed, a GPU where it needs one); else one clear error."""
    if backend in (None, "", "auto"):
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = [b.value for b in AttentionBackendName]
    if backend not in names:
        public = ", ".join(n for n in names if not n.startswith("_"))
        raise AttnCtrlError(f"unknown attention backend {backend!r}; use auto or one of diffusers': {public}")
    if device.type == "cpu" and backend not in CPU_BACKENDS:
        raise AttnCtrlError(f"attention backend {backend!r} runs on a GPU only; on the CPU use auto, native or flex")
    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (RuntimeError, ImportError) as e:
        raise AttnCtrlError(f"attention backend {backend!r} cannot run here: {_first_line(e)}") from None
    return backend


def set_attention_backend(pipe, backend: str) -> None:
    """``set_attention_backend`` on the pipeline's denoiser: its diffusers processors that take a backend, and every
    attnctrl processor's plain attention, use it (a UNet's stock ``AttnProcessor2_0`` calls SDPA whatever is set)."""
    from ..core.families import denoiser_of

    denoiser = denoiser_of(pipe)
    try:
        with quiet_libraries():
            denoiser.set_attention_backend(backend)
    except Exception as e:
        raise AttnCtrlError(f"attention backend {backend!r} could not be set: {_first_line(e)}") from e
    pipe.attnctrl_attention_backend = backend


def load_pipeline(model: str | None = None, dtype=None, device=None, offload: str | None = None,
                  attention_backend: str | None = None):
    """Load a diffusers pipeline from any supported reference (see the module docstring).

    ``dtype``: ``"fp32"``, ``"fp16"``, ``"bf16"``, a ``torch.dtype`` or ``None``/``"auto"`` (the checkpoint's family
    decides: bf16 for FLUX and CogVideoX on CUDA, fp16 otherwise, fp32 on the CPU); ``device``: ``"cpu"``,
    ``"cuda"``, ... or ``None``/``"auto"``; ``offload``: ``None``, ``"model"`` or ``"sequential"`` (diffusers' CPU
    offload onto the GPU ``device``, for checkpoints larger than its memory); ``attention_backend``: ``None`` or a
    backend of diffusers' dispatcher (``"native"``, ``"flash"``, ``"sage"``, ``"xformers"``, ...), see
    :func:`set_attention_backend`. Errors are one clear sentence.
    """
    model = str(model or DEFAULT_MODEL).strip()
    target = resolve_device(device)
    mode = check_offload(offload, target)
    backend = check_attention_backend(attention_backend, target)
    torch_dtype = parse_dtype(dtype, target, family_of(model))
    pipe = _load(model, torch_dtype)
    settings = model_folder(model) / "attnctrl.json"
    if settings.is_file():
        pipe.attnctrl_defaults = json.loads(settings.read_text()).get("recommended", {})
    if pipe.dtype != torch_dtype:
        with quiet_libraries():
            pipe = pipe.to(dtype=torch_dtype)
    if backend is not None:
        set_attention_backend(pipe, backend)
    if mode is not None:
        enable_offload(pipe, mode, target)
    elif pipe.device != target:
        pipe = pipe.to(target)
    pipe.attnctrl_model_id = model
    return pipe
