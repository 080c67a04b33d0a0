"""The widgets of each input kind (:mod:`attnctrl.inputs`) and of each method option, and their values back as
records and options (plain values in, so they are testable without a browser). A method's tab is assembled from
these by :mod:`attnctrl.ui.tabs`; nothing here names a method.

Empty slots are skipped; anything unusable raises :class:`~attnctrl.core.errors.AttnCtrlError` with a sentence
that names the slot.
"""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ..core.errors import AttnCtrlError
from ..inputs import check_image, check_lora_file
from .app import SLOTS, App, _as_image, _number

__all__ = ["KindWidgets", "KIND_WIDGETS", "option_widget", "option_value", "example_editor", "slider",
           "IMAGE_UPLOAD", "upload_check"]

#: the class of the blocks that take an image (the page's script reports a file they refuse, see tabs.py)
IMAGE_UPLOAD = "attnctrl-image-upload"


def slider(*args, **kwargs) -> gr.Slider:
    """A ``gr.Slider`` whose out-of-range value (typed in its box, or sent through the API) is an error naming it;
    gradio's own says only "Value 9 is greater than maximum value 8.". (The check is put on the instance: a
    subclass of a gradio component makes gradio write a ``.pyi`` stub beside this module on import.)"""
    widget = gr.Slider(*args, **kwargs)
    plain = widget.preprocess

    def preprocess(payload):
        if isinstance(payload, (int, float)):
            name = widget.label or "the value"
            if widget.minimum is not None and payload < widget.minimum:
                raise gr.Error(f"{name} must be at least {widget.minimum:g}, got {payload:g}", print_exception=False)
            if widget.maximum is not None and payload > widget.maximum:
                raise gr.Error(f"{name} must be at most {widget.maximum:g}, got {payload:g}", print_exception=False)
        return plain(payload)

    widget.preprocess = preprocess
    return widget


def _editor(label: str, **kw):
    return gr.ImageEditor(label=label, type="pil", format="png", image_mode="RGBA", sources=("upload", "clipboard"),
                          brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"), height=260,
                          layers=gr.LayerOptions(allow_additional_layers=False), transforms=(),
                          elem_classes=[IMAGE_UPLOAD], **kw)


EMPTY = {"background": None, "layers": [], "composite": None}  # an empty editor in an example


def example_editor(app: App, image: str | Path, mask: str | Path | None) -> dict:
    """An editor value showing ``image`` with ``mask`` painted on it (red, alpha 160), for an example row."""
    layers = []
    if mask:
        folder = app.output / "example-layers"
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"layer-{Path(mask).name}"
        if not out.exists():
            m = np.asarray(Image.open(mask).convert("L")) > 127
            rgba = np.zeros((*m.shape, 4), np.uint8)
            rgba[m] = (255, 0, 0, 160)
            Image.fromarray(rgba).save(out)
        layers = [str(out)]
    return {"background": str(image), "layers": layers, "composite": None}


def _box(text, label: str):
    text = (text or "").strip() if isinstance(text, str) else text
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        box = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise AttnCtrlError(f"{label}: a region is x0,y0,x1,y1 with x0 < x1 and y0 < y1 (pixels or fractions), "
                            f"got {text!r}")
    return box


@dataclass
class KindWidgets:
    """How one input kind appears on a tab: ``build()`` makes the widgets (a flat list), ``read(app, values)``
    turns their values into job-file objects, ``example(app, objects, base)`` the other way for an example row;
    ``names`` are the widgets' parameter names in the API (one per widget, in order), ``check(path, label, name)``
    the input module's check of a file uploaded into one of them."""

    build: typing.Callable
    read: typing.Callable
    example: typing.Callable
    names: tuple[str, ...]
    check: typing.Callable = check_image


def _slots(*fields_: str, prefix: str) -> tuple[str, ...]:
    """``prefix_1_field`` ... for each field, slot by slot within a field (the widgets' order)."""
    return tuple(f"{prefix}_{i + 1}_{name}" for name in fields_ for i in range(SLOTS))


# -- references: SLOTS x (image editor with painted mask, prompt) -----------------------------------------------------
def _references_build():
    editors, prompts = [], []
    for i in range(SLOTS):
        with gr.Group():
            editors.append(_editor(f"Reference {i + 1}"))
            prompts.append(gr.Textbox(label=f"Reference {i + 1} prompt", placeholder="what the image shows"))
    return editors + prompts


def _references_read(app: App, values) -> list[dict]:
    editors, prompts = values[:SLOTS], values[SLOTS:]
    out = []
    for i, (editor, prompt) in enumerate(zip(editors, prompts)):
        pair = app.editor_reference(editor, i, "Reference")
        if pair is None:
            if (prompt or "").strip():
                raise AttnCtrlError(f"Reference {i + 1} has a prompt but no image")
            continue
        out.append({"image": pair[0], "mask": pair[1], "prompt": (prompt or "").strip(), "name": f"reference {i + 1}"})
    if not out:
        raise AttnCtrlError("upload at least one reference image")
    return out


