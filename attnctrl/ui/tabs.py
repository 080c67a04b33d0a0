"""The layout of the web app: shared controls on top, one tab per method, shared outputs on the right.

Each tab's inputs are turned into a method config and its inputs by :mod:`attnctrl.ui.inputs`; AgentAttention and
CLEAR are switches (in "Speed-ups") applied beside whatever the tab does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ..core.errors import AttnCtrlError
from ..models.toyworld.examples import shipped_composition, shipped_references
from .app import EXAMPLES, MODEL_CHOICES, SLOTS, App, Result, Settings, default_options
from .inputs import TABS

logger = logging.getLogger("attnctrl.ui")

COMMON = [f.name for f in fields(Settings)]
INTRO = """# attnctrl
Training-free attention control for diffusers. Pick a model (the embedded **toyworld** model draws coloured shapes
offline: try *a red circle on the left and a blue square on the right*), a tab for the method, and press **Generate**.
Every picture carries its settings in its PNG metadata (`attnctrl info FILE`)."""


def _editor(label: str, **kw):
    return gr.ImageEditor(label=label, type="pil", format="png", image_mode="RGBA", sources=("upload", "clipboard"),
                          brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"), height=260,
                          layers=gr.LayerOptions(allow_additional_layers=False), transforms=(), **kw)


def _more(name: str):
    with gr.Accordion("More options", open=False):
        box = gr.Textbox(label="More options (JSON)", placeholder='{"start_step": 0}', lines=2)
        gr.Markdown(default_options(name))
    return box


EMPTY = {"background": None, "layers": [], "composite": None}  # an empty editor in an example (None drops the column)


def _example_layer(mask_file: Path, folder: Path) -> str:
    """An editor layer (red paint with alpha) from a mask file, so an example opens with its mask painted."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"layer-{mask_file.name}"
    if not out.exists():
        mask = np.asarray(Image.open(mask_file).convert("L")) > 127
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[mask] = (255, 0, 0, 160)
        Image.fromarray(rgba).save(out)
    return str(out)


def _example_editor(app: App, name: str):
    image, mask = EXAMPLES / f"{name}.png", EXAMPLES / f"{name}-mask.png"
    return {"background": str(image), "layers": [_example_layer(mask, app.output / "example-layers")],
            "composite": None}


def _outputs(result: Result):
    video = gr.Video(value=result.video, visible=result.video is not None)
    before_after = gr.ImageSlider(value=result.before_after, visible=result.before_after is not None)
    return (result.images, video, before_after, result.artifacts, result.files, result.info, result.seed)


def _user_errors(fn):
    """Run ``fn``; errors a user can fix become the page's error message, others are logged first."""
    try:
        return fn()
    except gr.Error:
        raise
    except AttnCtrlError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:
        logger.exception("generation failed")
        raise gr.Error(f"internal error ({type(e).__name__}: {e}); the server log has the details") from None


