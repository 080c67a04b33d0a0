"""Tab values -> ``(method config, MethodInputs)``, one function per tab (plain values in, so they are testable
without a browser). Empty slots are skipped; anything unusable raises :class:`~attnctrl.core.errors.AttnCtrlError`
with a sentence that names the slot."""

from __future__ import annotations

from pathlib import Path

from ..cli.runners import MethodInputs
from ..core.errors import AttnCtrlError
from .app import App, Settings, _number, method_config

__all__ = ["plain", "freecustom", "magicface", "irdiffusion", "clora", "primecomposer", "ditctrl", "TABS"]


def _words(text: str | None) -> tuple[str, ...]:
    return tuple(w.strip() for w in (text or "").split(",") if w.strip())


def plain(app: App, s: Settings, words: str = "", more: str = ""):
    """Text to image; with words, the AttentionMaps method records their heat maps."""
    words = _words(words)
    config = method_config("attention-maps", {"words": words}, more) if words or (more or "").strip() else None
    return config, MethodInputs([s.prompt])


def _references(app: App, editors, prompts, label: str):
    from ..pipelines import Reference

    refs = []
    for i, (editor, prompt) in enumerate(zip(editors, prompts)):
        pair = app.editor_reference(editor, i, label)
        if pair is None:
            if (prompt or "").strip():
                raise AttnCtrlError(f"{label} {i + 1} has a prompt but no image")
            continue
        refs.append((i, Reference(pair[0], pair[1], (prompt or "").strip(), name=f"{label.lower()} {i + 1}")))
    if not refs:
        raise AttnCtrlError(f"upload at least one {label.lower()} image")
    return refs


def freecustom(app: App, s: Settings, editors, prompts, mask_weights=3.0, more: str = ""):
    """FreeCustom: one reference image (+ painted mask + prompt) per concept."""
    refs = [r for _, r in _references(app, editors, prompts, "Reference")]
    config = method_config("freecustom", {"mask_weights": _number(mask_weights, "Mask weight")}, more)
    return config, MethodInputs([s.prompt], references=refs)


def magicface(app: App, s: Settings, editors, prompts, words, mask_weights=3.0, inject_step=0.4, more: str = ""):
    """MagicFace: references, each bound to a word of the prompt."""
    refs = _references(app, editors, prompts, "Reference")
    ref_words = []
    for i, _ in refs:
        word = (words[i] or "").strip()
        if not word:
            raise AttnCtrlError(f"Reference {i + 1}: give the word of the prompt it stands for (e.g. 'hat')")
        ref_words.append(word)
    config = method_config("magicface", {"ref_words": ref_words, "mask_weights": _number(mask_weights, "Mask weight"),
                                         "inject_step": _number(inject_step, "Inject step")}, more)
    return config, MethodInputs([s.prompt], references=[r for _, r in refs])


def _box(text: str | None, label: str):
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise AttnCtrlError(f"{label}: a region is x0,y0,x1,y1 with x0 < x1 and y0 < y1 (pixels or fractions), "
                            f"got {text!r}")
    return box


def irdiffusion(app: App, s: Settings, words, editors, prompts, regions, mutual_lambda=0.9, more: str = ""):
    """IR-Diffusion: subjects named by a word of the prompt, each with a reference image or a reference prompt."""
    from ..pipelines import Reference, Subject

    subjects = []
    for i in range(len(words)):
        word, prompt = (words[i] or "").strip(), (prompts[i] or "").strip()
        pair = app.editor_reference(editors[i], i, "Subject")
        if not word:
            if pair is not None or prompt:
                raise AttnCtrlError(f"Subject {i + 1}: give the word of the scene prompt it stands for")
            continue
        region = _box(regions[i], f"Subject {i + 1}")
        if pair is not None:
            subjects.append(Subject(word, reference=Reference(pair[0], pair[1], prompt, name=word), region=region))
        elif prompt:
            subjects.append(Subject(word, prompt=prompt, region=region))
        else:
            raise AttnCtrlError(f"Subject {i + 1} ({word}): upload a reference image or write a reference prompt")
    if not subjects:
        raise AttnCtrlError("add at least one subject (a word of the prompt and a reference image or prompt)")
    config = method_config("irdiffusion", {"mutual_lambda": _number(mutual_lambda, "Mutual lambda")}, more)
    return config, MethodInputs([s.prompt], subjects=subjects)