def _references_example(app: App, refs, base: Path) -> list:
    editors = [example_editor(app, base / r["image"], base / r["mask"] if r.get("mask") else None) for r in refs]
    prompts = [r.get("prompt", "") for r in refs]
    pad = SLOTS - len(refs)
    return editors + [EMPTY] * pad + prompts + [""] * pad


# -- subjects: SLOTS x (word, reference prompt, region, optional image editor) ----------------------------------------
def _subjects_build():
    words, prompts, regions, editors = [], [], [], []
    for i in range(SLOTS):
        with gr.Group():
            with gr.Row():
                words.append(gr.Textbox(label=f"Subject {i + 1} word"))
                prompts.append(gr.Textbox(label=f"Subject {i + 1} reference prompt",
                                          placeholder="the subject where it goes: a striped green star on the left"))
                regions.append(gr.Textbox(label=f"Subject {i + 1} region", placeholder="0,0,0.5,1"))
            editors.append(_editor(f"Subject {i + 1} reference image (optional)"))
    return words + prompts + regions + editors


def _subjects_read(app: App, values) -> list[dict]:
    words, prompts, regions, editors = (values[k * SLOTS:(k + 1) * SLOTS] for k in range(4))
    out = []
    for i in range(SLOTS):
        word, prompt = (words[i] or "").strip(), (prompts[i] or "").strip()
        pair = app.editor_reference(editors[i], i, "Subject")
        if not word:
            if pair is not None or prompt:
                raise AttnCtrlError(f"Subject {i + 1}: give the word of the scene prompt it stands for")
            continue
        subject: dict = {"word": word, "region": _box(regions[i], f"Subject {i + 1}")}
        if pair is not None:
            subject["reference"] = {"image": pair[0], "mask": pair[1], "prompt": prompt, "name": word}
        elif prompt:
            subject["prompt"] = prompt
        else:
            raise AttnCtrlError(f"Subject {i + 1} ({word}): upload a reference image or write a reference prompt")
        out.append(subject)
    if not out:
        raise AttnCtrlError("add at least one subject (a word of the prompt and a reference image or prompt)")
    return out


def _subjects_example(app: App, subjects, base: Path) -> list:
    pad = SLOTS - len(subjects)
    words = [s["word"] for s in subjects] + [""] * pad
    prompts = [(s.get("reference") or {}).get("prompt") or s.get("prompt", "") for s in subjects] + [""] * pad
    regions = [",".join(f"{v:g}" for v in s["region"]) if s.get("region") else "" for s in subjects] + [""] * pad
    editors = [example_editor(app, base / s["reference"]["image"], base / s["reference"]["mask"])
               if s.get("reference") else EMPTY for s in subjects] + [EMPTY] * pad
    return words + prompts + regions + editors


# -- loras: SLOTS x (file, trigger words, prompt) ----------------------------------------------------------------------
def _loras_build():
    files, words, prompts = [], [], []
    for i in range(SLOTS):
        with gr.Group():
            files.append(gr.File(label=f"LoRA {i + 1}", height=90))  # any file: its check names the slot
            with gr.Row():
                words.append(gr.Textbox(label=f"LoRA {i + 1} trigger words"))
                prompts.append(gr.Textbox(label=f"LoRA {i + 1} prompt"))
    return files + words + prompts


def _loras_read(app: App, values) -> list[dict]:
    files, words, prompts = (values[k * SLOTS:(k + 1) * SLOTS] for k in range(3))
    out = []
    for i in range(SLOTS):
        file, word, prompt = files[i], (words[i] or "").strip(), (prompts[i] or "").strip()
        if file is None:
            if word or prompt:
                raise AttnCtrlError(f"LoRA {i + 1}: upload the LoRA file (.safetensors)")
            continue
        path = str(getattr(file, "name", file))
        if not Path(path).is_file():
            raise AttnCtrlError(f"LoRA {i + 1}: file {path} is missing")
        if not word or not prompt:
            raise AttnCtrlError(f"LoRA {i + 1}: give its trigger words (e.g. 'sks dog') and its prompt")
        out.append({"path": path, "words": word, "prompt": prompt})
    if not out:
        raise AttnCtrlError("upload at least one LoRA file")
    return out


def _loras_example(app: App, loras, base: Path) -> list:
    pad = SLOTS - len(loras)
    return ([str(base / b["path"]) for b in loras] + [None] * pad + [b["words"] for b in loras] + [""] * pad
            + [b["prompt"] for b in loras] + [""] * pad)


# -- composition: background, object editor, box ------------------------------------------------------------------------
def _composition_build():
    with gr.Row():
        background = gr.Image(label="Background", type="pil", format="png", height=260, elem_classes=[IMAGE_UPLOAD])
        obj = _editor("Object (paint its mask)")
    with gr.Row():
        boxes = [gr.Number(0, label="Box x"), gr.Number(0, label="Box y"), gr.Number(None, label="Box width"),
                 gr.Number(None, label="Box height")]
    return [background, obj, *boxes]