def build(app: App) -> gr.Blocks:
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", str(app.output / "cached-examples"))
    with gr.Blocks(title="attnctrl") as demo:
        gallery = gr.Gallery(label="Images", columns=2, height=360, format="png", elem_id="gallery",
                             buttons=["download", "download_all", "fullscreen"], interactive=False, render=False)
        video = gr.Video(label="Video", visible=False, elem_id="video", render=False)
        before_after = gr.ImageSlider(label="Before (no method) / after", type="filepath", visible=False,
                                      render=False)
        artifacts = gr.Gallery(label="Attention maps and masks", columns=3, height=200, format="png",
                               interactive=False, elem_id="artifacts", render=False)
        files = gr.File(label="Files (PNG with metadata, JSON records, videos)", file_count="multiple",
                        interactive=False, render=False)
        info = gr.Markdown(elem_id="info", render=False)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                model = gr.Dropdown(MODEL_CHOICES, value=app.default_model, label="Model", allow_custom_value=True,
                                    info="or a local diffusers folder, a checkpoint file or a cached hub id")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    value="a red circle on the left and a blue square on the right")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                    randomize = gr.Checkbox(False, label="Random seed")
                    reuse = gr.Button("♻ Reuse last seed", size="sm")
                    count = gr.Slider(1, 8, 1, step=1, label="Batch count")
                with gr.Accordion("Advanced", open=False):
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        steps = gr.Number(0, label="Steps", precision=0, minimum=0, info="0: the model's")
                        guidance = gr.Number(0, label="Guidance scale", minimum=0, info="0: the model's")
                        width = gr.Number(0, label="Width", precision=0, minimum=0, step=8, info="0: the model's")
                        height = gr.Number(0, label="Height", precision=0, minimum=0, step=8, info="0: the model's")
                        frames = gr.Number(0, label="Frames (video)", precision=0, minimum=0,
                                           info="video models: frames per clip / segment; 0: the model's")
                    compare = gr.Checkbox(False, label="Before/after: also generate without the method (same seed)")
                with gr.Accordion("Speed-ups (apply to every tab)", open=False):
                    with gr.Row():
                        agent = gr.Checkbox(False, label="Agent attention (SD / SDXL)")
                        agent_ratio = gr.Slider(0, 0.9, 0.4, step=0.05, label="Token merging ratio")
                        agent_agent_ratio = gr.Slider(0.05, 1, 0.95, step=0.05, label="Agent ratio")
                    with gr.Row():
                        clear = gr.Checkbox(False, label="CLEAR local attention (FLUX)")
                        clear_radius = gr.Slider(1, 64, 8, step=1, label="CLEAR radius (tokens)")
                common = dict(model=model, prompt=prompt, negative_prompt=negative, seed=seed, randomize=randomize,
                              steps=steps, guidance=guidance, width=width, height=height, count=count,
                              compare=compare, agent=agent, agent_ratio=agent_ratio,
                              agent_agent_ratio=agent_agent_ratio, clear=clear, clear_radius=clear_radius,
                              num_frames=frames)
                assert list(common) == COMMON
                tabs = {}
                with gr.Tabs():
                    for key, (title, name, _) in TABS.items():
                        with gr.Tab(title, id=key):
                            button, groups, examples = _tab(app, key, name)
                            flat = [c for g in groups for c in (g if isinstance(g, list) else [g])]
                            tabs[key] = button, groups, flat
                            if examples:  # run on first click with the default model, then served from the cache
                                gr.Examples(examples, inputs=[prompt] + flat, outputs=[gallery, artifacts, info],
                                            fn=_example_handler(app, key, groups), cache_examples=True,
                                            cache_mode="lazy", label="Examples (default model and settings)")
            with gr.Column(scale=2):
                for component in (gallery, video, before_after, artifacts, files, info):
                    component.render()
        last_seed = gr.State(0)
        outputs = [gallery, video, before_after, artifacts, files, info, last_seed]
        reuse.click(lambda s: (s, False), inputs=last_seed, outputs=[seed, randomize])
        for key, (button, groups, flat) in tabs.items():
            button.click(_handler(app, key, groups), inputs=list(common.values()) + flat, outputs=outputs,
                         concurrency_limit=1, concurrency_id="generate")
    return demo


def _unflatten(groups, values):
    out, i = [], 0
    for g in groups:
        if isinstance(g, list):
            out.append(list(values[i:i + len(g)]))
            i += len(g)
        else:
            out.append(values[i])
            i += 1
    return out


def widget_settings(values) -> Settings:
    """Settings from the widgets' values; 0 in steps, guidance, size and frames means the model's value."""
    given = dict(zip(COMMON, values))
    for key in ("prompt", "negative_prompt", "model"):  # a widget never shown (closed accordion) sends None
        if given.get(key) is None:
            given.pop(key, None)
    for key in ("steps", "guidance", "width", "height", "num_frames"):
        if not given.get(key):
            given[key] = None
    return Settings(**given)


def _generate(app: App, key: str, settings: Settings, args) -> Result:
    """One generation from a tab: its widgets' values -> method config and inputs -> :meth:`App.generate`."""
    config, inputs = TABS[key][2](app, settings, *args)
    return app.generate(settings, config, inputs)