def clora(app: App, s: Settings, files, words, prompts, step_size=20.0, mask_threshold=0.3, more: str = ""):
    """CLoRA: LoRA files, each with its trigger word and its own prompt."""
    specs = []
    for i in range(len(files)):
        file, word, prompt = files[i], (words[i] or "").strip(), (prompts[i] or "").strip()
        if file is None:
            if word or prompt:
                raise AttnCtrlError(f"LoRA {i + 1}: upload the LoRA file (.safetensors)")
            continue
        path = str(getattr(file, "name", file))
        if not Path(path).is_file():
            raise AttnCtrlError(f"LoRA {i + 1}: file {path} is missing")
        if not word or not prompt:
            raise AttnCtrlError(f"LoRA {i + 1}: give its trigger word (e.g. 'sks dog') and its prompt")
        if ":" in path:
            raise AttnCtrlError(f"LoRA {i + 1}: the file path may not contain ':' ({path})")
        specs.append(f"{path}:{word}:{prompt}")
    if not specs:
        raise AttnCtrlError("upload at least one LoRA file")
    config = method_config("clora", {"step_size": _number(step_size, "Step size"),
                                     "mask_threshold": _number(mask_threshold, "Mask threshold")}, more)
    return config, MethodInputs([s.prompt], loras=specs)


def primecomposer(app: App, s: Settings, background, reference, x, y, w, h, domain: str = "cross", more: str = ""):
    """PrimeComposer: a background, an object image (+ painted mask) and the box to put it in."""
    if background is None:
        raise AttnCtrlError("upload a background image")
    pair = app.editor_reference(reference, 0, "Object")
    if pair is None:
        raise AttnCtrlError("upload the object's image (paint over the object to give its mask)")
    box = tuple(_number(v, name, float, 0) for v, name in ((x, "Box x"), (y, "Box y"), (w, "Box width"),
                                                         (h, "Box height")))
    if None in box or box[2] <= 0 or box[3] <= 0:
        raise AttnCtrlError("give the box as x, y, width, height in pixels of the background, width and height > 0")
    bg = app.save_input(_load(background, "Background"), "background")
    composition = {"background": bg, "reference": pair[0], "reference_mask": pair[1], "box": box}
    return (method_config("primecomposer", {"domain": domain or "cross"}, more),
            MethodInputs([s.prompt], composition=composition))


def _load(value, label):
    from .app import _as_image

    return _as_image(value, label, "RGB")


def ditctrl(app: App, s: Settings, prompts_text: str, transitions=2, more: str = ""):
    """DiTCtrl: one prompt per line, one video segment each, with transitions between them."""
    prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
    if len(prompts) < 2:
        raise AttnCtrlError("DiTCtrl needs at least two prompts, one per line")
    config = method_config("ditctrl", {"num_transition_blocks": _number(transitions, "Transitions", int, 0)}, more)
    return config, MethodInputs(prompts)


#: tab key -> (title, method name or None, function)
TABS = {
    "plain": ("Text to image", None, plain),
    "freecustom": ("FreeCustom", "freecustom", freecustom),
    "magicface": ("MagicFace", "magicface", magicface),
    "irdiffusion": ("IR-Diffusion", "irdiffusion", irdiffusion),
    "clora": ("CLoRA", "clora", clora),
    "primecomposer": ("PrimeComposer", "primecomposer", primecomposer),
    "ditctrl": ("DiTCtrl (video)", "ditctrl", ditctrl),
}
