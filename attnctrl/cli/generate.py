"""``attnctrl generate``: load a model, optionally apply a method, generate, write files with metadata."""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..core.controller import Method
from ..core.errors import AttnCtrlError

__all__ = ["GenerateRequest", "run_generate", "slug", "settings_record"]


@dataclass
class GenerateRequest:
    prompt: str
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


def parse_reference(spec: str, index: int):
    """``IMAGE[:MASK][:PROMPT]`` -> :class:`~attnctrl.pipelines.Reference` (the prompt may contain colons)."""
    from ..pipelines import Reference

    image, _, rest = spec.partition(":")
    mask, _, prompt = rest.partition(":")
    if not image:
        raise AttnCtrlError(f"--ref {spec!r}: give IMAGE[:MASK][:PROMPT]")
    for label, path in (("image", image), ("mask", mask)):
        if path and not Path(path).is_file():
            raise AttnCtrlError(f"--ref {index + 1}: {label} file {path} does not exist")
    return Reference(image, mask or None, prompt, name=Path(image).name)


def clora_inputs(prompt: str, specs) -> tuple[list, list, list, list]:
    """Prompts, LoRAs, concepts and mask words of CLoRA from ``--prompt`` and ``--lora PATH:WORD:PROMPT`` specs.

    Branch 0 is ``--prompt`` without a LoRA. LoRA k's concept is its trigger ``WORD`` (e.g. "sks dog") in its own
    prompt and the word's last word (its class noun, "dog") in every other prompt that contains it; its mask is WORD.
    """
    prompts, loras, words = [prompt], [None], []
    for i, spec in enumerate(specs):
        path, _, rest = spec.partition(":")
        word, _, lora_prompt = rest.partition(":")
        if not path or not word.strip() or not lora_prompt.strip():
            raise AttnCtrlError(f"--lora {spec!r}: give PATH:WORD:PROMPT, e.g. dog.safetensors:sks dog:a sks dog")
        if not Path(path).is_file():
            raise AttnCtrlError(f"--lora {i + 1}: LoRA file {path} does not exist")
        prompts.append(lora_prompt.strip())
        loras.append(path)
        words.append(word.strip())
    concepts = []
    for k, word in enumerate(words):
        noun = word.split()[-1]
        row = []
        for j, p in enumerate(prompts):
            if j == k + 1:
                row.append(word)
            else:
                row.append(noun if re.search(rf"\b{re.escape(noun)}\b", p, flags=re.IGNORECASE) else None)
        concepts.append(row)
    mask_words = [[]] + [[w] for w in words]
    return prompts, loras, concepts, mask_words


def parse_subject(spec: str, index: int):
    """``WORD=IMAGE[:MASK][:PROMPT][@REGION]`` or ``WORD=reference prompt[@REGION]`` -> a ``Subject``.

    ``REGION`` is a box ``x0,y0,x1,y1`` (pixels or fractions) or a mask file."""
    from ..pipelines import Subject

    word, eq, rest = spec.partition("=")
    if not eq or not word.strip() or not rest.strip():
        raise AttnCtrlError(f"--subject {spec!r}: give WORD=IMAGE[:MASK][:PROMPT][@REGION] or WORD=prompt")
    region = None
    body, at, tail = rest.rpartition("@")
    if at:
        parts = tail.split(",")
        if len(parts) == 4:
            try:
                region = tuple(float(p) for p in parts)
            except ValueError:
                raise AttnCtrlError(f"--subject {index + 1}: region {tail!r} is not x0,y0,x1,y1") from None
        elif Path(tail).is_file():
            region = tail
        else:
            raise AttnCtrlError(f"--subject {index + 1}: region {tail!r} is neither a box x0,y0,x1,y1 nor a mask file")
        rest = body
    image = rest.split(":", 1)[0]
    if Path(image).is_file():
        return Subject(word.strip(), reference=parse_reference(rest, index), region=region)
    return Subject(word.strip(), prompt=rest.strip(), region=region)


