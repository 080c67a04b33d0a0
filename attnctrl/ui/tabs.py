"""The layout of the web app, derived from the method registry: shared controls on top, a tab per method, shared
outputs on the right.

A method's tab is its input kinds' widgets (:data:`attnctrl.ui.inputs.KIND_WIDGETS`), a widget per option its
registry entry lists in ``controls``, a JSON box for the other options, and its examples; a method the registry
marks ``speedup`` is a switch (in "Speed-ups") applied beside whatever the tab does. Nothing here names a method.

Each tab's Generate is an API endpoint (``/generate_<tab>``) whose parameters are named after the fields
(``prompt``, ``seed``, ``mask_weights``, ``reference_1_image``, ...). A file uploaded into a slot is checked at once
by the input module's own check (a toast naming the slot); a file an image slot refuses in the browser (the editor
drops it without a word) is reported by the page's script (:data:`UPLOAD_SCRIPT`) to the same message.

Beside each Generate is a Stop (:meth:`App.stop`), and below them the run's progress and result (the shared outputs
may be scrolled out of view on a long tab); Generate reads "Generating..." while it runs, and a new run or an
example's click clears the previous run's results (:func:`cleared`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass, field, fields

import gradio as gr

from ..core.errors import AttnCtrlError
from ..inputs import not_an_image
from ..methods import MethodEntry, entries
from .app import EXAMPLES, MODEL_CHOICES, App, Result, Settings, default_options
from .inputs import (
    BOX_SCRIPT,
    IMAGE_UPLOAD,
    KIND_WIDGETS,
    example_option,
    option_value,
    option_widget,
    options_json,
    slider,
    upload_check,
)

logger = logging.getLogger("attnctrl.ui")

COMMON = [f.name for f in fields(Settings) if f.name != "speedups"]
INTRO = """# attnctrl
Training-free attention control for diffusers. Pick a model (the embedded **toyworld** model draws coloured shapes
offline: try *a red circle on the left and a blue square on the right*), a tab for the method, and press **Generate**.
Every picture carries its settings in its PNG metadata (`attnctrl info FILE` prints them)."""


@dataclass
class Tab:
    """One tab: its method (None: plain generation), widget groups (``(kind key or option name, components)``)."""

    key: str
    title: str
    entry: MethodEntry | None
    groups: list
    more: object = None
    uploads: dict = field(default_factory=dict)  # elem_id of an image slot -> its label

    def flat(self) -> list:
        return [c for _, comps in self.groups for c in comps] + ([self.more] if self.more is not None else [])

    def names(self) -> list[str]:
        """The API parameter names of :meth:`flat`'s widgets: the kinds' slot names, the option names."""
        names = [n for key, comps in self.groups for n in (KIND_WIDGETS[key].names if key in KIND_WIDGETS else [key])]
        return names + (["more_options"] if self.more is not None else [])

    def request(self, app: App, values) -> tuple[str | None, dict, dict]:
        """``(method, options, inputs)`` from the tab's widget values (see :meth:`flat`)."""
        if self.entry is None:
            return None, {}, {}
        i, options, inputs = 0, {}, {}
        for name, comps in self.groups:
            part = list(values[i:i + len(comps)])
            i += len(comps)
            if name in KIND_WIDGETS:
                inputs[name] = KIND_WIDGETS[name].read(app, part)
            else:
                value = option_value(self.entry.config, name, part[0])
                if value is not None:
                    options[name] = value
        options.update(options_json(values[i] if self.more is not None else None))
        return self.entry.name, options, inputs

    def example_row(self, app: App, example: dict) -> list:
        """The widget values of a registry example (job-file form, paths relative to the shipped examples)."""
        row = [example.get("model") or app.default_model, example["prompt"] if isinstance(example["prompt"], str)
               else "\n".join(example["prompt"]), example.get("steps") or 0, example.get("num_frames") or 0]
        options = dict(example.get("options") or {})
        for name, _ in self.groups:
            if name in KIND_WIDGETS:
                row += KIND_WIDGETS[name].example(app, example.get(name), EXAMPLES)
            else:
                row.append(example_option(options.pop(name, option_widget_default(self.entry, name))))
        if self.more is not None:
            import json

            row.append(json.dumps(options) if options else "")
        return row


