"""From a validated :class:`~attnctrl.run.request.Plan` and a loaded pipeline to outputs with their records.

:class:`Session` binds a plan to a pipeline (the plugins applied, the method's pipeline built ``from_pipe``, the
checks that need the model done) and makes one output per seed; :func:`generate` writes each output (PNG with
metadata, or MP4) and the method's maps and masks, and yields :class:`Output` records. A result that is not finite
is an error, never a saved success. Every surface (command line, job files, web app) generates through here.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.controller import apply
from ..core.errors import AttnCtrlError, Stopped
from ..core.families import denoiser_of
from ..inputs import KINDS
from ..io.metadata import sampler_name
from .request import Plan, check_size, plain, writable_folder

__all__ = ["Output", "Result", "Session", "generate", "settings_record", "slug", "load", "keep_inputs", "Stopped"]


@dataclass(frozen=True)
class Output:
    """One written file: ``kind`` is ``image``, ``video``, ``gif``, ``metadata`` or ``artifact`` (named ``name``)."""

    path: Path
    kind: str
    seed: int
    name: str = ""


@dataclass
class Result:
    """One generation: ``images`` (PIL) or ``frames`` (a video's PIL frames), and the settings that made it."""

    seed: int
    images: list | None = None
    frames: list | None = None
    settings: dict | None = None
    requested: int | None = None  # the seed asked for, when the method used another (``seed``)


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe lower-case slug of a prompt (no spaces or quotes)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:length].rstrip("-") or "image"


def load(plan: Plan):
    """The pipeline of ``plan.request.model`` (see :func:`attnctrl.load_pipeline`)."""
    from ..models import load_pipeline

    r = plan.request
    return load_pipeline(r.model, dtype=r.dtype, device=r.device, offload=r.offload,
                         attention_backend=r.attention_backend)


#: call settings every surface sets itself (the rest of a model's recommended settings pass through)
_STANDARD = ("num_inference_steps", "guidance_scale", "width", "height", "num_frames")


def _call_defaults(pipe) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _to_pil(array: np.ndarray, what: str, session: Session) -> list:
    """The result as PIL images, or an error naming the likely cause when it is not finite (never a black PNG)."""
    from diffusers.utils import numpy_to_pil

    if not np.isfinite(array).all():
        causes = []
        if session.guidance is not None and session.guidance > 30:
            causes.append(f"the guidance {session.guidance:g} is very high")
        if "loras" in session.plan.inputs:
            causes.append("a LoRA may hold extreme weights")
        if session.pipe.dtype in (torch.float16, torch.bfloat16):
            causes.append(f"{str(session.pipe.dtype).replace('torch.', '')} overflowed (try --dtype fp32)")
        hint = "; ".join(causes) or "try --dtype fp32, a lower guidance or other method options"
        raise AttnCtrlError(f"the generated {what} is not finite (NaN or infinity), so nothing was saved: {hint}")
    return numpy_to_pil(array)


def native_size(pipe) -> int | None:
    """The model's native image side in pixels (from its denoiser's sample size), or None if unknown."""
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
    sample = getattr(pipe, "default_sample_size", None)
    denoiser = denoiser_of(pipe)
    config = getattr(denoiser, "config", {}) or {}
    if sample is None:
        sample = config.get("sample_size") or config.get("sample_height")
    if isinstance(sample, (tuple, list)):
        sample = max(sample)
    return int(sample * scale) if isinstance(sample, int) and isinstance(scale, int) else None


def size_multiple(pipe) -> int:
    """What every side must be a multiple of: the VAE's downsampling times the denoiser's patch (FLUX packs 2x2
    latents), and at least 8 (as :func:`attnctrl.models.size_rule` reads it before loading)."""
    from ..models.loading import side_multiple

    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None) or 8
    denoiser = denoiser_of(pipe)
    config = getattr(denoiser, "config", {}) or {}
    return side_multiple(scale, type(denoiser).__name__, config.get("patch_size"))


def _check_size(pipe, width, height) -> None:
    check_size(width, height, native_size(pipe), size_multiple(pipe))