def _composition_read(app: App, values) -> list[dict]:
    background, obj, *box = values
    if background is None:
        raise AttnCtrlError("upload a background image")
    pair = app.editor_reference(obj, 0, "Object")
    if pair is None:
        raise AttnCtrlError("upload the object's image (paint over the object to give its mask)")
    box = [_number(v, name, float, 0) for v, name in zip(box, ("Box x", "Box y", "Box width", "Box height"))]
    if None in box or box[2] <= 0 or box[3] <= 0:
        raise AttnCtrlError("give the box as x, y, width, height in pixels of the background, width and height > 0")
    bg = app.save_input(_as_image(background, "Background", "RGB"), "background")
    return [{"background": bg, "object": pair[0], "mask": pair[1], "box": box}]


def _composition_example(app: App, comp, base: Path) -> list:
    comp = comp[0] if isinstance(comp, list) else comp
    return [str(base / comp["background"]), example_editor(app, base / comp["object"],
                                                           base / comp["mask"] if comp.get("mask") else None),
            *comp["box"]]


#: input kind key -> its widgets
KIND_WIDGETS: dict[str, KindWidgets] = {
    "references": KindWidgets(_references_build, _references_read, _references_example,
                              _slots("image", "prompt", prefix="reference")),
    "subjects": KindWidgets(_subjects_build, _subjects_read, _subjects_example,
                            _slots("word", "prompt", "region", "image", prefix="subject")),
    "loras": KindWidgets(_loras_build, _loras_read, _loras_example, _slots("file", "words", "prompt", prefix="lora"),
                         check=check_lora_file),
    "composition": KindWidgets(_composition_build, _composition_read, _composition_example,
                               ("background", "object_image", "box_x", "box_y", "box_width", "box_height")),
}


def _uploaded(payload) -> tuple[str, str] | None:
    """``(path, name as uploaded)`` of the file in an upload widget's raw value (a file, an image, or an image
    editor's background); None when it holds none."""
    if isinstance(payload, dict) and "background" in payload:
        payload = payload["background"]
    if isinstance(payload, list):
        payload = payload[0] if payload else None
    if isinstance(payload, dict) and payload.get("path"):
        path = str(payload["path"])
        return path, str(payload.get("orig_name") or Path(path).name)
    if isinstance(payload, (str, Path)):
        return str(payload), Path(payload).name
    return None


def upload_check(check: typing.Callable, label: str) -> typing.Callable:
    """The ``upload`` event of a widget (its raw value, ``preprocess=False``): ``check(path, label, name)`` of the
    input module on the uploaded file, so a wrong file is a message naming the slot now, not at Generate."""

    def upload(payload) -> None:
        file = _uploaded(payload)
        if file is None:
            return
        try:
            check(file[0], label, file[1])
        except AttnCtrlError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return upload


# -- options ---------------------------------------------------------------------------------------------------------
def _field(cls, name: str):
    return next(f for f in fields(cls) if f.name == name)


def _default(f):
    return f.default if f.default is not MISSING else None


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def option_widget(cls, control):
    """A widget for option ``control.option`` of config ``cls``, typed by the field: a checkbox, a slider (with a
    range) or number, a radio for a fixed set of words, else a text box (lists comma-separated); the registry's
    label and one-line explanation (``control.info``, else the field's help)."""
    f = _field(cls, control.option)
    hint = typing.get_type_hints(cls)[f.name]
    default = _default(f)
    info = control.info or f.metadata.get("help") or None
    if hint is bool:
        return gr.Checkbox(bool(default), label=control.label, info=info)
    if hint in (int, float) and control.minimum is not None and control.maximum is not None:
        return slider(control.minimum, control.maximum, default, step=control.step, label=control.label, info=info)
    if hint in (int, float):
        return gr.Number(default, label=control.label, info=info)
    if typing.get_origin(hint) is typing.Literal:
        return gr.Radio([str(v) for v in typing.get_args(hint)], value=default, label=control.label, info=info)
    return gr.Textbox(_as_text(default), label=control.label, info=info)


def option_value(cls, name: str, value):
    """The option value of a widget's value (text parsed by the field's type; an empty box: the default)."""
    from ..run import parse_option

    if isinstance(value, str):
        return parse_option(cls, name, value) if value.strip() else None
    return value


def example_option(value):
    """An option value as its widget shows it."""
    return _as_text(value) if isinstance(value, (list, tuple)) else value


def options_json(text: str | None) -> dict:
    """The 'More options (JSON)' box: an object of method options, or empty."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AttnCtrlError(f"More options: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise AttnCtrlError('More options must be a JSON object such as {"start_step": 2}')
    return value