def option_widget_default(entry: MethodEntry, name: str):
    f = next(f for f in entry.options if f.name == name)
    return f.default


def _tabs() -> list[Tab]:
    return [Tab("plain", "Text to image", None, [])] + [
        Tab(e.name, e.title, e, []) for e in entries() if not e.speedup]


def _build_tab(tab: Tab) -> None:
    e = tab.entry
    if e is None:
        gr.Markdown("Plain generation, no method: the base for every comparison.")
        return
    note = " Give one prompt per line in the Prompt box, one segment each." if e.prompts == "many" else ""
    gr.Markdown(f"**{e.title}**: {e.summary}{note}")
    for key in e.inputs:
        kind = KIND_WIDGETS[key]
        comps = kind.build()
        tab.groups.append((key, comps))
        for comp, name in zip(comps, kind.names):
            if isinstance(comp, (gr.ImageEditor, gr.Image, gr.File)):  # checked as soon as a file is uploaded
                comp.elem_id = f"upload-{tab.key}-{name}"
                if IMAGE_UPLOAD in (comp.elem_classes or []):
                    tab.uploads[comp.elem_id] = comp.label
                comp.upload(upload_check(kind.check, comp.label), inputs=comp, outputs=None, preprocess=False,
                            show_progress="hidden", api_visibility="private")
    with gr.Row():
        for control in e.controls:
            tab.groups.append((control.option, [option_widget(e.config, control)]))
    with gr.Accordion("More options", open=False):
        tab.more = gr.Textbox(label="More options (JSON)", placeholder='{"start_step": 0}', lines=2)
        gr.Markdown(default_options(e.name))


def _user_errors(fn):
    """Run ``fn``; errors a user can fix become the page's error message, others are logged first; each
    :class:`~attnctrl.errors.AttnCtrlWarning` raised on the way is shown once as a warning toast."""
    from ..errors import AttnCtrlWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AttnCtrlWarning)
            try:
                return fn()
            finally:
                for text in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, AttnCtrlWarning)):
                    gr.Warning(text)
    except gr.Error:
        raise
    except AttnCtrlError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:
        logger.exception("generation failed")
        raise gr.Error(f"internal error ({type(e).__name__}: {e}); the server log has the details") from None


#: The page's script: a file that is not an image (by its type, or one named as an image that does not decode),
#: dropped on (or picked for) an image slot, is refused there and reported to the server, which answers with the
#: input module's message naming the slot (the image editor itself drops such a file without a word).
UPLOAD_SCRIPT = """() => {
  if (window.attnctrlUploads) return;
  window.attnctrlUploads = true;
  const report = (slot, name) => {
    const box = document.querySelector('#attnctrl-upload-report textarea, #attnctrl-upload-report input');
    if (!box) return;
    box.value = JSON.stringify({slot: slot.id, name: name, at: Date.now()});
    box.dispatchEvent(new Event('input', {bubbles: true}));
  };
  const refuse = (event, files) => {
    const slot = event.target instanceof Element ? event.target.closest('.IMAGE_UPLOAD') : null;
    if (!slot || !files || !files.length) return;
    const file = Array.from(files).find((f) => !(f.type || '').startsWith('image/'));
    if (!file) {  // named as an image: the editor drops one that does not decode without a word
      createImageBitmap(files[0]).catch(() => report(slot, files[0].name));
      return;
    }
    event.preventDefault();
    event.stopImmediatePropagation();
    if (event.type === 'change') event.target.value = '';
    report(slot, file.name);
  };
  document.addEventListener('drop', (e) => refuse(e, e.dataTransfer && e.dataTransfer.files), true);
  document.addEventListener('change', (e) => e.target.type === 'file' && refuse(e, e.target.files), true);
}""".replace("IMAGE_UPLOAD", IMAGE_UPLOAD)


def _refused_upload(slots: dict):
    """The server's side of :data:`UPLOAD_SCRIPT`: the message for a file an image slot refused."""

    def refused(report: str) -> None:
        try:
            data = json.loads(report or "{}")
        except json.JSONDecodeError:
            return
        label = slots.get(data.get("slot")) if isinstance(data, dict) else None
        if label is not None:
            raise gr.Error(str(not_an_image(label, str(data.get("name") or "the file"))), print_exception=False)

    return refused