def _check_prompt_length(pipe, prompts) -> None:
    """One warning per call when a prompt is longer than a text encoder of the model reads (the rest is cut)."""
    from ..errors import notice

    limit_t5 = _call_defaults(pipe).get("max_sequence_length")
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, attr, None)
        if tokenizer is None:
            continue
        limit = tokenizer.model_max_length
        if limit is None or limit > 100_000:  # a tokenizer without a limit: the pipeline's max_sequence_length
            limit = limit_t5
        if not limit:
            continue
        for prompt in prompts:
            if not prompt:
                continue
            count = len(tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids)
            if count > limit:
                notice(f"the prompt {prompt[:30] + '...'!r} is {count} tokens long but this model reads the first "
                       f"{limit}; the rest is ignored: shorten it")
                return


def stop_check(should_stop):
    """``should_stop`` as a function of no arguments: a ``threading.Event`` (its ``is_set``), a callable, or None."""
    if should_stop is None:
        return None
    if callable(getattr(should_stop, "is_set", None)):
        return should_stop.is_set
    if callable(should_stop):
        return should_stop
    raise AttnCtrlError(f"should_stop must be a threading.Event or a callable, not {type(should_stop).__name__}")


class _StepEnd:
    """The ``callback_on_step_end`` of a stoppable generation: it counts the steps done and, once ``should_stop()``
    is true, raises :class:`~attnctrl.core.errors.Stopped`, which ends the call (a method pipeline restores the
    shared components on the way out) before anything is decoded or saved."""

    def __init__(self, should_stop, total: int):
        self.should_stop, self.total, self.done = should_stop, total, 0

    def __call__(self, pipe, step: int, timestep, tensors: dict) -> dict:
        self.done = step + 1
        if self.should_stop():
            raise Stopped(self.done, self.total)
        return tensors


