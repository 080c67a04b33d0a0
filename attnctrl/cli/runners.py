"""From a method config and its command-line / job inputs to a callable that generates (shared by ``generate`` and
``batch``).

Plugin methods (AttentionMaps, AgentAttention, CLEAR) are applied to the pipeline; pipeline methods get their
extra inputs here: references (FreeCustom, MagicFace), subjects (IR-Diffusion), LoRAs (CLoRA), a composition
(PrimeComposer) or several prompts (DiTCtrl). Every input is checked before anything is generated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..core.controller import Handle, Method, apply
from ..core.errors import AttnCtrlError

__all__ = ["MethodInputs", "Prepared", "prepare", "parse_reference", "parse_subject", "clora_inputs"]


@dataclass
class MethodInputs:
    prompts: list[str]
    references: list = field(default_factory=list)  # "IMAGE[:MASK][:PROMPT]" or Reference objects
    subjects: list = field(default_factory=list)  # "WORD=IMAGE[:MASK][:PROMPT][@REGION]", "WORD=prompt" or Subjects
    loras: list[str] = field(default_factory=list)  # "PATH:WORD:PROMPT"
    composition: dict | None = None  # background, reference, reference_mask, box (x, y, w, h)


@dataclass
class Prepared:
    """What :func:`prepare` returns: ``generate(**pipeline_kwargs)`` makes one output; ``close()`` removes whatever
    was applied; ``artifacts(image)`` gives the method's maps or masks of the last generation as PIL images."""

    generate: object
    handles: list = field(default_factory=list)  # plugin handles (removed by close)
    wrapper: object = None  # the method's pipeline wrapper, for its masks
    words: list[str] = field(default_factory=list)  # names of the masks a wrapper keeps

    def artifacts(self, image, index: int = 0) -> dict:
        """``{name: PIL image}``: heat maps (AttentionMaps), segmentations (MagicFace), fusion masks (CLoRA),
        subject regions (IR-Diffusion), each blended over ``image``."""
        out = {}
        for handle in self.handles:
            out.update(handle.artifacts(index, image=image))
        masks = self.wrapper.shown_masks() if self.wrapper is not None else None
        if masks is not None:
            out.update(mask_overlays(image, masks, self.words))
        return out

    def close(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()


def mask_overlays(image, masks, names) -> dict:
    """Each of ``masks`` ``(N, h, w)`` resized (nearest) to ``image`` and blended over it: ``{"mask-NAME": PIL}``."""
    import torch

    from ..processors.attention_maps import heat_overlay

    m = torch.as_tensor(masks).float().cpu()[:, None]
    m = torch.nn.functional.interpolate(m, size=(image.height, image.width), mode="nearest")[:, 0].numpy()
    out = {}
    for i, mask in enumerate(m):
        name = names[i] if i < len(names) else str(i + 1)
        out[f"mask-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') or i + 1}"] = heat_overlay(image, mask, 0.5)
    return out


_PART = re.compile(r"(?:[A-Za-z]:[\\/])?[^:]*")  # one colon-separated part; a Windows drive's colon is kept
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def split_spec(spec: str, parts: int) -> list[str]:
    """``spec`` split at its first ``parts - 1`` colons (not a drive's, as in ``C:\\imgs\\a.png``); the last part keeps
    the rest, so a prompt may contain colons."""
    out = []
    for _ in range(parts - 1):
        head = _PART.match(spec).group(0)
        out.append(head)
        spec = spec[len(head) + 1 :]
    return out + [spec]


def _looks_like_path(text: str) -> bool:
    """An image suffix, or a folder separator in a word without spaces ("a red/green star" is a prompt)."""
    text = text.strip()
    return text.lower().endswith(_IMAGE_SUFFIXES) or (("/" in text or "\\" in text) and not any(c.isspace() for c in text))


def check_text(text: str, label: str) -> str:
    """``text`` if it is valid Unicode (a shell passes undecodable bytes as lone surrogates), else a clear error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise AttnCtrlError(f"{label} is not valid UTF-8 text") from None
    return text


def parse_reference(spec: str, index: int):
    """``IMAGE[:MASK][:PROMPT]`` -> :class:`~attnctrl.pipelines.Reference` (the prompt may contain colons; a prompt
    without a mask is ``IMAGE::PROMPT``)."""
    from ..pipelines import Reference

    if isinstance(spec, Reference):
        return spec
    image, mask, prompt = split_spec(spec, 3)
    if not image:
        raise AttnCtrlError(f"--ref {spec!r}: give IMAGE[:MASK][:PROMPT]")
    for label, path in (("image", image), ("mask", mask)):
        if path and not Path(path).is_file():
            what = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
            hint = " (a prompt without a mask: IMAGE::PROMPT)" if label == "mask" and not _looks_like_path(path) else ""
            raise AttnCtrlError(f"--ref {index + 1}: {label} file {path} {what}{hint}")
    return Reference(image, mask or None, check_text(prompt, f"--ref {index + 1}: the prompt"), name=Path(image).name)


def parse_subject(spec: str, index: int):
    """``WORD=IMAGE[:MASK][:PROMPT][@REGION]`` or ``WORD=reference prompt[@REGION]`` -> a ``Subject``.

    ``REGION`` is a box ``x0,y0,x1,y1`` (pixels or fractions) or a mask file. A first part that looks like an image
    path (an image suffix or a folder separator) must exist: a typo is an error, not a reference prompt."""
    from ..pipelines import Subject

    if isinstance(spec, Subject):
        return spec
    word, eq, rest = spec.partition("=")
    if not eq or not word.strip() or not rest.strip():
        raise AttnCtrlError(f"--subject {spec!r}: give WORD=IMAGE[:MASK][:PROMPT][@REGION] or WORD=prompt")
    region = None
    body, at, tail = rest.rpartition("@")
    if at:
        if "@" in body:
            raise AttnCtrlError(f"--subject {index + 1}: one @REGION per subject, got {rest!r}")
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
    image = split_spec(rest, 2)[0]
    if Path(image).is_file() or _looks_like_path(image):
        return Subject(word.strip(), reference=parse_reference(rest, index), region=region)
    return Subject(word.strip(), prompt=check_text(rest.strip(), f"--subject {index + 1}: the prompt"), region=region)


def clora_inputs(prompt: str, specs) -> tuple[list, list, list, list]:
    """Prompts, LoRAs, concepts and mask words of CLoRA from a base prompt and ``PATH:WORD:PROMPT`` specs.

    Branch 0 is the base prompt without a LoRA. LoRA k's concept is its trigger ``WORD`` (e.g. "sks dog") in its own
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


def _pixel_box(box, background) -> tuple[float, float, float, float]:
    """``--box X,Y,W,H`` in pixels of the background -> fractions ``(x0, y0, x1, y1)`` (exact whatever the output
    size, and never mistaken for fractions: ``0,0,1,1`` is one pixel)."""
    from PIL import Image

    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise AttnCtrlError(f"--box {','.join(map(str, box))}: give X,Y,W,H in pixels with W, H > 0")
    try:
        with Image.open(background) as im:
            bw, bh = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise AttnCtrlError(f"--background: cannot read image {background}: {e}") from e
    if x >= bw or y >= bh or x + w <= 0 or y + h <= 0:
        raise AttnCtrlError(f"--box {x:g},{y:g},{w:g},{h:g} lies outside the {bw}x{bh} background")
    return (max(0.0, x / bw), max(0.0, y / bh), min(1.0, (x + w) / bw), min(1.0, (y + h) / bh))


def _options(method: Method, drop=("layers",)) -> dict:
    return {f.name: getattr(method, f.name) for f in fields(method) if f.name not in drop}


def _unexpected(inputs: MethodInputs, allowed: set[str], name: str) -> None:
    flags = {"references": "--ref", "subjects": "--subject", "loras": "--lora", "composition": "--background/--box"}
    for key, flag in flags.items():
        if key not in allowed and getattr(inputs, key):
            raise AttnCtrlError(f"{flag} is not an input of {name or 'plain generation'}")
    if "prompts" not in allowed and len(inputs.prompts) > 1:
        raise AttnCtrlError(f"several prompts are for --method ditctrl; {name or 'plain generation'} takes one")


def prepare(pipe, method: Method | None, inputs: MethodInputs, plugins=()) -> Prepared:
    """Check ``inputs`` for ``method`` and get ready to generate (see :class:`Prepared`).

    ``plugins`` are further plugin configs (AgentAttention, CLEAR) applied for the whole generation, e.g. beside a
    pipeline method; two methods that act on the same layers raise :class:`~attnctrl.core.errors.LayerConflictError`.
    """
    handles = []
    try:
        for plugin in plugins:
            handles.append(apply(pipe, plugin))
        prepared = _prepare(pipe, method, inputs)
    except Exception:
        for h in reversed(handles):
            h.remove()
        raise
    prepared.handles[:0] = handles
    return prepared


def _prepare(pipe, method: Method | None, inputs: MethodInputs) -> Prepared:
    from .. import pipelines

    name = method.name if method is not None else None
    prompt = inputs.prompts[0]
    if method is None:
        _unexpected(inputs, set(), "")
        return Prepared(pipe)
    if name == "ditctrl":
        _unexpected(inputs, {"prompts"}, name)
        wrapper = pipelines.DiTCtrlPipeline.from_pipe(pipe)
        options = _options(method)

        def generate(prompt=None, **kw):
            kw.pop("num_images_per_prompt", None)
            return wrapper(list(inputs.prompts), **kw, **options)

        return Prepared(generate, wrapper=wrapper)
    if name == "primecomposer":
        _unexpected(inputs, {"composition"}, name)
        comp = inputs.composition or {}
        missing = [k for k in ("background", "reference", "box") if not comp.get(k)]
        if missing:
            raise AttnCtrlError("primecomposer needs --background, --reference and --box x,y,w,h (missing: "
                                + ", ".join("--" + m for m in missing) + ")")
        for key in ("background", "reference", "reference_mask"):
            if comp.get(key) and not Path(comp[key]).is_file():
                raise AttnCtrlError(f"--{key.replace('_', '-')} file {comp[key]} does not exist")
        location = _pixel_box(comp["box"], comp["background"])
        composer = pipelines.PrimeComposerPipeline.from_pipe(pipe)
        options = _options(method)

        def generate(prompt=prompt, **kw):
            return composer(comp["background"], comp["reference"], comp.get("reference_mask"),
                            location=location, prompt=prompt, **kw, **options)

        return Prepared(generate, wrapper=composer)
    if name == "clora":
        _unexpected(inputs, {"loras"}, name)
        if not inputs.loras:
            raise AttnCtrlError("clora needs --lora PATH:WORD:PROMPT (one per LoRA)")
        prompts, loras, concepts, mask_words = clora_inputs(prompt, inputs.loras)
        clora = pipelines.CLoRAPipeline.from_pipe(pipe)
        for path in loras[1:]:
            clora.load_lora(path)  # a missing or mismatched file fails now, before any generation
        options = _options(method)

        def generate(prompt=None, **kw):
            kw.pop("num_images_per_prompt", None)
            return clora(prompts, loras, concepts, mask_words, **kw, **options)

        return Prepared(generate, wrapper=clora, words=[w[0] for w in mask_words[1:]])
    if name == "irdiffusion":
        _unexpected(inputs, {"subjects"}, name)
        if not inputs.subjects:
            raise AttnCtrlError("irdiffusion needs --subject WORD=IMAGE[:MASK][:PROMPT][@REGION] (or WORD=prompt)")
        subjects = [parse_subject(spec, i) for i, spec in enumerate(inputs.subjects)]
        wrapper = pipelines.IRDiffusionPipeline.from_pipe(pipe)
        options = _options(method, drop=())
        return Prepared(lambda **kw: wrapper(subjects=subjects, **kw, **options), wrapper=wrapper,
                        words=[s.word for s in subjects])
    if getattr(method, "pipeline", None):  # FreeCustom, MagicFace
        _unexpected(inputs, {"references"}, name)
        if not inputs.references:
            raise AttnCtrlError(f"{name} needs reference images: --ref IMAGE[:MASK][:PROMPT]")
        references = [parse_reference(spec, i) for i, spec in enumerate(inputs.references)]
        for i, ref in enumerate(references):
            ref.load(i)  # a bad image or mask fails now, before any generation
        wrapper = getattr(pipelines, method.pipeline).from_pipe(pipe)
        options = _options(method, drop=())
        words = list(getattr(method, "ref_words", None) or [r.name for r in references])
        return Prepared(lambda **kw: wrapper(references=references, **kw, **options), wrapper=wrapper, words=words)
    _unexpected(inputs, set(), name)
    handle: Handle = apply(pipe, method)
    try:
        handle.check_prompt(prompt)
    except Exception:
        handle.remove()
        raise
    return Prepared(pipe, handles=[handle])
