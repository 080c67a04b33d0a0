"""The widgets of each input kind (:mod:`attnctrl.inputs`) and of each method option, and their values back as
records and options (plain values in, so they are testable without a browser). A method's tab is assembled from
these by :mod:`attnctrl.ui.tabs`; nothing here names a method.

Empty slots are skipped; anything unusable raises :class:`~attnctrl.core.errors.AttnCtrlError` with a sentence
that names the slot.
"""

from __future__ import annotations

import itertools
import json
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ..core.errors import AttnCtrlError
from ..inputs import check_image, check_lora_file
from .app import SLOTS, App, _as_image, _number, editor_inputs

__all__ = ["KindWidgets", "KIND_WIDGETS", "option_widget", "option_value", "example_editor", "slider",
           "IMAGE_UPLOAD", "upload_check", "painted_boxes", "box_layer", "mask_layer", "BOX_SCRIPT"]

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


#: the brush of the mask editors and the examples' masks: translucent cyan, seen on every toyworld colour
MASK_COLOUR, MASK_ALPHA = "#00d0ff", 150
#: the colours boxes are drawn in on an image, one a box (a composition's box; the subjects' regions, in order)
BOX_COLOURS = ("#ff00c8", "#00d0ff", "#ffa000")
BOX_NAMES = ("magenta", "cyan", "orange")


def _editor(label: str, brush: gr.Brush | None = None, canvas: int = 32, classes=(IMAGE_UPLOAD,), **kw):
    # canvas: the editor's initial canvas; gradio 6 places a layer loaded from a file in the middle of a canvas at
    # least this big, so an example's mask on a smaller image lands beside it (invisible): keep it small
    return gr.ImageEditor(label=label, type="pil", format="png", image_mode="RGBA",
                          brush=brush or gr.Brush(colors=[(MASK_COLOUR, MASK_ALPHA / 255)], color_mode="fixed"),
                          height=260, layers=gr.LayerOptions(allow_additional_layers=False), transforms=(),
                          elem_classes=list(classes), canvas_size=(canvas, canvas),
                          **{"sources": ("upload", "clipboard"), **kw})


EMPTY = {"background": None, "layers": [], "composite": None}  # an empty editor in an example


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], np.float32)


def _example_layer(app: App, name: str, rgba: np.ndarray) -> str:
    """An example's editor layer written once to the app's output folder (the page reads layers as files)."""
    folder = app.output / "example-layers"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"layer-{name}.png"
    if not out.exists():
        Image.fromarray(rgba).save(out)
    return str(out)


