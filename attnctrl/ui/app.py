"""The attnctrl web app: one ``gr.Blocks`` with a tab per method over a shared model, prompt and output area.

The work is done by the run layer, as for ``attnctrl generate`` (:func:`attnctrl.run.validate`, then
:func:`attnctrl.run.generate`): the app only turns widget values into a :class:`~attnctrl.run.Request` (method name,
options, inputs as job-file objects), so a picture made here can be re-made from its PNG metadata with the CLI. Every output is a file in the app's output folder,
written with its metadata, so the gallery's download button gives the PNG with its settings.

Errors a user can fix (a bad mask, a missing LoRA, a model that is not available offline, a prompt without the
named word) come back as ``gr.Error`` messages in the page; anything else is logged and shown as an internal error.
The server keeps running either way. One generation runs at a time (``concurrency_limit=1``); :meth:`App.stop`
ends it after its current denoising step (the run layer's ``should_stop``), saving nothing of it. The inputs a run
used are copied next to its outputs by the run layer (``inputs/<sha256-12>.png``), so the output folder re-makes
them anywhere (``attnctrl generate --from OUT.png``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import AttnCtrlError, Stopped
from ..models.loading import DEFAULT_MODEL, EMBEDDED_MODELS
from ..models.tiny import TINY_FAMILIES

__all__ = ["Settings", "Result", "App", "build_app", "launch", "MODEL_CHOICES", "editor_inputs", "default_options"]

logger = logging.getLogger("attnctrl.ui")

#: Models offered in the model box (any local folder or cached hub id can be typed in too).
MODEL_CHOICES = [*EMBEDDED_MODELS, *(f"tiny-{family}" for family in TINY_FAMILIES)]
SLOTS = 3  # reference / subject / LoRA slots per tab
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@dataclass
class Settings:
    """The controls shared by every tab. ``None`` steps / guidance / size mean the model's recommended values."""

    model: str = DEFAULT_MODEL
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    randomize: bool = False
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    count: int = 1
    compare: bool = False  # also generate without the method, same seed (before/after)
    num_frames: int | None = None  # video models: frames per clip (a multi-prompt method: per segment)
    offload: str = "none"  # diffusers' CPU offload onto the GPU: none, model or sequential (reloads the model)
    attention_backend: str = "auto"  # diffusers' attention backend for plain attention (reloads the model)
    speedups: dict = field(default_factory=dict)  # speed-up plugin name -> its options, applied beside the tab


@dataclass
class Result:
    """What one press of Generate returns."""

    images: list[tuple[str, str]] = field(default_factory=list)  # (path, caption with the seed)
    video: str | None = None
    before_after: tuple[str, str] | None = None
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # maps and masks (path, caption)
    files: list[str] = field(default_factory=list)  # everything written, for download
    seed: int = 0
    info: str = ""
    stopped: bool = False  # Stop was pressed: ``info`` says after which step; nothing of that run was saved


