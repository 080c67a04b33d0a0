"""The typed inputs a method takes besides its prompt, and their one parser each.

A method's registry entry (:mod:`attnctrl.methods`) names the kinds of inputs it takes; everything a surface needs
to know about a kind is here, once:

* its record: :class:`~attnctrl.pipelines.Reference` (``references``), :class:`~attnctrl.pipelines.Subject`
  (``subjects``), :class:`LoraBranch` (``loras``), :class:`Composition` (``composition``);
* its command-line shorthand (``--ref IMAGE[:MASK][:PROMPT]``, ...), parsed here and nowhere else (a Windows
  drive's colon is not a separator);
* its job-file form: an object with named fields (``{"image": ..., "mask": ..., "prompt": ...}``); the shorthand
  string is accepted there too;
* the files it reads, checked before any model loads, and its JSON record for the sidecar of each output.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .core.errors import AttnCtrlError

__all__ = ["LoraBranch", "Composition", "InputKind", "KINDS", "kind", "split_spec", "check_text", "check_lora_file",
           "check_image", "not_an_image", "IMAGE_TYPES",
           "parse_reference", "parse_subject", "parse_lora", "parse_composition"]


@dataclass(frozen=True)
class LoraBranch:
    """One CLoRA branch: a LoRA file, its trigger ``words`` (e.g. ``"sks dog"``) and the branch's own ``prompt``."""

    path: str
    words: str
    prompt: str


@dataclass(frozen=True)
class Composition:
    """PrimeComposer's inputs: a ``background`` image, the ``object`` image, its ``mask`` (None: the whole image)
    and the ``box`` ``(x, y, w, h)`` it goes into, in pixels of the background."""

    background: str
    object: str
    box: tuple[float, float, float, float]
    mask: str | None = None

    def fractions(self) -> tuple[float, float, float, float]:
        """The box as fractions ``(x0, y0, x1, y1)`` of the background (exact whatever the output size; ``0,0,1,1``
        is one pixel, never the whole image)."""
        from PIL import Image

        x, y, w, h = self.box
        try:
            with Image.open(self.background) as im:
                bw, bh = im.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise AttnCtrlError(f"composition: cannot read the background {self.background}: {e}") from e
        if x >= bw or y >= bh or x + w <= 0 or y + h <= 0:
            raise AttnCtrlError(f"composition: the box {x:g},{y:g},{w:g},{h:g} lies outside the {bw}x{bh} background")
        return (max(0.0, x / bw), max(0.0, y / bh), min(1.0, (x + w) / bw), min(1.0, (y + h) / bh))


# -- text ------------------------------------------------------------------------------------------------------------
_PART = re.compile(r"(?:[A-Za-z]:[\\/])?[^:]*")  # one colon-separated part; a Windows drive's colon is kept
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_TYPES = "png, jpg, webp, bmp, gif, tiff"  # what the image inputs read, for messages


def split_spec(spec: str, parts: int) -> list[str]:
    """``spec`` split at its first ``parts - 1`` colons (not a drive's, as in ``C:\\imgs\\a.png``); the last part keeps
    the rest, so a prompt may contain colons."""
    out = []
    for _ in range(parts - 1):
        head = _PART.match(spec).group(0)
        out.append(head)
        spec = spec[len(head) + 1 :]
    return out + [spec]


