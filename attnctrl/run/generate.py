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
from ..core.errors import AttnCtrlError
from ..inputs import KINDS
from .request import Plan, plain, writable_folder

__all__ = ["Output", "Result", "Session", "generate", "settings_record", "slug", "load"]


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


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe lower-case slug of a prompt (no spaces or quotes)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:length].rstrip("-") or "image"


def load(plan: Plan):
    """The pipeline of ``plan.request.model`` (see :func:`attnctrl.load_pipeline`)."""
    from ..models import load_pipeline

    return load_pipeline(plan.request.model, dtype=plan.request.dtype, device=plan.request.device)


def _call_defaults(pipe) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _to_pil(array: np.ndarray, what: str) -> list:
    from diffusers.utils import numpy_to_pil

    if not np.isfinite(array).all():
        raise AttnCtrlError(f"the {what} is not finite (NaN or infinity): try float32 (--dtype fp32) or other settings; "
                            f"nothing was saved")
    return numpy_to_pil(array)


class Session:
    """A plan bound to a loaded pipeline; ``session(seed)`` makes one :class:`Result`. Use it as a context manager
    (or call :meth:`close`): the plugins come off and the shared pipeline is left as it was found."""

    def __init__(self, plan: Plan, pipe):
        self.plan, self.pipe = plan, pipe
        self.handles: list = []
        self.pipeline = None
        request = plan.request
        defaults = {**_call_defaults(pipe), **_recommended(pipe)}
        self.video = "num_frames" in defaults or (plan.entry is not None and plan.entry.video)
        if request.num_frames is not None and not self.video:
            raise AttnCtrlError(f"frames are for video models; {type(pipe).__name__} makes images")
        if request.negative_prompt and "negative_prompt" not in defaults:
            raise AttnCtrlError(f"{type(pipe).__name__} does not take a negative prompt")
        self.steps = request.steps or defaults.get("num_inference_steps", 50)
        self.guidance = request.guidance if request.guidance is not None else defaults.get("guidance_scale")
        kwargs = {"num_inference_steps": self.steps}
        if self.guidance is not None:
            kwargs["guidance_scale"] = self.guidance
        if request.negative_prompt:
            kwargs["negative_prompt"] = request.negative_prompt
        for name in ("width", "height"):
            value = getattr(request, name) if getattr(request, name) is not None else defaults.get(name)
            if value is not None:
                kwargs[name] = value
        if request.num_frames is not None:
            kwargs["num_frames"] = request.num_frames
        self.kwargs = kwargs
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

    def __call__(self, seed: int) -> Result:
        plan = self.plan
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs = {**self.kwargs, "generator": generator, "output_type": "np"}
        if self.pipeline is not None:
            out = plan.entry.call(self.pipeline, plan.config, plan.prompts, plan.inputs, **kwargs)
        else:
            out = self.pipe(plan.prompts[0], **kwargs)
        if self.video:
            frames = _to_pil(np.asarray(out.frames[0]), "video")
            return Result(seed, frames=frames)
        return Result(seed, images=_to_pil(np.asarray(out.images[:1]), "image"))

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


def settings_record(plan: Plan, session: Session, seed: int, size, extra: dict | None = None) -> dict:
    """The JSON record stored in each output: enough to reproduce it (``attnctrl batch`` re-runs a sidecar)."""
    import diffusers

    from .. import __version__

    request, pipe = plan.request, session.pipe
    return {
        "prompt": plan.prompts[0] if len(plan.prompts) == 1 else list(plan.prompts),
        "negative_prompt": request.negative_prompt or "",
        "steps": session.steps,
        "sampler": type(pipe.scheduler).__name__,
        "guidance_scale": session.guidance,
        "seed": seed,
        "width": size[0],
        "height": size[1],
        "model": getattr(pipe, "attnctrl_model_id", None),
        "method": plan.method,
        "method_options": plain(plan.config) if plan.config is not None else None,
        "inputs": {k: [KINDS[k].record(r) for r in v] for k, v in plan.inputs.items()} or None,
        "plugins": [{"method": p.name, "options": plain(p)} for p in plan.plugins] or None,
        "scheduler_config": {k: v for k, v in sorted(dict(pipe.scheduler.config).items()) if not k.startswith("_")},
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "versions": {"attnctrl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        **(extra or {}),
    }


def _next_counter(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := re.match(r"^(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def write(plan: Plan, session: Session, result: Result, folder: Path, stem: str, metadata: bool = True,
          gif: bool = False) -> Iterator[Output]:
    """Write one result as ``folder/stem.png`` (with the method's artifacts) or ``stem.mp4``; yields each file."""
    from ..io import save_gif, save_json, save_png, save_video

    if result.frames is not None:
        frames = result.frames
        record = settings_record(plan, session, result.seed, frames[0].size, {"num_frames": len(frames)})
        result.settings = record
        yield Output(save_video(folder / f"{stem}.mp4", frames), "video", result.seed)
        if gif:
            yield Output(save_gif(folder / f"{stem}.gif", frames), "gif", result.seed)
        if metadata:
            yield Output(save_json(folder / f"{stem}.json", record), "metadata", result.seed)
        return
    image = result.images[0]
    record = settings_record(plan, session, result.seed, image.size)
    result.settings = record
    yield Output(save_png(folder / f"{stem}.png", image, record, metadata=metadata), "image", result.seed)
    for name, artifact in session.artifacts(image).items():
        path = save_png(folder / f"{stem}-{name}.png", artifact, record, metadata=metadata)
        yield Output(path, "artifact", result.seed, name)


def generate(plan: Plan, pipe=None) -> Iterator[Output]:
    """Generate ``plan.request.num_images`` outputs (seeds ``seed``, ``seed + 1``, ...) into ``request.output``;
    yields each written file. ``pipe``: an already loaded pipeline (else the request's model is loaded)."""
    from tqdm.auto import tqdm

    request = plan.request
    folder = Path(request.output)
    fresh = not folder.exists()
    writable_folder(folder)
    try:
        if pipe is None:
            pipe = load(plan)
        pipe.set_progress_bar_config(disable=False, leave=False, desc="steps")
        with Session(plan, pipe) as session:
            counter = _next_counter(folder)
            for i in tqdm(range(request.num_images), desc="images", disable=request.num_images == 1):
                seed = (request.seed + i) % 2**32
                result = session(seed)
                stem = f"{counter + i:05d}-{seed}-{slug(plan.prompts[0])}"
                yield from write(plan, session, result, folder, stem, request.metadata, request.gif)
    finally:
        if fresh and folder.exists() and not any(folder.iterdir()):  # a failed first run leaves no empty folder
            folder.rmdir()
