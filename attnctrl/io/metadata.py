"""Output files: PNGs with A1111-style ``parameters`` text plus one JSON chunk, sidecars, videos, atomic writes.

Every image attnctrl writes carries two text chunks unless metadata is switched off:

* ``parameters``: the infotext of AUTOMATIC1111's web UI, which A1111's PNG Info, Civitai and Fooocus read::

      a photo of a cat
      Negative prompt: blurry
      Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny-sd15, Method: ...

* ``attnctrl``: the full settings as JSON (method config, versions, everything needed to reproduce the output).

Writes go to a temporary file in the target folder and are renamed into place, so a crash never leaves a half
file under the final name. The temporary file is hidden and named ``.{stem}.tmp-XXXXXXXX{suffix}`` (``mkstemp``'s
eight random characters); :func:`temp_target` recognises such a name, so a resumed run can remove what a killed
process left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "temp_target",
    "infotext",
    "parse_infotext",
    "save_png",
    "read_png_metadata",
    "save_json",
    "save_video",
    "save_gif",
    "JSON_KEY",
    "sampler_name",
    "sha256_file",
    "keep_file",
]

JSON_KEY = "attnctrl"

# infotext label -> settings key, in A1111's order
_LABELS = [
    ("Steps", "steps"),
    ("Sampler", "sampler"),
    ("CFG scale", "guidance_scale"),
    ("Seed", "seed"),
    ("Size", "size"),
    ("Model", "model"),
    ("Method", "method"),
]


#: diffusers scheduler class -> AUTOMATIC1111's sampler name (the names tools that read infotext map)
_A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM", "DDIMParallelScheduler": "DDIM", "CogVideoXDDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "FlowMatchEulerDiscreteScheduler": "Euler", "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M", "CogVideoXDPMScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE", "DPMSolverSDEScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC", "LCMScheduler": "LCM", "TCDScheduler": "TCD",
}


def sampler_name(scheduler) -> str:
    """AUTOMATIC1111's name of a diffusers scheduler (``DDIM``, ``Euler a``, ``DPM++ 2M Karras``, ...); the class
    name when A1111 has none."""
    cls = type(scheduler).__name__
    name = _A1111_SAMPLERS.get(cls, cls)
    config = getattr(scheduler, "config", {}) or {}
    if cls == "DPMSolverMultistepScheduler" and "sde" in str(config.get("algorithm_type", "")):
        name = "DPM++ 2M SDE"
    if config.get("use_karras_sigmas"):
        name += " Karras"
    elif config.get("use_exponential_sigmas"):
        name += " Exponential"
    return name


_TEMP = re.compile(r"^\.(?P<stem>.+)\.tmp-[A-Za-z0-9_]{8}(?P<suffix>\.[A-Za-z0-9]+)?$")


def temp_target(name: str) -> str | None:
    """The file name a temporary file of :func:`atomic_path` was going to become (``.a.tmp-x1y2z3w4.png`` ->
    ``a.png``), or None if ``name`` is not one."""
    m = _TEMP.match(name)
    return None if m is None else m.group("stem") + (m.group("suffix") or "")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path`` (atomic on one filesystem).
    On any exception (an interrupt included) the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    tmp_path = Path(tmp)
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + "; ".join(_format_value(v) for v in value) + "]"
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text)
    return text


def infotext(settings: dict) -> str:
    """A1111 infotext of a settings dict (keys: prompt, negative_prompt, steps, sampler, guidance_scale, seed,
    width, height, model, method, method_options, ...)."""
    s = dict(settings)
    if "width" in s and "height" in s:
        s["size"] = f"{s['width']}x{s['height']}"
    lines = [str(s.get("prompt") or "")]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    fields = [f"{label}: {_format_value(s[key])}" for label, key in _LABELS if s.get(key) not in (None, "")]
    for key, value in (s.get("method_options") or {}).items():
        if value is not None:
            fields.append(f"{key.replace('_', ' ').capitalize()}: {_format_value(value)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|\[[^\]]*\]|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """Parse an infotext back into ``{"prompt", "negative_prompt", <label>: value}`` (A1111's format)."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 or ":" in lines[-1] else ""
    prompt_lines = lines[:-1] if last else lines
    out: dict = {"prompt": "", "negative_prompt": ""}
    negative = False
    for line in prompt_lines:
        if line.startswith("Negative prompt:"):
            negative = True
            line = line[len("Negative prompt:"):].strip()
        key = "negative_prompt" if negative else "prompt"
        out[key] = (out[key] + "\n" + line) if out[key] else line
    for m in _FIELD.finditer(last):
        label, value = m.group(1).strip(), m.group(2).strip()
        if value.startswith('"'):
            value = json.loads(value)
        out[label] = value
    return out


def save_png(path: str | os.PathLike, image, settings: dict | None = None, metadata: bool = True) -> Path:
    """Write ``image`` (PIL) as PNG atomically, with the ``parameters`` and ``attnctrl`` chunks unless
    ``metadata=False``."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if metadata and settings is not None:
        info = PngInfo()
        info.add_text("parameters", infotext(settings))
        info.add_text(JSON_KEY, json.dumps(settings, default=str, ensure_ascii=False))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict:
    """``{"parameters": str | None, "attnctrl": dict | None}`` read from a PNG."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    raw = text.get(JSON_KEY)
    return {"parameters": text.get("parameters"), JSON_KEY: json.loads(raw) if raw else None}


def save_json(path: str | os.PathLike, data: dict) -> Path:
    """Write a JSON file atomically (sidecars, manifests)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def save_video(path: str | os.PathLike, frames, fps: int = 8) -> Path:
    """Write frames (PIL images or HxWx3 uint8/float arrays) as an H.264 MP4 atomically (imageio-ffmpeg)."""
    import imageio.v2 as imageio
    import numpy as np

    arrays = []
    for f in frames:
        a = np.asarray(f)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
        arrays.append(a)
    path = Path(path)
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, arrays, fps=fps, format="FFMPEG", codec="libx264", macro_block_size=1)
    return path


def save_gif(path: str | os.PathLike, frames, fps: int = 8) -> Path:
    """Write frames (PIL images or arrays) as an endlessly looping animated GIF, atomically."""
    import numpy as np
    from PIL import Image

    images = [f if hasattr(f, "save") else Image.fromarray(
        np.asarray(f) if np.asarray(f).dtype == np.uint8 else (np.clip(np.asarray(f), 0, 1) * 255).round().astype(
            np.uint8)) for f in frames]
    path = Path(path)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def keep_file(path: str | os.PathLike, folder: str | os.PathLike, sub: str = "inputs") -> str:
    """Copy ``path`` to ``folder/sub/<sha256-12><suffix>`` (atomically; an existing copy is the same bytes) and
    return that name relative to ``folder`` (``inputs/3f2a9c0d1b4e.png``)."""
    source = Path(path)
    name = f"{sub}/{sha256_file(source)[:12]}{source.suffix.lower()}"
    target = Path(folder) / name
    if not target.is_file():
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return name