def _examples(app: App, tab: Tab, inputs: list, shown_results: list) -> None:
    """The tab's registry examples as a table; a click fills every one of ``inputs`` (model, prompt, steps, frames
    and the tab's widgets), an empty slot with None, so nothing of an earlier entry stays behind, and clears
    ``shown_results`` (the previous run's outputs, see :func:`cleared`)."""
    rows = [tab.example_row(app, x) for x in (tab.entry.examples if tab.entry else ())]
    if not rows:
        return
    shown = [[_page_value(c, v) for c, v in zip(inputs, row)] for row in rows]
    table = gr.Dataset(components=inputs, samples=rows, type="index", label="Examples (shipped inputs and settings)")

    def load(index: int) -> list:
        return list(shown[index])

    load.__name__ = f"load_example_{tab.key}"
    table.click(load, inputs=table, outputs=inputs, postprocess=False, show_progress="hidden", queue=False,
                api_visibility="undocumented").then(
        cleared, outputs=shown_results, show_progress="hidden", queue=False, api_visibility="private")


def _page_value(component, value):
    """``value`` of ``component`` as the page takes it (what ``gr.Examples`` does: files go to gradio's cache now,
    so the shipped examples need no allowed path)."""
    from gradio import processing_utils
    from gradio.data_classes import GradioModel, GradioRootModel

    value = component.postprocess(value)
    if isinstance(value, (GradioModel, GradioRootModel)):
        value = value.model_dump()
    return processing_utils.move_files_to_cache(value, component, postprocess=True, keep_in_cache=True)


def _outputs(result: Result):
    """The values of a tab's Generate outputs: the shared ones, the seed, then the tab's status and preview."""
    video = gr.Video(value=result.video, visible=result.video is not None)
    before_after = gr.ImageSlider(value=result.before_after, visible=result.before_after is not None)
    return (result.images, video, before_after, result.artifacts, result.files, result.info, result.seed,
            result.info, result.images[0][0] if result.images else None)


def cleared(status: str = "") -> tuple:
    """What the result components show with no result (gallery, video, before/after, maps, files, info, the tab's
    status and preview): an example's click and a new run start from it, never from the previous run's files."""
    return ([], gr.Video(value=None, visible=False), gr.ImageSlider(value=None, visible=False), [], None, "",
            status, None)


def _busy(label: str):
    """The start of a tab's run: its Generate busy, its Stop usable, the results cleared."""

    def busy():
        return (gr.Button(value="Generating...", interactive=False), gr.Button(interactive=True),
                *cleared(f"{label}: generating..."))

    busy.__name__ = "busy"
    return busy


def _idle(label: str):
    """The end of a tab's run (done, failed or stopped): its Generate back, its Stop off."""

    def idle():
        return gr.Button(value=f"Generate ({label})", interactive=True), gr.Button(interactive=False)

    idle.__name__ = "idle"
    return idle


def _stopper(app: App):
    """Stop: the running generation ends after its current step (see :meth:`App.stop`)."""

    def stop() -> None:
        if app.stop():
            gr.Info("Stopping after the current step...")

    return stop


def _speedups() -> list[MethodEntry]:
    return [e for e in entries() if e.speedup]