def _number(value, name: str, kind=float, minimum=None, maximum=None):
    """A widget number, or None when empty; a clear error when it is not a finite number in range."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise AttnCtrlError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(float(number)):
        raise AttnCtrlError(f"{name} must be a finite number, got {value!r}")
    if kind is int and float(value) != number:
        raise AttnCtrlError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise AttnCtrlError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and number > maximum:
        raise AttnCtrlError(f"{name} must be at most {maximum}, got {value}")
    return number


class App:
    """The app's state: the output folder and the loaded pipeline (one model at a time, loaded lazily)."""

    def __init__(self, model: str | None = None, output: str | Path | None = None, device: str = "auto",
                 dtype: str = "auto"):
        self.default_model = model or DEFAULT_MODEL
        self.output = Path(output) if output else Path(tempfile.mkdtemp(prefix="attnctrl-ui-"))
        self.output.mkdir(parents=True, exist_ok=True)
        self.uploads: Path | None = None  # uploaded images, until a run copies them next to its outputs
        self.device, self.dtype = device, dtype
        self._pipe = None
        self._model_id: str | None = None
        self._runtime: tuple = (None, None)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- models ---------------------------------------------------------------------------------------------------
    def pipeline(self, model: str | None, offload: str | None = None, attention_backend: str | None = None):
        """The pipeline of ``model`` with ``offload`` and ``attention_backend`` (the previous one is released first,
        to keep one model in memory; other runtime settings reload it)."""
        from ..models.loading import load_pipeline

        model = (model or "").strip() or self.default_model
        runtime = (_setting(offload, "none"), _setting(attention_backend, "auto"))
        if self._model_id != model or self._runtime != runtime:
            self._pipe, self._model_id = None, None  # a failed load leaves no stale name behind
            self._pipe = load_pipeline(model, dtype=self.dtype, device=self.device, offload=runtime[0],
                                       attention_backend=runtime[1])
            self._pipe.set_progress_bar_config(disable=False, leave=False, desc="steps")
            self._model_id, self._runtime = model, runtime
        return self._pipe

    # -- uploaded inputs ------------------------------------------------------------------------------------------
    def save_input(self, image: Image.Image, kind: str) -> str:
        """Write an uploaded image (or mask) to the app's upload folder by content hash (a run copies what it used
        next to its outputs, and its record names that copy)."""
        if self.uploads is None:
            self.uploads = Path(tempfile.mkdtemp(prefix="attnctrl-uploads-"))
        folder = self.uploads
        digest = hashlib.sha256(image.tobytes() + str(image.size).encode()).hexdigest()[:16]
        path = folder / f"{kind}-{digest}.png"
        if not path.exists():
            image.save(path)
        return str(path)

    def editor_reference(self, value, index: int, label: str) -> tuple[str, str | None] | None:
        """``(image path, mask path or None)`` from an image editor value; None when the slot is empty."""
        pair = editor_inputs(value, f"{label} {index + 1}")
        if pair is None:
            return None
        image, mask = pair
        return self.save_input(image, "image"), (self.save_input(mask, "mask") if mask is not None else None)

    # -- generation -----------------------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Ask the running generation to stop after its current denoising step; False when none is running."""
        if not self._lock.locked():
            return False
        self._stop.set()
        return True

    def generate(self, settings: Settings, method: str | None = None, options: dict | None = None,
                 inputs: dict | None = None) -> Result:
        """Generate ``settings.count`` outputs with ``method`` (a registered name or None), its ``options`` and its
        ``inputs`` (kind -> job-file objects); everything is validated before the model loads."""
        from ..run import Request, generate, validate

        prompt = (settings.prompt or "").strip()
        if not prompt:
            raise AttnCtrlError("write a prompt first")
        many = method is not None and _entry(method).prompts == "many"
        prompts = [p.strip() for p in prompt.splitlines() if p.strip()] if many else [prompt]
        count = _number(settings.count, "Batch count", int, 1) or 1
        seed = random.SystemRandom().randrange(2**32) if settings.randomize else (
            _number(settings.seed, "Seed", int, 0) or 0)
        request = Request(
            prompts=prompts, model=(settings.model or "").strip() or self.default_model, method=method,
            options=options or {}, inputs=inputs or {}, plugins=tuple(settings.speedups.items()),
            negative_prompt=(settings.negative_prompt or "").strip() or None, seed=seed,
            steps=_number(settings.steps, "Steps", int, 1, 1000), guidance=_number(settings.guidance, "Guidance", float, 0),
            width=_number(settings.width, "Width", int, 8), height=_number(settings.height, "Height", int, 8),
            num_images=count, output=self.output, device=self.device, dtype=self.dtype,
            num_frames=_number(settings.num_frames, "Frames", int, 1),
            offload=_setting(settings.offload, "none"),
            attention_backend=_setting(settings.attention_backend, "auto"),
        )
        plan = validate(request)
        result = Result(seed=seed)
        started = time.perf_counter()
        with self._lock:
            self._stop.clear()
            try:
                pipe = self.pipeline(request.model, request.offload, request.attention_backend)
                for out in generate(plan, pipe=pipe, should_stop=self._stop):
                    result.files.append(str(out.path))
                    if out.kind == "image":
                        result.images.append((str(out.path), f"seed {out.seed}"))
                    elif out.kind == "video":
                        result.video = str(out.path)
                    elif out.kind == "artifact":
                        result.artifacts.append((str(out.path), f"{out.name} (seed {out.seed})"))
                seconds = time.perf_counter() - started
                if settings.compare and (method is not None or plan.plugins):
                    result.before_after = self._before(result, request, prompts[0], seed, pipe)
            except Stopped as e:
                kept = f" ({len(result.images)} earlier output(s) kept)" if result.images else ""
                result.stopped, result.info = True, f"**{e}**{kept}."
                return result
            finally:
                self._stop.clear()
        names = ([method] if method is not None else []) + [p.name for p in plan.plugins]
        result.info = (f"**{len(result.images) or (1 if result.video else 0)} output(s)** with "
                       f"{' + '.join(names) or 'no method'} on `{self._model_id}`, seed {seed}"
                       f"{f'..{seed + count - 1}' if count > 1 else ''}, {seconds:.1f} s: "
                       f"`{Path(result.files[0]).name if result.files else ''}` ... in `{self.output}`.")
        return result


    def _before(self, result: Result, request, prompt: str, seed: int, pipe) -> tuple[str, str]:
        """The before/after pair: the first output, and the same seed without the method (saved under
        ``without-method``)."""
        from ..run import Request, generate, validate

        if result.video is not None:
            raise AttnCtrlError("before/after is for images; untick it for videos")
        plain = Request(prompts=[prompt], model=request.model, negative_prompt=request.negative_prompt, seed=seed,
                        steps=request.steps, guidance=request.guidance, width=result_size(result, request.width, 0),
                        height=result_size(result, request.height, 1), output=self.output / "without-method",
                        device=self.device, dtype=self.dtype)
        before = next(o for o in generate(validate(plain), pipe=pipe, should_stop=self._stop) if o.kind == "image")
        result.files.append(str(before.path))
        return str(before.path), result.images[0][0]