def check_text(text: str, label: str) -> str:
    """``text`` if it is valid Unicode (a shell passes undecodable bytes as lone surrogates), else a clear error."""
    if not isinstance(text, str):
        raise AttnCtrlError(f"{label} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise AttnCtrlError(f"{label} is not valid UTF-8 text") from None
    return text


def _looks_like_path(text: str) -> bool:
    """An image suffix, or a folder separator in a word without spaces ("a red/green star" is a prompt)."""
    text = text.strip()
    return text.lower().endswith(_IMAGE_SUFFIXES) or (("/" in text or "\\" in text) and not any(c.isspace() for c in text))


def _file(path, label: str, base: Path | None = None) -> str:
    """``path`` (relative to ``base`` unless absolute or existing) if it is a file, else a clear error."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise AttnCtrlError(f"{label}: give a file path, got {path!r}")
    p = Path(path)
    if base is not None and not p.is_absolute() and not p.exists():
        p = base / p
    if not p.is_file():
        raise AttnCtrlError(f"{label}: file {os.fspath(path)} {'is a folder' if p.is_dir() else 'does not exist'}")
    return str(p)


def not_an_image(label: str, name: str) -> AttnCtrlError:
    """The error for a file that is not an image at all (the app's uploads say it in these words too)."""
    return AttnCtrlError(f"{label}: {name} is not an image ({IMAGE_TYPES})")


def check_image(path: str, label: str, name: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image file, decoded whole (a text file named ``.png`` or a truncated file is an
    error now, not after the model has loaded); ``name`` is how the message shows the file (default: its path)."""
    from PIL import Image, UnidentifiedImageError

    shown = name or path
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except UnidentifiedImageError:
        raise not_an_image(label, shown) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise AttnCtrlError(f"{label}: {shown} is not an image that can be read ({str(e).splitlines()[0]})") from None



def _mask_pixels(path: str, label: str):
    """The mask file decoded (as :func:`attnctrl.core.masks.load_mask` reads it), not empty."""
    from .core.masks import load_mask

    check_image(path, label)
    mask = load_mask(path)
    if not bool((mask > 0.5).any()):
        raise AttnCtrlError(f"{label}: the mask {path} is empty (all black); white marks the region")
    return mask


def check_lora_file(path: str, label: str, name: str | None = None) -> None:
    """A LoRA file attnctrl can read: safetensors (or a PyTorch ``.bin``/``.pt`` state dict) holding LoRA weights
    (``lora_A``/``lora_B``, ``lora_down``/``lora_up``, ...), all finite. Whether its keys and shapes fit the model is
    checked when it is loaded, before any generation. ``name`` is how the messages show the file (default: its
    path)."""
    import torch

    shown = name or path
    try:
        if path.lower().endswith((".bin", ".pt", ".pth", ".ckpt")):
            state = torch.load(path, map_location="cpu", weights_only=True)
            tensors = dict(state) if isinstance(state, dict) else {}
        else:
            from safetensors.torch import load_file

            tensors = load_file(path)
    except Exception as e:  # safetensors and torch raise their own types for files that are not theirs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnCtrlError(f"{label}: {shown} is not a LoRA file (safetensors or a PyTorch state dict): {first}") \
            from None
    keys = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and "lora" in k.lower()]
    if not keys:
        raise AttnCtrlError(f"{label}: {shown} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)")
    bad = next((k for k in keys if not torch.isfinite(tensors[k]).all()), None)
    if bad is not None:
        raise AttnCtrlError(f"{label}: {shown} has weights that are not finite (NaN or infinity, e.g. {bad}); the "
                            f"file is damaged or was trained into NaN")


# -- the shorthands ----------------------------------------------------------------------------------------------------
def parse_reference(spec: str, index: int, base: Path | None = None):
    """``IMAGE[:MASK][:PROMPT]`` -> :class:`~attnctrl.pipelines.Reference` (the prompt may contain colons; a prompt
    without a mask is ``IMAGE::PROMPT``)."""
    from .pipelines import Reference

    image, mask, prompt = split_spec(check_text(spec, f"reference {index + 1}"), 3)
    if not image:
        raise AttnCtrlError(f"reference {index + 1} {spec!r}: give IMAGE[:MASK][:PROMPT]")
    if mask and not _looks_like_path(mask) and not Path(mask).exists():
        raise AttnCtrlError(f"reference {index + 1}: mask file {mask} does not exist (a prompt without a mask: "
                            f"IMAGE::PROMPT)")
    return _reference({"image": image, "mask": mask or None, "prompt": prompt}, index, base, Reference)


def _reference(value: dict, index: int, base, Reference, label: str = "reference"):
    label = f"{label} {index + 1}"
    unknown = set(value) - {"image", "mask", "prompt", "mask_threshold", "fit", "name"}
    if unknown:
        raise AttnCtrlError(f"{label}: unknown field {sorted(unknown)[0]!r}; give image, mask, prompt")
    if not value.get("image"):
        raise AttnCtrlError(f"{label}: give its image")
    image = _file(value["image"], f"{label}: image", base)
    mask = _file(value["mask"], f"{label}: mask", base) if value.get("mask") else None
    extra = {k: value[k] for k in ("mask_threshold", "fit") if k in value}
    ref = Reference(image, mask, check_text(value.get("prompt") or "", f"{label}: the prompt"),
                    name=value.get("name") or Path(image).name, **extra)
    ref.load(index, label)  # the image and mask are readable, of one size, and the mask is not empty
    return ref


def _region(value, label: str, base):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise AttnCtrlError(f"{label}: a region is a box [x0, y0, x1, y1] or a mask file, got {value!r}")
        return _box(tuple(float(v) for v in value), label)
    if not isinstance(value, str):
        raise AttnCtrlError(f"{label}: a region is a box [x0, y0, x1, y1] or a mask file, got {value!r}")
    parts = value.split(",")
    if len(parts) == 4:
        try:
            box = tuple(float(p) for p in parts)
        except ValueError:
            raise AttnCtrlError(f"{label}: region {value!r} is not x0,y0,x1,y1") from None
        return _box(box, label)
    if Path(value).is_file() or (base is not None and (base / value).is_file()):
        path = _file(value, f"{label}: region", base)
        _mask_pixels(path, f"{label}: region")
        return path
    raise AttnCtrlError(f"{label}: region {value!r} is neither a box x0,y0,x1,y1 nor a mask file")


def _box(box: tuple, label: str) -> tuple:
    """A region box ``x0, y0, x1, y1`` (fractions, or pixels when a value is above 1): finite, not negative, with
    ``x0 < x1`` and ``y0 < y1``."""
    if not all(math.isfinite(v) for v in box) or min(box) < 0:
        raise AttnCtrlError(f"{label}: the region box must be finite and not negative, got {list(box)}")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise AttnCtrlError(f"{label}: the region box is x0,y0,x1,y1 with x0 < x1 and y0 < y1 (corners, not a size), "
                            f"got {x0:g},{y0:g},{x1:g},{y1:g}")
    return box


def parse_subject(spec: str, index: int, base: Path | None = None):
    """``WORD=IMAGE[:MASK][:PROMPT][@REGION]`` or ``WORD=reference prompt[@REGION]`` -> a ``Subject``.

    ``REGION`` is a box ``x0,y0,x1,y1`` (pixels or fractions) or a mask file. A first part that looks like an image
    path (an image suffix or a folder separator) must exist: a typo is an error, not a reference prompt."""
    word, eq, rest = check_text(spec, f"subject {index + 1}").partition("=")
    if not eq or not word.strip() or not rest.strip():
        raise AttnCtrlError(f"subject {spec!r}: give WORD=IMAGE[:MASK][:PROMPT][@REGION] or WORD=prompt")
    value: dict = {"word": word.strip()}
    body, at, tail = rest.rpartition("@")
    if at:
        if "@" in body:
            raise AttnCtrlError(f"subject {index + 1}: one @REGION per subject, got {rest!r}")
        value["region"] = tail
        rest = body
    image = split_spec(rest, 2)[0]
    if Path(image).is_file() or (base is not None and (base / image).is_file()) or _looks_like_path(image):
        image, mask, prompt = split_spec(rest, 3)
        value["reference"] = {"image": image, "mask": mask or None, "prompt": prompt}
    else:
        value["prompt"] = rest.strip()
    return _subject(value, index, base)


def _subject(value: dict, index: int, base):
    from .pipelines import Reference, Subject

    label = f"subject {index + 1}"
    unknown = set(value) - {"word", "reference", "prompt", "region"}
    if unknown:
        raise AttnCtrlError(f"{label}: unknown field {sorted(unknown)[0]!r}; give word, reference or prompt, region")
    word = check_text(value.get("word") or "", f"{label}: the word").strip()
    if not word:
        raise AttnCtrlError(f"{label}: give the word of the prompt it stands for")
    region = _region(value.get("region"), label, base)
    ref = value.get("reference")
    if ref is not None:
        if isinstance(ref, str):
            ref = dict(zip(("image", "mask", "prompt"), split_spec(ref, 3)))
        reference = _reference(dict(ref), index, base, Reference, "subject")
        return Subject(word, reference=reference, region=region)
    prompt = check_text(value.get("prompt") or "", f"{label}: the prompt").strip()
    if not prompt:
        raise AttnCtrlError(f"{label} ({word}): give a reference image or a reference prompt")
    return Subject(word, prompt=prompt, region=region)


def parse_lora(spec: str, index: int, base: Path | None = None) -> LoraBranch:
    """``PATH:WORDS:PROMPT`` -> :class:`LoraBranch` (e.g. ``dog.safetensors:sks dog:a sks dog and a cat``)."""
    path, words, prompt = split_spec(check_text(spec, f"LoRA {index + 1}"), 3)
    if not path or not words.strip() or not prompt.strip():
        raise AttnCtrlError(f"LoRA {spec!r}: give PATH:WORD:PROMPT, e.g. dog.safetensors:sks dog:a sks dog")
    return _lora({"path": path, "words": words, "prompt": prompt}, index, base)


def _lora(value: dict, index: int, base) -> LoraBranch:
    label = f"LoRA {index + 1}"
    unknown = set(value) - {"path", "words", "prompt"}
    if unknown:
        raise AttnCtrlError(f"{label}: unknown field {sorted(unknown)[0]!r}; give path, words, prompt")
    words = check_text(value.get("words") or "", f"{label}: the trigger words").strip()
    prompt = check_text(value.get("prompt") or "", f"{label}: the prompt").strip()
    if not words or not prompt:
        raise AttnCtrlError(f"{label}: give its trigger words (e.g. 'sks dog') and its own prompt")
    path = _file(value.get("path"), label, base)
    check_lora_file(path, label)
    return LoraBranch(path, words, prompt)


def parse_composition(spec: str, index: int = 0, base: Path | None = None) -> Composition:
    """``BACKGROUND:OBJECT[:MASK]@X,Y,W,H`` -> :class:`Composition` (the box in pixels of the background)."""
    body, at, box = check_text(spec, "composition").rpartition("@")
    if not at:
        raise AttnCtrlError(f"composition {spec!r}: give BACKGROUND:OBJECT[:MASK]@X,Y,W,H")
    background, obj, mask = split_spec(body, 3)
    return _composition({"background": background, "object": obj, "mask": mask or None, "box": box.split(",")},
                        index, base)


def _composition(value: dict, index: int, base) -> Composition:
    unknown = set(value) - {"background", "object", "mask", "box"}
    if unknown:
        raise AttnCtrlError(f"composition: unknown field {sorted(unknown)[0]!r}; give background, object, mask, box")
    missing = [k for k in ("background", "object", "box") if not value.get(k)]
    if missing:
        raise AttnCtrlError(f"composition: give its {', '.join(missing)}")
    try:
        box = tuple(float(v) for v in value["box"])
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
        raise AttnCtrlError(f"composition: the box is X,Y,W,H in pixels of the background with W, H > 0, got "
                            f"{value['box']!r}")
    comp = Composition(_file(value["background"], "composition: background", base),
                       _file(value["object"], "composition: object", base), box,
                       _file(value["mask"], "composition: mask", base) if value.get("mask") else None)
    bw, bh = check_image(comp.background, "composition: background")
    x, y, w, h = box
    edges = [edge for edge, off in (("left", x < 0), ("top", y < 0), ("right", x + w > bw), ("bottom", y + h > bh))
             if off]
    if edges:
        raise AttnCtrlError(f"composition: the box {x:g},{y:g},{w:g},{h:g} (x, y, width, height) goes past the "
                            f"{' and '.join(edges)} edge of the {bw}x{bh} background, so the object would be cut off; "
                            f"move the box or make it smaller so that it lies on the background")
    size = check_image(comp.object, "composition: object")
    if comp.mask is not None:
        mask = _mask_pixels(comp.mask, "composition: mask")
        if (mask.shape[1], mask.shape[0]) != size:
            raise AttnCtrlError(f"composition: the mask is {mask.shape[1]}x{mask.shape[0]} but the object image is "
                                f"{size[0]}x{size[1]}; they must have the same size")
    comp.fractions()  # the box meets the background
    return comp


# -- records -----------------------------------------------------------------------------------------------------------
def _plain(value):
    """A record value as JSON: paths as text, in-memory images as a placeholder."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return list(value)
    if value is None or isinstance(value, (str, int, float, list)):
        return value
    return f"<{type(value).__name__}>"


def _reference_json(ref) -> dict:
    return {"image": _plain(ref.image), "mask": _plain(ref.mask), "prompt": ref.prompt,
            **({"name": ref.name} if ref.name else {}),  # kept when the image is renamed (a copy next to the outputs)
            **({"mask_threshold": ref.mask_threshold} if ref.mask_threshold != 127 else {}),
            **({"fit": ref.fit} if ref.fit != "pad" else {})}


def _subject_json(s) -> dict:
    out: dict = {"word": s.word}
    if s.reference is not None:
        out["reference"] = _reference_json(s.reference)
    else:
        out["prompt"] = s.prompt
    if s.region is not None:
        out["region"] = _plain(s.region)
    return out


@dataclass(frozen=True)
class InputKind:
    """One kind of method input (see the module docstring). ``key`` is its name in a request and a job file,
    ``flag`` its command-line option, ``single`` when a method takes exactly one."""

    key: str
    flag: str
    metavar: str
    help: str
    parse: Callable  # (shorthand, index, base) -> record
    structured: Callable  # (dict, index, base) -> record
    record: Callable  # record -> JSON dict
    type: Callable  # () -> the record class (imported lazily)
    single: bool = False

    def read(self, value, index: int = 0, base: Path | None = None):
        """A record from a job-file / request value: the record itself, an object with named fields or the
        shorthand string (paths relative to ``base``)."""
        if isinstance(value, str):
            return self.parse(value, index, base)
        if isinstance(value, dict):
            return self.structured(value, index, base)
        if isinstance(value, self.type()):
            return value
        raise AttnCtrlError(f"{self.key} {index + 1}: give an object with named fields or the {self.metavar} "
                            f"shorthand, not {type(value).__name__}")


def _pipelines():
    from . import pipelines

    return pipelines


def _reference_struct(value: dict, index: int, base):
    return _reference(value, index, base, _pipelines().Reference)


def _dataclass_json(record) -> dict:
    from dataclasses import asdict

    return {k: _plain(v) for k, v in asdict(record).items()}


#: every input kind, by key
KINDS: dict[str, InputKind] = {k.key: k for k in (
    InputKind("references", "--ref", "IMAGE[:MASK][:PROMPT]",
              "A reference image, its mask (white = the concept) and a prompt describing it; repeat for several.",
              parse_reference, _reference_struct, _reference_json, lambda: _pipelines().Reference),
    InputKind("subjects", "--subject", "WORD=IMAGE[:MASK][:PROMPT][@REGION]",
              "A subject: its word in the prompt, a reference image (or a reference prompt: WORD=prompt) and "
              "optionally a region (box x0,y0,x1,y1 or mask file); repeat for several.",
              parse_subject, _subject, _subject_json, lambda: _pipelines().Subject),
    InputKind("loras", "--lora", "PATH:WORDS:PROMPT",
              "A LoRA file, its trigger words and its own prompt (dog.safetensors:sks dog:a sks dog and a cat); "
              "repeat for several.", parse_lora, _lora, _dataclass_json, lambda: LoraBranch),
    InputKind("composition", "--composition", "BACKGROUND:OBJECT[:MASK]@X,Y,W,H",
              "A background, the object's image and mask, and the box it goes into (pixels of the background).",
              parse_composition, _composition, _dataclass_json, lambda: Composition, single=True),
)}


def kind(key: str) -> InputKind:
    if key not in KINDS:
        raise AttnCtrlError(f"unknown input kind {key!r}; known: {', '.join(KINDS)}")
    return KINDS[key]