def build(app: App) -> gr.Blocks:
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", str(app.output / "cached-examples"))
    with gr.Blocks(title="attnctrl") as demo:
        gallery = gr.Gallery(label="Images", columns=2, height=360, format="png", elem_id="gallery",
                             buttons=["download", "download_all", "fullscreen"], interactive=False, render=False)
        video = gr.Video(label="Video", visible=False, elem_id="video", render=False)
        before_after = gr.ImageSlider(label="Before (no method) / after", type="filepath", visible=False,
                                      render=False, elem_id="before-after")
        artifacts = gr.Gallery(label="Maps and masks of the method", columns=3, height=200, format="png",
                               interactive=False, elem_id="artifacts", render=False)
        files = gr.File(label="Files (PNG with metadata, JSON records, videos)", file_count="multiple",
                        interactive=False, render=False, elem_id="files")
        info = gr.Markdown(elem_id="info", render=False)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                model = gr.Dropdown(MODEL_CHOICES, value=app.default_model, label="Model", allow_custom_value=True,
                                    info="or a local diffusers folder, a checkpoint file or a cached hub id")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    value="a red circle on the left and a blue square on the right")
                # no gradio minimum on the numbers: the app's and the run layer's checks name the field
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    randomize = gr.Checkbox(False, label="Random seed")
                    reuse = gr.Button("♻ Reuse last seed", size="sm")
                    count = slider(1, 8, 1, step=1, label="Batch count")
                with gr.Accordion("Advanced", open=False):
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        steps = gr.Number(0, label="Steps", precision=0, info="0: the model's")
                        guidance = gr.Number(0, label="Guidance scale", info="0: the model's")
                        width = gr.Number(0, label="Width", precision=0, **size_hint(app.default_model))
                        height = gr.Number(0, label="Height", precision=0, **size_hint(app.default_model))
                        frames = gr.Number(0, label="Frames (video)", precision=0,
                                           info="video models: frames per clip / segment; 0: the model's")
                    compare = gr.Checkbox(False, label="Before/after: also generate without the method (same seed)")
                    offload = gr.Radio([("off", "none"), ("per module", "model"), ("per layer", "sequential")],
                                       value="none", label="CPU offload (GPU)",
                                       info="per module: modules move to the GPU while they run (checkpoints larger "
                                       "than its memory); per layer: least memory, slowest")
                    backend = gr.Dropdown(["auto", "native", "flash", "sage", "xformers", "flex"], value="auto",
                                          label="Attention backend", info="diffusers' backend for plain attention; "
                                          "flash, sage and xformers need a GPU and their package")
                speed = []  # (entry, switch, [(option, widget)])
                with gr.Accordion("Speed-ups (apply to every tab)", open=False):
                    for e in _speedups():
                        with gr.Row():
                            switch = gr.Checkbox(False, label=f"{e.title} ({', '.join(e.families)})")
                            speed.append((e, switch, [(c.option, option_widget(e.config, c)) for c in e.controls]))
                common = dict(model=model, prompt=prompt, negative_prompt=negative, seed=seed, randomize=randomize,
                              steps=steps, guidance=guidance, width=width, height=height, count=count,
                              compare=compare, num_frames=frames, offload=offload,
                              attention_backend=backend)
                assert list(common) == COMMON
                speed_widgets = [w for _, switch, ws in speed for w in [switch, *(w for _, w in ws)]]
                tabs = []
                shared = [gallery, video, before_after, artifacts, files, info]
                with gr.Tabs():
                    for tab in _tabs():
                        with gr.Tab(tab.title, id=tab.key):
                            _build_tab(tab)
                            with gr.Row():
                                button = gr.Button(f"Generate ({tab.title})", variant="primary", scale=4,
                                                   elem_id=f"generate-{tab.key}")
                                stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, min_width=80,
                                                 elem_id=f"stop-{tab.key}")
                            # the run's progress and result beside its button (the shared outputs may be far up)
                            status = gr.Markdown(elem_id=f"status-{tab.key}")
                            preview = gr.Image(label="Result (the first output)", type="filepath", height=220,
                                               format="png", interactive=False, elem_id=f"preview-{tab.key}")
                            tabs.append((tab, button, stop, status, preview))
                            # a click fills the inputs (its model too) and clears the results; Generate runs it
                            _examples(app, tab, [model, prompt, steps, frames] + tab.flat(),
                                      shared + [status, preview])
            with gr.Column(scale=2):
                for component in (gallery, video, before_after, artifacts, files, info):
                    component.render()
        last_seed = gr.State(0)
        reuse.click(lambda s: (s, False), inputs=last_seed, outputs=[seed, randomize], api_visibility="private")
        model.change(lambda m: (gr.Number(**size_hint(m)),) * 2, inputs=model, outputs=[width, height], queue=False,
                     show_progress="hidden", api_visibility="private")
        for tab, button, stop, status, preview in tabs:
            quick = dict(queue=False, show_progress="hidden", api_visibility="private")
            run = button.click(_busy(tab.title), outputs=[button, stop, *shared, status, preview], **quick).then(
                _handler(app, tab, speed), inputs=list(common.values()) + speed_widgets + tab.flat(),
                outputs=[*shared, last_seed, status, preview], show_progress_on=[status, preview, gallery],
                concurrency_limit=1, concurrency_id="generate")
            # done or failed (gradio's page does not run a .then() after an error)
            run.success(_idle(tab.title), outputs=[button, stop], **quick)
            run.failure(_idle(tab.title), outputs=[button, stop], **quick)
            stop.click(_stopper(app), outputs=None, **quick)
        report = gr.Textbox(visible="hidden", elem_id="attnctrl-upload-report")
        report.change(_refused_upload({k: v for tab, *_ in tabs for k, v in tab.uploads.items()}), inputs=report,
                     outputs=None, show_progress="hidden", api_visibility="private")
        demo.load(None, js=f"() => {{ ({UPLOAD_SCRIPT})(); ({BOX_SCRIPT})(); }}")
    return demo