def _handler(app: App, key: str, groups):
    def run(progress=gr.Progress(track_tqdm=True), *values):  # noqa: B008 (gradio reads the default)
        settings = widget_settings(values[:len(COMMON)])
        args = _unflatten(groups, values[len(COMMON):])
        return _outputs(_user_errors(lambda: _generate(app, key, settings, args)))

    run.__name__ = f"generate_{key}"
    return run


def _example_handler(app: App, key: str, groups):
    def run(prompt, *values):
        settings = Settings(model=app.default_model, prompt=prompt)
        result = _user_errors(lambda: _generate(app, key, settings, _unflatten(groups, values)))
        return result.images, result.artifacts, result.info

    run.__name__ = f"example_{key}"
    return run


def _slots(make, label: str):
    return [make(f"{label} {i + 1}") for i in range(SLOTS)]


def _tab(app: App, key: str, name: str | None):
    """The widgets of one tab: ``(button, groups, examples)``; groups are components or lists of them (slots)."""
    refs, comp = shipped_references(), shipped_composition()
    examples = []
    if key == "plain":
        gr.Markdown("Plain generation. Name words to see where the model put them (AttentionMaps heat maps).")
        words = gr.Textbox(label="Heat maps of words (comma-separated, optional)", placeholder="circle, square")
        more = _more("attention-maps")
        groups = [words, more]
        examples = [["a red circle on the left and a blue square on the right", "circle, square", ""]]
    elif key in ("freecustom", "magicface"):
        gr.Markdown("One reference image per concept; paint over the concept to give its mask (no paint: the whole "
                    "image). The prompt of a reference describes its image."
                    + (" Each reference binds to a word of the prompt." if key == "magicface" else ""))
        editors, prompts, words = [], [], []
        for i in range(SLOTS):
            with gr.Group():
                editors.append(_editor(f"Reference {i + 1}"))
                with gr.Row():
                    prompts.append(gr.Textbox(label=f"Reference {i + 1} prompt"))
                    if key == "magicface":
                        words.append(gr.Textbox(label=f"Reference {i + 1} word in the prompt"))
        with gr.Row():
            weight = gr.Slider(0, 6, 3.0, step=0.1, label="Mask weight (w)")
            if key == "magicface":
                inject = gr.Slider(0, 1, 0.4, step=0.05, label="Switch to region blending after (fraction of steps)")
        more = _more(name)
        groups = [editors, prompts] + ([words] if key == "magicface" else []) + [weight]
        groups += [inject] if key == "magicface" else []
        groups.append(more)
        # the shipped striped references whose stripes this model carries over (docs/methods/freecustom.md), with
        # the mask weight that carries them best on it; the prompt names shapes only: the looks come from the images
        if {"striped-green-square", "striped-red-circle"} <= set(refs):
            square, circle = refs["striped-green-square"], refs["striped-red-circle"]
            if key == "magicface":
                row = ["a square on the left and a circle on the right", _example_editor(app, "striped-green-square"),
                       _example_editor(app, "striped-red-circle"), EMPTY, square["prompt"], circle["prompt"], "",
                       "square", "circle", "", 2.0, 0.4, ""]
            else:
                row = ["a circle in the middle", _example_editor(app, "striped-red-circle"), EMPTY, EMPTY,
                       circle["prompt"], "", "", 2.0, ""]
            examples = [row]
    elif key == "irdiffusion":
        gr.Markdown("Subjects that stay consistent: each is a word of the prompt with a reference image (paint its "
                    "mask) or a reference prompt (IR-Diffusion draws the reference first), and optionally a region "
                    "x0,y0,x1,y1 (pixels or fractions; empty: a layout rehearsal picks it).")
        words, editors, prompts, regions = [], [], [], []
        for i in range(SLOTS):
            with gr.Group():
                with gr.Row():
                    words.append(gr.Textbox(label=f"Subject {i + 1} word"))
                    prompts.append(gr.Textbox(label=f"Subject {i + 1} reference prompt",
                                              placeholder="the subject where it goes: a striped green star on the left"))
                    regions.append(gr.Textbox(label=f"Subject {i + 1} region", placeholder="0,0,0.5,1"))
                editors.append(_editor(f"Subject {i + 1} reference image (optional)"))
        lam = gr.Slider(0, 1, 0.9, step=0.05, label="Mutual attention weight (lambda)")
        more = _more(name)
        groups = [words, editors, prompts, regions, lam, more]
        if "striped-green-star" in refs:
            examples = [["a star on the left and a circle on the right", "star", "circle", "",
                         _example_editor(app, "striped-green-star"), EMPTY, EMPTY,
                         "a striped green star on the left", "a hollow pink circle on the right", "",
                         "0,0,0.5,1", "0.5,0,1,1", "", 0.9, ""]]
    elif key == "clora":
        gr.Markdown("Compose LoRAs, one concept each: upload each LoRA with its trigger word (e.g. `sks dog`) and "
                    "its own prompt; the prompt above names every concept by its class word.")
        files, words, prompts = [], [], []
        for i in range(SLOTS):
            with gr.Row():
                files.append(gr.File(label=f"LoRA {i + 1}", file_types=[".safetensors"], height=90))
                words.append(gr.Textbox(label=f"LoRA {i + 1} trigger word"))
                prompts.append(gr.Textbox(label=f"LoRA {i + 1} prompt"))
        with gr.Row():
            step = gr.Slider(0, 50, 20.0, step=1, label="Latent update step size")
            threshold = gr.Slider(0, 1, 0.3, step=0.05, label="Mask threshold")
        more = _more(name)
        groups = [files, words, prompts, step, threshold, more]
        loras = [EXAMPLES / f"toyworld-{w}-lora.safetensors" for w in ("sks", "zwx")]
        if all(p.is_file() for p in loras):  # sks square = a dotted blue square, zwx star = a striped green star
            from ..models.toyworld.lora import CLORA_SETTINGS  # the 64-px model's settings

            more_options = json.dumps({k: v for k, v in CLORA_SETTINGS.items() if k != "step_size"})
            examples = [["a square on the left and a star on the right", str(loras[0]), str(loras[1]), None,
                         "sks square", "zwx star", "", "a sks square on the left and a star on the right",
                         "a square on the left and a zwx star on the right", "", CLORA_SETTINGS["step_size"], 0.3,
                         more_options]]
    elif key == "primecomposer":
        gr.Markdown("Put an object into a background: paint over the object in its image, then give the box "
                    "(pixels of the background) it goes into.")
        with gr.Row():
            background = gr.Image(label="Background", type="pil", format="png", height=260)
            obj = _editor("Object (paint its mask)")
        with gr.Row():
            x = gr.Number(0, label="Box x")
            y = gr.Number(0, label="Box y")
            w = gr.Number(None, label="Box width")
            h = gr.Number(None, label="Box height")
        domain = gr.Radio(["same", "cross"], value="cross", label="Domain",
                          info="same: object and background alike (photo into photo, toyworld into toyworld); "
                               "cross: a photo object into a painting, sketch or cartoon")
        more = _more(name)
        groups = [background, obj, x, y, w, h, domain, more]
        if comp is not None:
            bx = comp["box_xywh"]
            examples = [[comp["prompt"], str(EXAMPLES / comp["background"]),
                         _example_editor(app, Path(comp["reference"]).stem), *bx, "same", ""]]
    elif key == "ditctrl":
        gr.Markdown("A long video from several prompts (CogVideoX models, e.g. `tiny-cogvideox` or "
                    "`THUDM/CogVideoX-2b`): one prompt per line, a segment each, with smooth transitions.")
        lines = gr.Textbox(label="Prompts, one per line", lines=4,
                           placeholder="a car drives on a road\na car drives on a snowy road")
        transitions = gr.Slider(0, 4, 2, step=1, label="Transition segments between prompts")
        more = _more(name)
        groups = [lines, transitions, more]
    else:  # pragma: no cover
        raise KeyError(key)
    button = gr.Button(f"Generate ({TABS[key][0]})", variant="primary", elem_id=f"generate-{key}")
    return button, groups, examples