def _entry(name: str):
    from ..methods import entry

    return entry(name)


def result_size(result: Result, given, axis: int):
    """The before image must match the after image's size (a method may pick it from its references)."""
    if not result.images:
        return given
    with Image.open(result.images[0][0]) as im:
        return im.size[axis]


def editor_inputs(value, label: str) -> tuple[Image.Image, Image.Image | None] | None:
    """``(RGB image, L mask or None)`` from a ``gr.ImageEditor`` value (or a plain image / path).

    The mask is where the user painted (the union of the layers' alpha); no paint means no mask (the whole image)."""
    if value is None:
        return None
    if isinstance(value, (str, Path, Image.Image)):  # a plain image: no painted layers
        value = {"background": value, "layers": []}
    if not isinstance(value, dict):
        raise AttnCtrlError(f"{label}: unexpected image value {type(value).__name__}")
    background = value.get("background")
    if background is None:
        if value.get("layers"):
            raise AttnCtrlError(f"{label}: a mask was painted but no image was uploaded")
        return None
    image = _as_image(background, label)
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(_as_image(layer, label, "RGBA"))[..., 3]
        if alpha.shape != (image.height, image.width):
            raise AttnCtrlError(f"{label}: the painted mask is {alpha.shape[1]}x{alpha.shape[0]} but the image is "
                                f"{image.width}x{image.height}")
        painted = alpha > 0
        mask = painted if mask is None else mask | painted
    if mask is not None and not mask.any():
        mask = None
    return image.convert("RGB"), (Image.fromarray((mask * 255).astype(np.uint8)) if mask is not None else None)


def _as_image(value, label: str, mode: str = "RGBA") -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert(mode)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value).convert(mode)
    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as im:
                return im.convert(mode)
        except OSError as e:
            raise AttnCtrlError(f"{label}: cannot read image {value}: {e}") from None
    raise AttnCtrlError(f"{label}: unexpected image value {type(value).__name__}")


def default_options(name: str) -> str:
    """Markdown table of a method's options and defaults (shown under 'More options')."""
    rows = [f"| `{f.name}` | `{f.default!r}` | {f.metadata.get('help', '')} |" for f in _entry(name).options]
    return "| option | default | meaning |\n|---|---|---|\n" + "\n".join(rows)


def build_app(app: App | None = None):
    """The ``gr.Blocks`` of the web app (see :mod:`attnctrl.ui.tabs`)."""
    from .tabs import build

    return build(app or App())


def launch(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           output: str | None = None, device: str = "auto", dtype: str = "auto", **kwargs):
    """Start the app (blocks until stopped unless ``prevent_thread_lock=True``)."""
    app = App(model, output, device, dtype)
    demo = build_app(app)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(app.output)],
                       **kwargs)


def _setting(value: str | None, off: str) -> str | None:
    """A runtime choice of the Advanced settings, ``None`` for its default (``off``, empty or never shown)."""
    return None if value in (None, "", off) else value
