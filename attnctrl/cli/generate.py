"""``attnctrl generate``: load a model, optionally apply a method, generate, write files with metadata."""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import torch

from ..core.controller import Method
from ..core.errors import AttnCtrlError
from .runners import MethodInputs, check_text, prepare

__all__ = ["GenerateRequest", "Output", "run_generate", "slug", "settings_record", "writable_folder"]


@dataclass
class GenerateRequest:
    prompts: tuple[str, ...]
    model: str | None = None
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    num_frames: int | None = None
    output: Path = Path("outputs")
    device: str = "auto"
    dtype: str = "auto"
    metadata: bool = True
    method: Method | None = None
    references: tuple[str, ...] = ()  # "IMAGE[:MASK][:PROMPT]" specs for reference-based methods
    subjects: tuple[str, ...] = ()  # "WORD=IMAGE[:MASK][:PROMPT][@REGION]" or "WORD=reference prompt[@REGION]"
    loras: tuple[str, ...] = ()  # "PATH:WORD:PROMPT" for CLoRA
    composition: dict | None = None  # PrimeComposer: background, reference, reference_mask, box (x, y, w, h)
    gif: bool = False  # videos: also write a GIF
    plugins: tuple[Method, ...] = ()  # further plugin methods applied beside ``method`` (AgentAttention, CLEAR)


@dataclass(frozen=True)
class Output:
    """One written file: ``kind`` is ``image``, ``video``, ``gif``, ``metadata`` or ``artifact`` (named ``name``)."""

    path: Path
    kind: str
    seed: int
    name: str = ""


def writable_folder(folder: Path) -> Path:
    """Create ``folder`` and check that files can be written there (before any generation), else a clear error."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise AttnCtrlError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None
    return folder


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe lower-case slug of a prompt (no spaces or quotes)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:length].rstrip("-") or "image"


def _next_counter(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := re.match(r"^(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def _call_defaults(pipe) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _spec(item):
    """A reference / subject for the JSON record: a spec string as given, or an object's fields (paths as text)."""
    if isinstance(item, str):
        return item
    out = {}
    for f in fields(item):
        v = getattr(item, f.name)
        if is_dataclass(v):
            v = _spec(v)
        elif isinstance(v, os.PathLike):
            v = os.fspath(v)
        elif not isinstance(v, (str, int, float, tuple, list, type(None))):
            v = f"<{type(v).__name__}>"  # an in-memory image or mask
        out[f.name] = v
    return out


def settings_record(request: GenerateRequest, pipe, seed: int, steps, guidance, size, extra: dict) -> dict:
    """The JSON record stored in each output (enough to reproduce it)."""
    import diffusers

    from .. import __version__

    method = request.method
    return {
        "prompt": request.prompts[0] if len(request.prompts) == 1 else list(request.prompts),
        "negative_prompt": request.negative_prompt or "",
        "steps": steps,
        "sampler": type(pipe.scheduler).__name__,
        "guidance_scale": guidance,
        "seed": seed,
        "width": size[0],
        "height": size[1],
        "model": getattr(pipe, "attnctrl_model_id", None),
        "method": method.name if method is not None else None,
        "method_options": asdict(method) if method is not None else None,
        "references": [_spec(r) for r in request.references] or None,
        "subjects": [_spec(s) for s in request.subjects] or None,
        "loras": list(request.loras) or None,
        "composition": request.composition,
        "plugins": [{"method": p.name, "options": asdict(p)} for p in request.plugins] or None,
        "scheduler_config": {k: v for k, v in sorted(dict(pipe.scheduler.config).items()) if not k.startswith("_")},
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "versions": {"attnctrl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        **extra,
    }


def run_generate(request: GenerateRequest, pipe=None) -> Iterator[Output]:
    """Generate ``request.num_images`` outputs; yields each written file (images, videos, method artifacts).

    ``pipe``: an already loaded pipeline (else ``request.model`` is loaded)."""
    from tqdm.auto import tqdm

    from .. import load_pipeline
    from ..io import save_gif, save_json, save_png, save_video
    from ..models import recommended_settings

    if pipe is None:
        pipe = load_pipeline(request.model, dtype=request.dtype, device=request.device)
    pipe.set_progress_bar_config(disable=False, leave=False, desc="steps")
    defaults = {**_call_defaults(pipe), **recommended_settings(pipe)}
    is_video = "num_frames" in defaults
    for i, prompt in enumerate(request.prompts):
        label = "the prompt" if len(request.prompts) == 1 else f"prompt {i + 1}"
        if not check_text(prompt, label).strip():  # as the batch runner and the app
            raise AttnCtrlError(f"{label} is empty: write what to draw")
    if request.guidance is not None and not math.isfinite(request.guidance):
        raise AttnCtrlError(f"--guidance must be a finite number, got {request.guidance}")
    kwargs = {"prompt": request.prompts[0]}
    if request.negative_prompt:
        check_text(request.negative_prompt, "the negative prompt")
        if "negative_prompt" not in defaults:
            raise AttnCtrlError(f"{type(pipe).__name__} does not take a negative prompt")
        kwargs["negative_prompt"] = request.negative_prompt
    steps = request.steps or defaults.get("num_inference_steps", 50)
    guidance = request.guidance if request.guidance is not None else defaults.get("guidance_scale")
    kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    for name, value in (("width", request.width), ("height", request.height)):
        value = value if value is not None else defaults.get(name)
        if value is not None:
            if value % 8:
                raise AttnCtrlError(f"{name} must be a multiple of 8, got {value}")
            kwargs[name] = value
    if request.num_frames is not None:
        if not is_video:
            raise AttnCtrlError(f"--num-frames is for video models; {type(pipe).__name__} makes images")
        kwargs["num_frames"] = request.num_frames

    inputs = MethodInputs(list(request.prompts), list(request.references), list(request.subjects),
                          list(request.loras), request.composition)
    prepared = prepare(pipe, request.method, inputs, plugins=request.plugins)
    fresh = not request.output.exists()
    writable_folder(request.output)
    counter = _next_counter(request.output)
    try:
        for i in tqdm(range(request.num_images), desc="images", disable=request.num_images == 1):
            seed = (request.seed + i) % 2**32
            generator = torch.Generator("cpu").manual_seed(seed)
            out = prepared.generate(**kwargs, generator=generator, output_type="pil")
            stem = f"{counter + i:05d}-{seed}-{slug(request.prompts[0])}"
            if is_video:
                frames = out.frames[0]
                size = frames[0].size
                record = settings_record(request, pipe, seed, steps, guidance, size,
                                         {"num_frames": len(frames)})
                yield Output(save_video(request.output / f"{stem}.mp4", frames), "video", seed)
                if request.gif:
                    yield Output(save_gif(request.output / f"{stem}.gif", frames), "gif", seed)
                if request.metadata:
                    yield Output(save_json(request.output / f"{stem}.json", record), "metadata", seed)
                continue
            image = out.images[0]
            record = settings_record(request, pipe, seed, steps, guidance, image.size, {})
            yield Output(save_png(request.output / f"{stem}.png", image, record, metadata=request.metadata), "image", seed)
            for name, artifact in prepared.artifacts(image).items():
                path = save_png(request.output / f"{stem}-{name}.png", artifact, record, metadata=request.metadata)
                yield Output(path, "artifact", seed, name)
    finally:
        prepared.close()
        if fresh and not any(request.output.iterdir()):  # a failed first generation leaves no empty folder
            request.output.rmdir()