def size_hint(model: str | None) -> dict:
    """The ``step`` and ``info`` of the width and height boxes for ``model``: the multiple its sides must be and its
    largest side, as the run layer checks them (read from the model's configs, nothing loaded)."""
    from ..models import size_rule
    from ..run.request import MAX_SIZE_FACTOR

    try:
        native, multiple = size_rule(model) or (None, 8)
    except Exception:  # a name being typed: the run layer's checks speak at Generate
        native, multiple = None, 8
    most = f", at most {MAX_SIZE_FACTOR * native}" if native else ""
    return {"step": multiple, "info": f"0: the model's; a multiple of {multiple}{most}"}


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def widget_settings(values, speed=(), speed_values=()) -> Settings:
    """Settings from the widgets' values; 0 in steps, guidance, size and frames means the model's value; the
    speed-ups switched on, with their options."""
    given = dict(zip(COMMON, values))
    for key in ("prompt", "negative_prompt", "model", "offload", "attention_backend"):  # a widget never shown sends None
        if given.get(key) is None:
            given.pop(key, None)
    for key in ("steps", "guidance", "width", "height", "num_frames"):
        if not given.get(key):
            given[key] = None
    speedups, i = {}, 0
    for e, _, ws in speed:
        on, opts = speed_values[i], speed_values[i + 1:i + 1 + len(ws)]
        i += 1 + len(ws)
        if on:
            speedups[e.name] = {name: option_value(e.config, name, v) for (name, _), v in zip(ws, opts)
                                if option_value(e.config, name, v) is not None}
    return Settings(**given, speedups=speedups)


def _speed_names(speed) -> list[str]:
    """The API parameter names of the speed-up widgets: ``speedup_<method>`` for a switch, then its options."""
    return [_identifier(n) for e, _, ws in speed for n in [f"speedup_{e.name}", *(f"speedup_{e.name}_{o}" for o, _ in ws)]]


def _handler(app: App, tab: Tab, speed):
    """The tab's Generate: ``run(*values, progress)``, the values in the order common settings, speed-ups, the
    tab's widgets; its signature names each value after its field, which gradio shows as the API's parameter
    names (not ``param_0`` ...)."""
    n_speed = sum(1 + len(ws) for _, _, ws in speed)
    names = [*COMMON, *_speed_names(speed), *tab.names()]

    def run(*values):
        values = values[:-1]  # gradio's progress tracker, the last parameter of the signature below

        def work():
            settings = widget_settings(values[:len(COMMON)], speed, values[len(COMMON):len(COMMON) + n_speed])
            method, options, inputs = tab.request(app, values[len(COMMON) + n_speed:])
            return app.generate(settings, method, options, inputs)

        result = _user_errors(work)
        if result.stopped:
            gr.Info(result.info.replace("*", ""))
        return _outputs(result)

    run.__name__ = f"generate_{tab.key}"
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(name, positional) for name in names]
        + [inspect.Parameter("progress", positional, default=gr.Progress(track_tqdm=True))])
    return run