def mask_layer(mask: np.ndarray) -> np.ndarray:
    """An editor layer (RGBA) showing ``mask`` (bool) in the brush's translucent colour."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (*_rgb(MASK_COLOUR).astype(np.uint8), MASK_ALPHA)
    return rgba


def example_editor(app: App, image: str | Path, mask: str | Path | None) -> dict:
    """An editor value showing ``image`` with ``mask`` painted on it (the brush's colour), for an example row."""
    layers = []
    if mask:
        layers = [_example_layer(app, Path(mask).stem, mask_layer(np.asarray(Image.open(mask).convert("L")) > 127))]
    return {"background": str(image), "layers": layers, "composite": None}


# -- boxes drawn on an image: the bounding box of what is painted, redrawn as a rectangle ----------------------------
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 excluded


def box_layer(size: tuple[int, int], boxes, colours=BOX_COLOURS) -> np.ndarray:
    """An editor layer (RGBA, ``size`` = (width, height)) with each box drawn as a rectangle in its colour: a solid
    outline and a translucent inside (the page shows it; :func:`painted_boxes` reads it back exactly)."""
    w, h = size
    rgba = np.zeros((h, w, 4), np.uint8)
    line = max(1, min(w, h) // 64)
    for box, colour in zip(boxes, colours):
        if box is None:
            continue
        x0, y0, x1, y1 = _clip(box, size)
        if x1 <= x0 or y1 <= y0:
            continue
        rgb = _rgb(colour).astype(np.uint8)
        rgba[y0:y1, x0:x1] = (*rgb, 90)
        for part in (np.s_[y0:y0 + line, x0:x1], np.s_[y1 - line:y1, x0:x1], np.s_[y0:y1, x0:x0 + line],
                     np.s_[y0:y1, x1 - line:x1]):
            rgba[part] = (*rgb, 255)
    return rgba


def _clip(box, size) -> Box:
    w, h = size
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


def painted_boxes(layers, before: np.ndarray | None = None, colours=BOX_COLOURS) -> list[Box | None] | None:
    """What a drag on a box editor means: for each colour, the bounding box of the paint nearest to that colour in
    ``layers`` (RGBA arrays of one size; their union), None where there is none.

    ``before`` is the layer as last drawn (:func:`box_layer` of the current boxes): only paint that differs from it
    counts (the new stroke gives the new box; a colour not touched keeps its box, given as None here). Returns None
    when nothing differs (the page echoing a redraw)."""
    if not layers:
        return None
    stack = np.stack([np.asarray(x, np.uint8) for x in layers])
    alpha = stack[..., 3].max(0)
    top = np.take_along_axis(stack, stack[..., 3].argmax(0)[None, ..., None], 0)[0]  # the most opaque layer's pixel
    new = alpha > 0
    if before is not None:
        changed = np.abs(top.astype(np.int16) - before.astype(np.int16)).max(-1) > 24
        changed &= (alpha > 0) | (before[..., 3] > 0)
        if not changed.any():
            return None
        new &= changed
    nearest = np.linalg.norm(top[..., None, :3].astype(np.float32) - np.stack([_rgb(c) for c in colours]),
                             axis=-1).argmin(-1)
    out: list[Box | None] = []
    for k in range(len(colours)):
        ys, xs = np.nonzero(new & (nearest == k))
        out.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None)
    return out


def _editor_files(payload) -> tuple[str | None, list[np.ndarray]]:
    """``(background path, layers as RGBA arrays)`` of an editor's raw value (``preprocess=False``)."""
    if not isinstance(payload, dict):
        return None, []
    path = lambda f: (f.get("path") if isinstance(f, dict) else f)  # noqa: E731
    layers = [np.asarray(_as_image(path(x), "the drawing")) for x in payload.get("layers") or [] if path(x)]
    return path(payload.get("background")), layers


def _image_size(path: str | None, layers) -> tuple[int, int] | None:
    if layers:
        return layers[0].shape[1], layers[0].shape[0]
    if path:
        with Image.open(path) as im:
            return im.size
    return None


def _drawn(background: str | None, layer: np.ndarray) -> dict:
    return {"background": background, "layers": [Image.fromarray(layer)], "composite": None}


BOX_EDITOR = "attnctrl-box-editor"  # the class of the editors boxes are dragged on (see BOX_SCRIPT)
_box_editors = itertools.count()

#: The page's script for box editors: a stroke on one ends (pointer up) -> a moment later, the editor's hidden trigger box
#: gets a new value, whose change event reads the drawing. (gradio's editor sends its input event before the
#: stroke is in its value, and a change event only in a mode it does not offer.)
BOX_SCRIPT = """() => {
  if (window.attnctrlBoxes) return;
  window.attnctrlBoxes = true;
  let editor = null;  // where the stroke began (the pointer's up event goes to the page)
  document.addEventListener('pointerdown', (event) => {
    editor = event.target instanceof Element ? event.target.closest('.BOX_EDITOR') : null;
  }, true);
  document.addEventListener('pointerup', () => {
    const key = editor && [...editor.classList].find((c) => c.startsWith('BOX_EDITOR-'));
    editor = null;
    if (!key) return;
    setTimeout(() => {
      const box = document.querySelector('#' + key + ' textarea, #' + key + ' input');
      if (!box) return;
      box.value = String(Date.now());
      box.dispatchEvent(new Event('input', {bubbles: true}));
    }, 300);
  }, true);
}""".replace("BOX_EDITOR", BOX_EDITOR)


def box_drawing(editor, readouts: list, to_boxes: typing.Callable, to_readout: typing.Callable) -> None:
    """Wire ``editor`` (an image to drag boxes on) to the number or text fields that hold the boxes exactly:
    a drag fills the fields (and the box is redrawn as a clean rectangle), typing in a field redraws the box.

    ``to_boxes(size, *readout values)`` gives the boxes in pixels of an image of ``size`` (None: none);
    ``to_readout(size, boxes)`` the fields' values, one per field. The fields stay the truth (the API's values)."""
    key = f"{BOX_EDITOR}-{next(_box_editors)}"
    editor.elem_classes = [*(editor.elem_classes or []), BOX_EDITOR, key]
    trigger = gr.Textbox(visible="hidden", elem_id=key)  # set by BOX_SCRIPT when a stroke ends
    quiet = dict(show_progress="hidden", api_visibility="private", queue=False, preprocess=False)

    def drag(payload, *values):
        background, layers = _editor_files(payload)
        size = _image_size(background, layers)
        if size is None:
            return [gr.skip()] * (len(readouts) + 1)
        old = to_boxes(size, *values)
        found = painted_boxes(layers, box_layer(size, old))
        if found is None or not any(b is not None for b in found):
            return [gr.skip()] * (len(readouts) + 1)
        boxes = [b if b is not None else o for b, o in zip(found, old)]
        return [*to_readout(size, boxes), _drawn(background, box_layer(size, boxes))]

    def typed(payload, *values):
        background, layers = _editor_files(payload)
        size = _image_size(background, layers)
        if size is None:
            return gr.skip()
        try:
            boxes = to_boxes(size, *values)
        except (AttnCtrlError, TypeError, ValueError):
            return gr.skip()  # half typed: Generate's checks speak
        return _drawn(background, box_layer(size, boxes))

    drag.__name__, typed.__name__ = "drag_box", "type_box"
    trigger.change(drag, inputs=[editor, *readouts], outputs=[*readouts, editor], **quiet)
    for field_ in readouts:
        field_.input(typed, inputs=[editor, *readouts], outputs=editor, **quiet)


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
CANVAS = 256  # the side of the canvas subjects' regions are dragged on (they are fractions of the picture)


def _canvas() -> Image.Image:
    """A white canvas with faint lines at the quarters, to drag regions on."""
    rgb = np.full((CANVAS, CANVAS, 3), 255, np.uint8)
    for k in (1, 2, 3):
        rgb[k * CANVAS // 4, :] = rgb[:, k * CANVAS // 4] = 225
    return Image.fromarray(rgb)


def _subjects_build():
    words, prompts, regions, editors = [], [], [], []
    for i in range(SLOTS):
        with gr.Group():
            with gr.Row():
                words.append(gr.Textbox(label=f"Subject {i + 1} word"))
                prompts.append(gr.Textbox(label=f"Subject {i + 1} reference prompt",
                                          placeholder="the subject where it goes: a striped green star on the left"))
                regions.append(gr.Textbox(label=f"Subject {i + 1} region ({BOX_NAMES[i]})",
                                          placeholder="x0,y0,x1,y1 in fractions: 0,0,0.5,1"))
            editors.append(_editor(f"Subject {i + 1} reference image (optional)"))
    names = ", ".join(f"{i + 1} {BOX_NAMES[i]}" for i in range(SLOTS))
    canvas = _editor(f"Regions: drag across where each subject goes, in its colour ({names})", canvas=CANVAS,
                     brush=gr.Brush(default_size=2, colors=list(BOX_COLOURS[:SLOTS]), color_mode="fixed"), classes=(), sources=(),
                     value={"background": _canvas(), "layers": [], "composite": None})
    box_drawing(canvas, regions, _region_boxes, _region_readout)
    return words + prompts + regions + editors + [canvas]


def _region_boxes(size, *texts) -> list:
    """The subjects' regions in pixels of a canvas of ``size`` (None: no region, or one given in pixels)."""
    out = []
    for i, text in enumerate(texts):
        box = _box(text, f"Subject {i + 1}")
        out.append(None if box is None or max(box) > 1 else
                   (box[0] * size[0], box[1] * size[1], box[2] * size[0], box[3] * size[1]))
    return out


def _fraction(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".")


def _region_readout(size, boxes) -> list:
    return [gr.skip() if b is None else ",".join(_fraction(v / size[k % 2]) for k, v in enumerate(b)) for b in boxes]


def _subjects_read(app: App, values) -> list[dict]:
    words, prompts, regions, editors = (values[k * SLOTS:(k + 1) * SLOTS] for k in range(4))  # (the drawing last)
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
    canvas = _example_layer(app, "canvas", np.asarray(_canvas()))
    drawn = box_layer((CANVAS, CANVAS), _region_boxes((CANVAS, CANVAS), *regions))
    layer = _example_layer(app, "regions-" + "-".join(r.replace(",", "_") for r in regions), drawn)
    return words + prompts + regions + editors + [{"background": canvas, "layers": [layer], "composite": None}]


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


# -- composition: background (the box dragged on it), object editor, box --------------------------------------------
BOX_FIELDS = ("Box x", "Box y", "Box width", "Box height")


def _composition_build():
    gr.Markdown(f"Drag across the background where the object goes: the {BOX_NAMES[0]} box, which the four numbers "
                "below hold exactly (type them to move it).")
    with gr.Row():
        background = _editor("Background",
                             brush=gr.Brush(default_size=1, colors=[BOX_COLOURS[0]], color_mode="fixed"))
        obj = _editor("Object (paint its mask)")
    with gr.Row():
        boxes = [gr.Number(0, label=BOX_FIELDS[0]), gr.Number(0, label=BOX_FIELDS[1]),
                 gr.Number(None, label=BOX_FIELDS[2]), gr.Number(None, label=BOX_FIELDS[3])]
    box_drawing(background, boxes, _composition_boxes, lambda size, boxes: _composition_readout(boxes[0]))
    return [background, obj, *boxes]


def _composition_boxes(size, *xywh) -> list:
    """The box of the x, y, width, height fields in pixels (None while they do not make one)."""
    try:
        x, y, w, h = (float(v) for v in xywh)
    except (TypeError, ValueError):
        return [None]
    return [(x, y, x + w, y + h) if w > 0 and h > 0 else None]


def _composition_readout(box) -> list:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def _composition_read(app: App, values) -> list[dict]:
    background, obj, *box = values
    pair = editor_inputs(background, "Background")
    if pair is None:
        raise AttnCtrlError("upload a background image")
    pair_obj = app.editor_reference(obj, 0, "Object")
    if pair_obj is None:
        raise AttnCtrlError("upload the object's image (paint over the object to give its mask)")
    box = [_number(v, name, float, 0) for v, name in zip(box, BOX_FIELDS)]
    if None in box or box[2] <= 0 or box[3] <= 0:
        raise AttnCtrlError("give the box as x, y, width, height in pixels of the background, width and height > 0 "
                            "(or drag across the background)")
    bg = app.save_input(pair[0], "background")
    return [{"background": bg, "object": pair_obj[0], "mask": pair_obj[1], "box": box}]


def _composition_example(app: App, comp, base: Path) -> list:
    comp = comp[0] if isinstance(comp, list) else comp
    background = base / comp["background"]
    with Image.open(background) as im:
        size = im.size
    (box,) = _composition_boxes(size, *comp["box"])
    layer = _example_layer(app, f"box-{Path(background).stem}-{'-'.join(f'{v:g}' for v in comp['box'])}",
                           box_layer(size, [box]))
    return [{"background": str(background), "layers": [layer], "composite": None},
            example_editor(app, base / comp["object"], base / comp["mask"] if comp.get("mask") else None),
            *comp["box"]]


#: input kind key -> its widgets
KIND_WIDGETS: dict[str, KindWidgets] = {
    "references": KindWidgets(_references_build, _references_read, _references_example,
                              _slots("image", "prompt", prefix="reference")),
    "subjects": KindWidgets(_subjects_build, _subjects_read, _subjects_example,
                            (*_slots("word", "prompt", "region", "image", prefix="subject"), "regions_drawing")),
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