class Session:
    """A plan bound to a loaded pipeline; ``session(seed)`` makes one :class:`Result`. Use it as a context manager
    (or call :meth:`close`): the plugins come off and the shared pipeline is left as it was found.

    ``should_stop`` (a ``threading.Event`` or a function of no arguments) is asked after every denoising step and
    before every generation: once true, the generation ends with :class:`~attnctrl.core.errors.Stopped` ("Stopped
    after step k of n") and nothing of it is saved."""

    def __init__(self, plan: Plan, pipe, should_stop=None):
        self.plan, self.pipe = plan, pipe
        self.should_stop = stop_check(should_stop)
        self.kept: dict = {}  # (input file, output folder) -> its copy there (keep_inputs)
        self.handles: list = []
        self.pipeline = None
        request = plan.request
        recommended = _recommended(pipe)
        defaults = {**_call_defaults(pipe), **recommended}
        self.video = "num_frames" in defaults or (plan.entry is not None and plan.entry.video)
        if request.num_frames is not None and not self.video:
            raise AttnCtrlError(f"frames are for video models; {type(pipe).__name__} makes images")
        if request.negative_prompt and "negative_prompt" not in defaults:
            raise AttnCtrlError(f"{type(pipe).__name__} does not take a negative prompt")
        own = plan.entry.defaults if plan.entry is not None else {}
        defaults.update(own)  # the method's documented settings win over the model's and the base pipeline's
        self.steps = request.steps or defaults.get("num_inference_steps") or 50
        self.guidance = request.guidance if request.guidance is not None else defaults.get("guidance_scale")
        # the model's other recommended call settings (toyworld-flux: true_cfg_scale, negative_prompt "",
        # max_sequence_length 32) where the pipeline called takes them; a model whose guidance is true CFG (no
        # guidance embedding) is guided by true_cfg_scale, so --guidance sets that
        target = self._callee(plan, pipe)
        kwargs = {k: v for k, v in recommended.items() if k not in _STANDARD and k in target}
        kwargs["num_inference_steps"] = self.steps
        if self.guidance is not None:
            kwargs["true_cfg_scale" if "true_cfg_scale" in kwargs else "guidance_scale"] = self.guidance
        if request.negative_prompt:
            kwargs["negative_prompt"] = request.negative_prompt
        for name in ("width", "height"):
            value = getattr(request, name) if getattr(request, name) is not None else defaults.get(name)
            if value is not None:
                kwargs[name] = value
        if request.num_frames is not None:
            kwargs["num_frames"] = request.num_frames
        self.kwargs = kwargs
        self.stoppable = "callback_on_step_end" in target or "kwargs" in target
        _check_size(pipe, request.width, request.height)
        _check_prompt_length(pipe, [*plan.prompts, request.negative_prompt or ""])
        try:
            for plugin in plan.plugins:
                self.handles.append(apply(pipe, plugin))
            entry, config = plan.entry, plan.config
            if entry is not None and entry.pipeline is not None:
                self.pipeline = entry.pipeline_class().from_pipe(pipe)
                if entry.prepare is not None:
                    entry.prepare(self.pipeline, config, plan.prompts, plan.inputs)
            elif entry is not None:
                handle = apply(pipe, config)
                self.handles.append(handle)
                handle.check_prompt(plan.prompts[0])
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _callee(plan: Plan, pipe) -> set[str]:
        """The keyword arguments the pipeline that will be called takes (the method's, else the base pipeline's)."""
        if plan.entry is not None and plan.entry.pipeline is not None:
            return set(inspect.signature(plan.entry.pipeline_class().__call__).parameters)
        return set(inspect.signature(pipe.__call__).parameters)

    def __call__(self, seed: int) -> Result:
        plan = self.plan
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs = {**self.kwargs, "generator": generator, "output_type": "np"}
        if self.should_stop is not None:
            if self.should_stop():
                raise Stopped(0, self.steps)
            if self.stoppable:
                kwargs["callback_on_step_end"] = _StepEnd(self.should_stop, self.steps)
        try:
            if self.pipeline is not None:
                out = plan.entry.call(self.pipeline, plan.config, plan.prompts, plan.inputs, **kwargs)
            else:
                out = self.pipe(plan.prompts[0], **kwargs)
        except RuntimeError as e:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
            text = str(e)
            if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text:
                size = f"{kwargs.get('width', '')}x{kwargs.get('height', '')}".strip("x") or "this size"
                raise AttnCtrlError(f"out of memory generating {size} on {self.pipe.device}: try a smaller size, "
                                    f"fewer frames or --dtype fp16/bf16 on a GPU; nothing was saved") from None
            raise
        used = getattr(self.pipeline, "seed_used", None) if self.pipeline is not None else None
        used = seed if used is None else int(used)  # a method may move on to another seed (it warns)
        if self.video:
            return Result(used, frames=_to_pil(np.asarray(out.frames[0]), "video", self), requested=seed)
        return Result(used, images=_to_pil(np.asarray(out.images[:1]), "image", self), requested=seed)

    def artifacts(self, image) -> dict:
        """``{name: PIL image}``: the method's heat maps or masks of the last generation, blended over ``image``."""
        out = {}
        for handle in self.handles:
            out.update(handle.artifacts(0, image=image))
        masks = self.pipeline.shown_masks() if self.pipeline is not None else None
        if masks is not None:
            entry = self.plan.entry
            names = entry.mask_names(self.plan.config, self.plan.inputs) if entry.mask_names else []
            out.update(mask_overlays(image, masks, names))
        return out

    def close(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recommended(pipe) -> dict:
    from ..models import recommended_settings

    return recommended_settings(pipe)


def mask_overlays(image, masks, names) -> dict:
    """Each of ``masks`` ``(N, h, w)`` resized (nearest) to ``image`` and blended over it: ``{"mask-NAME": PIL}``."""
    from ..processors.attention_maps import heat_overlay

    m = torch.as_tensor(masks).float().cpu()[:, None]
    m = torch.nn.functional.interpolate(m, size=(image.height, image.width), mode="nearest")[:, 0].numpy()
    out = {}
    for i, mask in enumerate(m):
        name = names[i] if i < len(names) else str(i + 1)
        out[f"mask-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') or i + 1}"] = heat_overlay(image, mask, 0.5)
    return out


def settings_record(plan: Plan, session: Session, seed: int, size, extra: dict | None = None,
                    requested: int | None = None) -> dict:
    """The JSON record stored in each output: enough to reproduce it (``attnctrl batch`` re-runs a sidecar)."""
    import diffusers

    from .. import __version__

    request, pipe = plan.request, session.pipe
    return {
        "prompt": plan.prompts[0] if len(plan.prompts) == 1 else list(plan.prompts),
        "negative_prompt": request.negative_prompt or "",
        "steps": session.steps,
        "sampler": sampler_name(pipe.scheduler),
        "scheduler": type(pipe.scheduler).__name__,
        "guidance_scale": session.guidance,
        "seed": seed,
        **({"requested_seed": requested} if requested not in (None, seed) else {}),
        "width": size[0],
        "height": size[1],
        "model": getattr(pipe, "attnctrl_model_id", None),
        "method": plan.method,
        "method_options": plain(plan.config) if plan.config is not None else None,
        "inputs": {k: [KINDS[k].record(r) for r in v] for k, v in plan.inputs.items()} or None,
        "plugins": [{"method": p.name, "options": plain(p)} for p in plan.plugins] or None,
        "scheduler_config": {k: v for k, v in sorted(dict(pipe.scheduler.config).items()) if not k.startswith("_")},
        "device": str(getattr(pipe, "_execution_device", pipe.device)),
        **({"offload": pipe.attnctrl_offload} if getattr(pipe, "attnctrl_offload", None) else {}),
        **({"attention_backend": b} if (b := getattr(pipe, "attnctrl_attention_backend", None)) else {}),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "versions": {"attnctrl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        **(extra or {}),
    }


#: the fields of an input's JSON record that name a file (references, subjects, LoRAs, compositions)
_FILE_FIELDS = ("image", "mask", "path", "background", "object", "region")


def keep_inputs(records: dict | None, folder: Path, kept: dict | None = None) -> dict | None:
    """``records`` (input kind -> JSON records) with every input file copied next to the outputs, as
    ``folder/inputs/<sha256-12><suffix>``, and named by that path relative to ``folder``: the output folder then
    re-makes its outputs on any machine (:func:`~attnctrl.run.from_record` reads paths relative to the record's
    folder). ``kept`` caches the copies of one session."""
    from ..io.metadata import keep_file

    kept = {} if kept is None else kept

    def walk(value):
        if isinstance(value, dict):
            return {k: keep(v) if k in _FILE_FIELDS and isinstance(v, str) else walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    def keep(path: str) -> str:
        if not Path(path).is_file():  # a placeholder of an in-memory image
            return path
        key = (str(Path(path).resolve()), str(Path(folder).resolve()))
        if key not in kept:
            kept[key] = keep_file(path, folder)
        return kept[key]

    return walk(records) if records else records


def _next_counter(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := re.match(r"^(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def write(plan: Plan, session: Session, result: Result, folder: Path, stem: str, metadata: bool = True,
          gif: bool = False) -> Iterator[Output]:
    """Write one result as ``folder/stem.png`` (with the method's artifacts) or ``stem.mp4``; yields each file."""
    from ..io import save_gif, save_json, save_png, save_video

    if result.frames is not None:
        frames = result.frames
        record = settings_record(plan, session, result.seed, frames[0].size, {"num_frames": len(frames)},
                                 result.requested)
        if metadata:
            record["inputs"] = keep_inputs(record["inputs"], folder, session.kept)
        result.settings = record
        yield Output(save_video(folder / f"{stem}.mp4", frames), "video", result.seed)
        if gif:
            yield Output(save_gif(folder / f"{stem}.gif", frames), "gif", result.seed)
        if metadata:
            yield Output(save_json(folder / f"{stem}.json", record), "metadata", result.seed)
        return
    image = result.images[0]
    record = settings_record(plan, session, result.seed, image.size, requested=result.requested)
    if metadata:
        record["inputs"] = keep_inputs(record["inputs"], folder, session.kept)
    result.settings = record
    yield Output(save_png(folder / f"{stem}.png", image, record, metadata=metadata), "image", result.seed)
    for name, artifact in session.artifacts(image).items():
        path = save_png(folder / f"{stem}-{name}.png", artifact, record, metadata=metadata)
        yield Output(path, "artifact", result.seed, name)


def generate(plan: Plan, pipe=None, should_stop=None) -> Iterator[Output]:
    """Generate ``plan.request.num_images`` outputs (seeds ``seed``, ``seed + 1``, ...) into ``request.output``;
    yields each written file. ``pipe``: an already loaded pipeline (else the request's model is loaded);
    ``should_stop``: see :class:`Session` (the outputs finished before a stop stay)."""
    from tqdm.auto import tqdm

    request = plan.request
    folder = Path(request.output)
    fresh = not folder.exists()
    writable_folder(folder)
    try:
        if pipe is None:
            pipe = load(plan)
        pipe.set_progress_bar_config(disable=False, leave=False, desc="steps")
        with Session(plan, pipe, should_stop) as session:
            counter = _next_counter(folder)
            for i in tqdm(range(request.num_images), desc="images", disable=request.num_images == 1):
                seed = request.seed + i
                result = session(seed)
                stem = f"{counter + i:05d}-{seed}-{slug(plan.prompts[0])}"
                yield from write(plan, session, result, folder, stem, request.metadata, request.gif)
    finally:
        if fresh and folder.exists() and not any(folder.iterdir()):  # a failed first run leaves no empty folder
            folder.rmdir()