def settings_record(request: GenerateRequest, pipe, seed: int, steps, guidance, size, extra: dict) -> dict:
    """The JSON record stored in each output (enough to reproduce it)."""
    import diffusers

    from .. import __version__

    method = request.method
    return {
        "prompt": request.prompt,
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
        "references": list(request.references) or None,
        "subjects": list(request.subjects) or None,
        "loras": list(request.loras) or None,
        "composition": request.composition,
        "scheduler_config": dict(pipe.scheduler.config),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "versions": {"attnctrl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        **extra,
    }


def run_generate(request: GenerateRequest) -> Iterator[Path]:
    """Generate ``request.num_images`` outputs; yields each written path (images, videos, method artifacts)."""
    from tqdm.auto import tqdm

    from .. import apply, load_pipeline
    from ..io import save_json, save_png, save_video
    from ..models import recommended_settings

    pipe = load_pipeline(request.model, dtype=request.dtype, device=request.device)
    pipe.set_progress_bar_config(disable=False, leave=False, desc="steps")
    defaults = {**_call_defaults(pipe), **recommended_settings(pipe)}
    is_video = "num_frames" in defaults
    kwargs = {"prompt": request.prompt}
    if request.negative_prompt:
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
                raise AttnCtrlError(f"--{name} must be a multiple of 8, got {value}")
            kwargs[name] = value
    if request.num_frames is not None:
        if not is_video:
            raise AttnCtrlError(f"--num-frames is for video models; {type(pipe).__name__} makes images")
        kwargs["num_frames"] = request.num_frames

    method = request.method
    handle = None
    generate = pipe
    if method is not None and method.name == "primecomposer":
        from ..pipelines import PrimeComposerPipeline

        comp = request.composition or {}
        missing = [k for k in ("background", "reference", "box") if not comp.get(k)]
        if missing:
            raise AttnCtrlError("primecomposer needs --background, --reference and --box x,y,w,h (missing: "
                                + ", ".join("--" + m for m in missing) + ")")
        for key in ("background", "reference", "reference_mask"):
            if comp.get(key) and not Path(comp[key]).is_file():
                raise AttnCtrlError(f"--{key.replace('_', '-')} file {comp[key]} does not exist")
        x, y, w, h = comp["box"]
        options = {f.name: getattr(method, f.name) for f in fields(method) if f.name != "layers"}
        composer = PrimeComposerPipeline.from_pipe(pipe)

        def generate(prompt, **kw):
            kw.pop("negative_prompt", None)
            return composer(comp["background"], comp["reference"], comp.get("reference_mask"),
                            location=(x, y, x + w, y + h), prompt=prompt, **kw, **options)
    elif request.composition:
        raise AttnCtrlError("--background/--reference/--box are for --method primecomposer")
    elif method is not None and method.name == "clora":
        from ..pipelines import CLoRAPipeline

        if not request.loras:
            raise AttnCtrlError("clora needs --lora PATH:WORD:PROMPT (one per LoRA)")
        prompts, loras, concepts, mask_words = clora_inputs(request.prompt, request.loras)
        options = {f.name: getattr(method, f.name) for f in fields(method) if f.name != "layers"}
        clora = CLoRAPipeline.from_pipe(pipe)
        for path in loras[1:]:
            clora.load_lora(path)  # a missing or mismatched file fails now, before any generation

        def generate(prompt, **kw):
            kw.pop("num_images_per_prompt", None)
            return clora(prompts, loras, concepts, mask_words, **kw, **options)
    elif request.loras:
        raise AttnCtrlError("--lora is for --method clora")
    elif method is not None and method.name == "irdiffusion":
        from ..pipelines import IRDiffusionPipeline

        if not request.subjects:
            raise AttnCtrlError("irdiffusion needs --subject WORD=IMAGE[:MASK][:PROMPT][@REGION] (or WORD=prompt)")
        subjects = [parse_subject(spec, i) for i, spec in enumerate(request.subjects)]
        options = {f.name: getattr(method, f.name) for f in fields(method)}
        generate = functools.partial(IRDiffusionPipeline.from_pipe(pipe), subjects=subjects, **options)
    elif request.subjects:
        raise AttnCtrlError("--subject is for --method irdiffusion")
    elif method is not None and getattr(method, "pipeline", None):
        from .. import pipelines

        if not request.references:
            raise AttnCtrlError(f"{method.name} needs reference images: --ref IMAGE[:MASK][:PROMPT]")
        references = [parse_reference(spec, i) for i, spec in enumerate(request.references)]
        for i, ref in enumerate(references):
            ref.load(i)  # a bad image or mask fails now, before any generation
        wrapper = getattr(pipelines, method.pipeline).from_pipe(pipe)
        options = {f.name: getattr(method, f.name) for f in fields(method)}
        generate = functools.partial(wrapper, references=references, **options)
    elif request.references:
        raise AttnCtrlError("--ref is for reference-based methods (--method freecustom or magicface)")
    elif method is not None:
        handle = apply(pipe, method)
        try:
            handle.check_prompt(request.prompt)
        except Exception:
            handle.remove()
            raise
    request.output.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(request.output)
    try:
        for i in tqdm(range(request.num_images), desc="images", disable=request.num_images == 1):
            seed = (request.seed + i) % 2**32
            generator = torch.Generator("cpu").manual_seed(seed)
            started = time.perf_counter()
            out = generate(**kwargs, generator=generator, output_type="pil")
            seconds = time.perf_counter() - started
            stem = f"{counter + i:05d}-{seed}-{slug(request.prompt)}"
            if is_video:
                frames = out.frames[0]
                size = frames[0].size
                record = settings_record(request, pipe, seed, steps, guidance, size,
                                         {"num_frames": len(frames), "seconds": round(seconds, 3)})
                yield save_video(request.output / f"{stem}.mp4", frames)
                if request.metadata:
                    yield save_json(request.output / f"{stem}.json", record)
                continue
            image = out.images[0]
            record = settings_record(request, pipe, seed, steps, guidance, image.size, {"seconds": round(seconds, 3)})
            yield save_png(request.output / f"{stem}.png", image, record, metadata=request.metadata)
            if handle is not None:
                for name, artifact in handle.artifacts(0, image=image).items():
                    yield save_png(request.output / f"{stem}-{name}.png", artifact, record, metadata=request.metadata)
    finally:
        if handle is not None:
            handle.remove()
