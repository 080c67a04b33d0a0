"""The web app: its functions on the tiny SD 1.5 (one App, one model load), then the page in headless Chromium."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from attnctrl.core.errors import AttnCtrlError  # noqa: E402
from attnctrl.run import method_config  # noqa: E402
from attnctrl.ui import App, Settings  # noqa: E402
from attnctrl.ui.app import editor_inputs  # noqa: E402
from attnctrl.ui.inputs import KIND_WIDGETS, options_json  # noqa: E402
from attnctrl.ui.tabs import COMMON, Tab, _handler, _user_errors  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "attnctrl" / "assets" / "examples"
# ATTNCTRL_UI_TEST_MODEL=toyworld ATTNCTRL_UI_TEST_STEPS=25 ATTNCTRL_SCREENSHOT=docs/ui.png makes the README picture
MODEL = os.environ.get("ATTNCTRL_UI_TEST_MODEL", "tiny-sd15")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = App(MODEL, tmp_path_factory.mktemp("ui"))
    app.pipeline(MODEL)
    return app


def settings(**kw) -> Settings:
    return Settings(**{"model": MODEL, "prompt": "a red circle on the left and a blue square on the right",
                       "steps": 2, **kw})


def layer(size, box) -> Image.Image:
    """An editor layer with paint (alpha 200) inside ``box``."""
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1] = (255, 0, 0, 200)
    return Image.fromarray(rgba)


def star_editor():
    image = Image.open(EXAMPLES / "striped-green-star.png")
    mask = np.asarray(Image.open(EXAMPLES / "striped-green-star-mask.png").convert("L")) > 127
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (255, 0, 0, 160)
    return {"background": image, "layers": [Image.fromarray(rgba)], "composite": None}, mask


# -- pure functions -------------------------------------------------------------------------------------------------
def test_editor_mask_is_the_painted_area():
    image = Image.new("RGB", (32, 24), "white")
    got_image, mask = editor_inputs({"background": image, "layers": [layer((32, 24), (4, 2, 10, 8))]}, "Ref 1")
    assert got_image.size == (32, 24)
    expected = np.zeros((24, 32), bool)
    expected[2:8, 4:10] = True
    np.testing.assert_array_equal(np.asarray(mask) > 0, expected)
    # two layers: the union; no paint: no mask (the whole image); nothing uploaded: an empty slot
    _, mask2 = editor_inputs({"background": image, "layers": [layer((32, 24), (4, 2, 10, 8)),
                                                              layer((32, 24), (20, 10, 30, 20))]}, "Ref 1")
    assert (np.asarray(mask2) > 0).sum() == 6 * 6 + 10 * 10
    assert editor_inputs({"background": image, "layers": [layer((32, 24), (0, 0, 0, 0))]}, "Ref 1")[1] is None
    assert editor_inputs({"background": None, "layers": []}, "Ref 1") is None
    assert editor_inputs(None, "Ref 1") is None


def test_editor_errors_name_the_slot():
    image = Image.new("RGB", (32, 24))
    with pytest.raises(AttnCtrlError, match="Ref 2: the painted mask is 16x16 but the image is 32x24"):
        editor_inputs({"background": image, "layers": [layer((16, 16), (0, 0, 4, 4))]}, "Ref 2")
    with pytest.raises(AttnCtrlError, match="Ref 3: a mask was painted but no image"):
        editor_inputs({"background": None, "layers": [layer((16, 16), (0, 0, 4, 4))]}, "Ref 3")


def test_a_box_is_what_is_dragged_on_the_image():
    """A drag on a box editor: the bounding box of its paint in the box's colour; only paint that differs from the
    box as last drawn counts (a new drag gives a new box); a redraw read back is no change."""
    from attnctrl.ui.inputs import BOX_COLOURS, box_layer, painted_boxes

    def stroke(size, points, colour, radius=1):
        rgba = np.zeros((size[1], size[0], 4), np.uint8)
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        for x, y in points:
            rgba[y - radius:y + radius + 1, x - radius:x + radius + 1] = (*rgb, 200)
        return rgba

    diagonal = [(10 + k, 20 + 2 * k) for k in range(11)]  # (10, 20) to (20, 40)
    assert painted_boxes([stroke((64, 64), diagonal, BOX_COLOURS[0])])[:1] == [(9, 19, 22, 42)]
    drawn = box_layer((64, 64), [(9, 19, 22, 42)])
    assert painted_boxes([drawn], drawn) is None  # the page echoing the redraw
    assert painted_boxes([drawn])[0] == (9, 19, 22, 42)  # the drawn rectangle reads back as itself
    moved = drawn.copy()
    new = stroke((64, 64), [(40, 5), (50, 12)], BOX_COLOURS[0])
    moved[new[..., 3] > 0] = new[new[..., 3] > 0]
    assert painted_boxes([moved], drawn)[0] == (39, 4, 52, 14)  # the new stroke, not the union
    # the regions canvas: each colour its subject; a colour not touched keeps its box (None: unchanged)
    two = box_layer((100, 100), [(0, 20, 45, 80), (55, 20, 100, 80)])
    assert painted_boxes([two]) == [(0, 20, 45, 80), (55, 20, 100, 80), None]
    cyan = two.copy()
    new = stroke((100, 100), [(60, 10), (90, 30)], BOX_COLOURS[1], radius=2)
    cyan[new[..., 3] > 0] = new[new[..., 3] > 0]
    assert painted_boxes([cyan], two) == [None, (58, 8, 93, 33), None]


def test_examples_draw_their_boxes_and_masks_visibly(app):
    """An example's box (PrimeComposer), regions (IR-Diffusion) and masks are layers the editor shows: coloured,
    translucent pixels that read back as the example's exact box, regions and mask."""
    from attnctrl.methods import entry
    from attnctrl.ui.inputs import KIND_WIDGETS, MASK_COLOUR, painted_boxes

    example = entry("primecomposer").examples[0]
    background, obj, *box = KIND_WIDGETS["composition"].example(app, example["composition"], EXAMPLES)
    assert box == example["composition"]["box"]
    (layer,) = [np.asarray(Image.open(p).convert("RGBA")) for p in background["layers"]]
    x, y, w, h = box
    assert painted_boxes([layer])[0] == (x, y, x + w, y + h)
    for editor, mask_file in ((obj, example["composition"]["mask"]),):
        rgba = np.asarray(Image.open(editor["layers"][0]).convert("RGBA"))
        shown = rgba[..., 3] > 0
        assert 0 < rgba[..., 3].max() < 255  # translucent: the object shows through
        rgb = [int(MASK_COLOUR[i:i + 2], 16) for i in (1, 3, 5)]
        assert (rgba[shown][:, :3] == rgb).all()  # coloured
        _, mask = editor_inputs(editor, "Object")
        expected = np.asarray(Image.open(EXAMPLES / mask_file).convert("L")) > 127
        np.testing.assert_array_equal(np.asarray(mask) > 0, expected)  # the same mask, pixel for pixel
    subjects = entry("irdiffusion").examples[0]["subjects"]
    row = KIND_WIDGETS["subjects"].example(app, subjects, EXAMPLES)
    canvas = row[-1]
    (layer,) = [np.asarray(Image.open(p).convert("RGBA")) for p in canvas["layers"]]
    side = layer.shape[1]
    found = painted_boxes([layer])
    for s, box in zip(subjects, found):
        np.testing.assert_allclose(np.array(box) / side, s["region"], atol=1 / side)
    assert found[2] is None


def test_box_editors_fill_their_fields_and_fields_redraw_them(page, tmp_path):
    """The page's wiring: a stroke on the PrimeComposer background fills x, y, width, height (and is redrawn as the
    box); typing a width redraws the box; the regions canvas fills the subjects' region fields in fractions."""
    from attnctrl.ui.inputs import BOX_COLOURS, box_layer, painted_boxes

    fns = events(page)
    drags = {fn.inputs[0].elem_id: fn for fn in fns["drag_box"]}
    types = [fn for fn in fns["type_box"] if fn.inputs[0].elem_id == "upload-primecomposer-background"]
    drag = drags["upload-primecomposer-background"]
    assert [c.label for c in drag.outputs[:4]] == ["Box x", "Box y", "Box width", "Box height"]
    assert all(fn.api_visibility == "private" for fn in [*drags.values(), *types]) and len(types) == 4
    background = str(EXAMPLES / "composition-background.png")
    stroke = np.zeros((64, 64, 4), np.uint8)
    stroke[10:30, 5:8] = (255, 0, 200, 255)
    Image.fromarray(stroke).save(tmp_path / "stroke.png")
    payload = {"background": {"path": background}, "layers": [{"path": str(tmp_path / "stroke.png")}]}
    x, y, w, h, editor = drag.fn(payload, 0, 0, None, None)
    assert (x, y, w, h) == (5, 10, 3, 20)
    assert painted_boxes([np.asarray(editor["layers"][0])])[0] == (5, 10, 8, 30)
    # the drawn box comes back from the page unchanged: nothing to do
    Image.fromarray(box_layer((64, 64), [(5, 10, 8, 30)])).save(tmp_path / "drawn.png")
    echo = {"background": {"path": background}, "layers": [{"path": str(tmp_path / "drawn.png")}]}
    assert all(v == gr.skip() for v in drag.fn(echo, 5, 10, 3, 20))
    redrawn = types[0].fn(echo, 5, 10, 12, 20)
    assert painted_boxes([np.asarray(redrawn["layers"][0])])[0] == (5, 10, 17, 30)
    assert types[0].fn(echo, 5, 10, "", 20) == gr.skip() or painted_boxes(
        [np.asarray(types[0].fn(echo, 5, 10, "", 20)["layers"][0])])[0] is None
    canvas = drags["upload-irdiffusion-regions_drawing"]
    assert [c.label for c in canvas.outputs[:3]] == [f"Subject {i} region ({n})" for i, n in
                                                     ((1, "magenta"), (2, "cyan"), (3, "orange"))]
    region = box_layer((256, 256), [None, (128, 64, 256, 192)], BOX_COLOURS)
    Image.fromarray(region).save(tmp_path / "region.png")
    white = tmp_path / "white.png"
    Image.new("RGB", (256, 256), "white").save(white)
    first, second, third, _ = canvas.fn({"background": {"path": str(white)}, "layers": [
        {"path": str(tmp_path / "region.png")}]}, "0,0,0.5,1", "", "")
    assert (first, second, third) == ("0,0,0.5,1", "0.5,0.25,1,0.75", gr.skip())  # subject 1 kept


def test_options_json_and_method_config():
    assert options_json("") == {} and options_json(' {"start_step": 2} ') == {"start_step": 2}
    with pytest.raises(AttnCtrlError, match="invalid JSON"):
        options_json("{start_step: 2}")
    with pytest.raises(AttnCtrlError, match="JSON object"):
        options_json("[1, 2]")
    config = method_config("freecustom", {"mask_weights": 2.5, "end_step": None, "start_step": 3})
    assert (config.mask_weights, config.start_step, config.end_step) == (2.5, 3, None)
    with pytest.raises(AttnCtrlError, match="freecustom has no option 'radius'"):
        method_config("freecustom", {"radius": 3})
    with pytest.raises(AttnCtrlError, match="start_step"):
        method_config("freecustom", {"start_step": "soon"})


def read(kind, app, *groups):
    return KIND_WIDGETS[kind].read(app, [v for g in groups for v in g])


def test_kind_widgets_reject_incomplete_slots(app):
    editor, _ = star_editor()
    with pytest.raises(AttnCtrlError, match="upload at least one reference image"):
        read("references", app, [None] * 3, [""] * 3)
    with pytest.raises(AttnCtrlError, match="Reference 2 has a prompt but no image"):
        read("references", app, [editor, None, None], ["a star", "a square", ""])
    with pytest.raises(AttnCtrlError, match="Subject 1: a region is x0,y0,x1,y1"):
        read("subjects", app, ["star", "", ""], ["a star", "", ""], ["0.5,0,0.2,1", "", ""], [None] * 3)
    with pytest.raises(AttnCtrlError, match="Subject 2 .circle.: upload a reference image or write a reference"):
        read("subjects", app, ["star", "circle", ""], ["a star", "", ""], ["", "", ""], [None] * 3)
    with pytest.raises(AttnCtrlError, match="LoRA 1: upload the LoRA file"):
        read("loras", app, [None] * 3, ["sks dog", "", ""], ["a sks dog", "", ""])
    with pytest.raises(AttnCtrlError, match="LoRA 1: file .* is missing"):
        read("loras", app, ["/nonexistent/dog.safetensors", None, None], ["sks dog", "", ""], ["a sks dog", "", ""])
    with pytest.raises(AttnCtrlError, match="upload a background image"):
        read("composition", app, [None, editor, 0, 0, 10, 10])
    with pytest.raises(AttnCtrlError, match="width and height > 0"):
        read("composition", app, [Image.new("RGB", (64, 64)), editor, 0, 0, 0, 10])
    with pytest.raises(AttnCtrlError, match="ditctrl needs at least two prompts"):
        app.generate(settings(prompt="one prompt only"), "ditctrl")


def test_kind_widgets_give_the_method_inputs(app):
    editor, mask = star_editor()
    (ref,) = read("references", app, [editor, None, None], ["a star", "", ""])
    assert ref["prompt"] == "a star" and Path(ref["image"]).is_file() and Path(ref["mask"]).is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(ref["mask"])) > 0, mask)  # the painted mask, losslessly
    subjects = read("subjects", app, ["star", "square", ""], ["", "a square", ""], ["0,0,0.5,1", "", ""],
                    [editor, None, None])
    assert [(x["word"], x["region"], "reference" in x, x.get("prompt")) for x in subjects] == [
        ("star", (0.0, 0.0, 0.5, 1.0), True, None), ("square", None, False, "a square")]
    # the job-file objects are what the run layer reads: the same records as from a job file
    from attnctrl.run import Request, validate

    plan = validate(Request("a star and a square", method="irdiffusion", inputs={"subjects": subjects},
                            options={"mutual_lambda": 0.8}), check_output=False)
    assert [s.word for s in plan.inputs["subjects"]] == ["star", "square"] and plan.config.mutual_lambda == 0.8


def test_every_tab_and_example_comes_from_the_registry(app):
    from attnctrl.methods import entries
    from attnctrl.ui.tabs import _tabs

    tabs = {t.key for t in _tabs()}
    assert tabs == {"plain"} | {e.name for e in entries() if not e.speedup}
    demo = gr.Blocks()
    with demo:
        from attnctrl.ui.tabs import _build_tab

        for tab in _tabs():
            _build_tab(tab)
            for example in tab.entry.examples if tab.entry else ():
                row = tab.example_row(app, example)
                assert len(row) == 4 + len(tab.flat())  # model, prompt, steps, frames + the tab's widgets


# -- the page's wiring (built, not launched; no model loads) ----------------------------------------------------------
@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from attnctrl.ui.tabs import build

    return build(App(MODEL, tmp_path_factory.mktemp("page")))


def events(demo) -> dict:
    """The page's functions by name (several ``upload`` checks: a list)."""
    out: dict = {}
    for fn in demo.fns.values():
        out.setdefault(fn.name, []).append(fn)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def tab_widgets(fns, key) -> list:
    """The widgets a tab's Generate reads besides the common settings and speed-ups (those of the plain tab)."""
    return fns[f"generate_{key}"].inputs[len(fns["generate_plain"].inputs):]


def test_every_example_fills_every_widget_of_its_tab(page):
    """Clicking an example sets every widget of the tab, an empty slot to None (gradio's Examples left out a
    column that was empty in every example, and the page got fewer values than it expected)."""
    from attnctrl.methods import entries

    fns = events(page)
    common = fns["generate_plain"].inputs
    filled = [common[COMMON.index(k)] for k in ("model", "prompt", "steps", "num_frames")]
    loaded = 0
    for e in entries():
        if e.speedup or not e.examples:
            continue
        load = fns[f"load_example_{e.name}"]
        assert [c._id for c in load.outputs] == [c._id for c in filled + tab_widgets(fns, e.name)]
        for i, _ in enumerate(e.examples):
            values = load.fn(i)
            assert len(values) == len(load.outputs), e.name
            loaded += 1
    assert loaded == sum(len(e.examples) for e in entries() if not e.speedup)
    clora = fns["load_example_clora"]
    files = [v for c, v in zip(clora.outputs, clora.fn(0)) if isinstance(c, gr.File)]
    assert files[0]["orig_name"] == "toyworld-sks-lora.safetensors" and files[2] is None  # the empty third slot


def test_out_of_range_numbers_name_their_field(page):
    checked = 0
    for block in page.blocks.values():
        if not isinstance(block, (gr.Number, gr.Slider)):
            continue
        for value, bound in ((block.minimum, -1), (block.maximum, 1)):
            if value is None:
                continue
            with pytest.raises(gr.Error) as e:
                block.preprocess(value + bound)
            assert str(block.label) in str(e.value), str(e.value)  # not "Value -1 is less than minimum value 0."
            checked += 1
    assert checked >= 10  # the batch count and the methods' sliders
    fns = events(page)
    run = fns["generate_plain"].fn
    n_speed = len(fns["generate_plain"].inputs) - len(COMMON)
    values = [getattr(settings(seed=-5), k) for k in COMMON] + [None] * n_speed
    assert page.blocks[fns["generate_plain"].inputs[COMMON.index("seed")]._id].preprocess(-5) == -5
    with pytest.raises(gr.Error, match="Seed must be at least 0, got -5"):
        run(*values, None)


def test_a_wrong_file_in_a_slot_is_refused_on_upload(page, tmp_path):
    """A file is checked as soon as it is uploaded, by the input module's own check, in a message naming the slot;
    a file the image editor refuses in the browser is reported by the page's script to the same message."""
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    fns = events(page)
    checks = {fn.inputs[0]._id: fn.fn for fn in fns["upload"]}
    for key in ("freecustom", "magicface", "irdiffusion", "clora", "primecomposer"):
        uploads = [c for c in tab_widgets(fns, key) if isinstance(c, (gr.ImageEditor, gr.Image, gr.File))]
        assert uploads and all(c._id in checks for c in uploads), key
    refs = [c for c in tab_widgets(fns, "freecustom") if isinstance(c, gr.ImageEditor)]
    lora = next(c for c in tab_widgets(fns, "clora") if isinstance(c, gr.File))
    background = next(c for c in tab_widgets(fns, "primecomposer") if c.label == "Background")
    text = {"path": str(notes), "orig_name": "notes.txt"}
    with pytest.raises(gr.Error, match=r"Reference 1: notes.txt is not an image \(png, jpg, webp"):
        checks[refs[0]._id]({"background": text, "layers": [], "composite": None})
    with pytest.raises(gr.Error, match="LoRA 1: notes.txt is not a LoRA file"):
        checks[lora._id](text)
    with pytest.raises(gr.Error, match="Background: notes.txt is not an image"):
        checks[background._id]({"background": text, "layers": [], "composite": None})
    good = {"path": str(EXAMPLES / "striped-green-star.png"), "orig_name": "star.png"}
    checks[refs[1]._id]({"background": good, "layers": [], "composite": None})  # a good file: no message
    checks[refs[1]._id]({"background": None, "layers": [], "composite": None})
    checks[lora._id]({"path": str(EXAMPLES / "toyworld-sks-lora.safetensors")})
    with pytest.raises(gr.Error, match="Reference 2: notes.txt is not an image"):
        fns["refused"].fn(json.dumps({"slot": refs[1].elem_id, "name": "notes.txt"}))
    fns["refused"].fn(json.dumps({"slot": "no-such-slot", "name": "notes.txt"}))  # nothing to say


def test_every_control_has_plain_words_and_the_page_shows_them(page):
    """Each registry control: a label in plain words (the paper's symbol in brackets) and a one-line explanation,
    both on the page."""
    from attnctrl.methods import BUILTIN

    shown = {(b.label, b.info) for b in page.blocks.values() if isinstance(b, gr.components.Component)
             and getattr(b, "info", None)}
    for e in BUILTIN:
        for c in e.controls:
            assert c.label and c.info and "\n" not in c.info and len(c.info) <= 160, (e.name, c.option)
            assert c.label != c.option and "(lambda)" not in c.label and "(w)" not in c.label, c.label
            assert (c.label, c.info) in shown, (e.name, c.option)


def test_the_api_names_every_parameter_after_its_field(page):
    info = page.get_api_info()["named_endpoints"]
    from attnctrl.methods import entries

    for key in ["plain"] + [e.name for e in entries() if not e.speedup]:
        names = [p["parameter_name"] for p in info[f"/generate_{key}"]["parameters"]]
        assert names[:len(COMMON)] == COMMON and len(set(names)) == len(names), key
        assert not [n for n in names if n.startswith("param_")], (key, names)
        assert "speedup_agent_ratio" in names and "progress" not in names
    assert "mask_weights" in [p["parameter_name"] for p in info["/generate_freecustom"]["parameters"]]
    assert "reference_1_image" in [p["parameter_name"] for p in info["/generate_freecustom"]["parameters"]]
    assert "lora_3_file" in [p["parameter_name"] for p in info["/generate_clora"]["parameters"]]


# -- generation -----------------------------------------------------------------------------------------------------
def test_generate_gallery_seeds_metadata_and_maps(app):
    s = settings(seed=7, count=2)
    result = app.generate(s, "attention-maps", {"words": ["circle"]})
    assert [caption for _, caption in result.images] == ["seed 7", "seed 8"]
    assert result.seed == 7 and "seed 7..8" in result.info
    first = Image.open(result.images[0][0])
    record = json.loads(first.text["attnctrl"])  # the download is the PNG with its settings
    assert (record["seed"], record["steps"], record["method"], record["prompt"]) == (7, 2, "attention-maps", s.prompt)
    assert "parameters" in first.text
    assert [caption for _, caption in result.artifacts] == ["attn-circle (seed 7)", "attn-circle (seed 8)"]
    assert all(Path(p).is_file() for p in result.files)
    # the same seed again gives the same pixels
    again = app.generate(settings(seed=7), "attention-maps", {"words": ["circle"]})
    np.testing.assert_array_equal(np.asarray(first), np.asarray(Image.open(again.images[0][0])))


def test_random_seed_is_reported_and_reusable(app):
    s = settings(randomize=True)
    result = app.generate(s)
    assert 0 <= result.seed < 2**32 and result.images[0][1] == f"seed {result.seed}"
    reused = app.generate(settings(seed=result.seed))
    np.testing.assert_array_equal(np.asarray(Image.open(result.images[0][0])),
                                  np.asarray(Image.open(reused.images[0][0])))


def test_before_after_is_the_same_seed_without_the_method(app):
    s = settings(seed=3, compare=True, speedups={"agent": {"ratio": 0.4}})
    result = app.generate(s)
    before, after = result.before_after
    plain = app.generate(settings(seed=3))
    np.testing.assert_array_equal(np.asarray(Image.open(before)), np.asarray(Image.open(plain.images[0][0])))
    assert after == result.images[0][0]
    assert json.loads(Image.open(after).text["attnctrl"])["plugins"][0]["method"] == "agent"


def test_reference_method_runs_and_shows_its_segmentation(app):
    s = settings(prompt="a striped green star")
    editor, _ = star_editor()
    refs = read("references", app, [editor, None, None], ["a star", "", ""])
    result = app.generate(s, "magicface", {"ref_words": ["star"]}, {"references": refs})
    assert len(result.images) == 1 and [c for _, c in result.artifacts] == ["mask-star (seed 0)"]


def test_a_failed_model_load_never_leaves_a_stale_model_name(app, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = App(MODEL, app.output)
    other.pipeline(MODEL)
    with pytest.raises(AttnCtrlError):
        other.pipeline("no-such-org/no-such-model")
    result = other.generate(settings())
    assert f"on `{MODEL}`" in result.info
    assert json.loads(Image.open(result.images[0][0]).text["attnctrl"])["model"] == MODEL


def test_user_errors_become_page_messages_and_the_app_keeps_working(app, monkeypatch):
    from attnctrl.methods import entry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    maps = Tab("attention-maps", "Attention maps", entry("attention-maps"), [("words", [object()])], more=object())
    assert [(c.option, c.label) for c in entry("attention-maps").controls] == [
        ("words", "Heat maps of words (comma-separated)")]
    run = _handler(app, maps, ())
    values = [getattr(settings(model="no-such-org/no-such-model"), k) for k in COMMON] + ["circle", ""]
    with pytest.raises(gr.Error, match="no-such-org/no-such-model"):
        run(*values, None)
    values = [getattr(settings(prompt="   "), k) for k in COMMON] + ["circle", ""]
    with pytest.raises(gr.Error, match="write a prompt first"):
        run(*values, None)
    values = [getattr(settings(), k) for k in COMMON] + ["elephant", ""]
    with pytest.raises(gr.Error, match="elephant"):
        run(*values, None)

    def boom():
        raise RuntimeError("kaput")

    with pytest.raises(gr.Error, match="internal error .RuntimeError: kaput"):
        _user_errors(boom)
    values = [getattr(settings(), k) for k in COMMON] + ["circle", ""]
    gallery, *_rest = run(*values, None)  # after all that, a good request still works
    assert len(gallery) == 1 and _rest[5] == 0  # the seed


def test_stop_ends_a_running_generation_after_a_step_saving_nothing(app):
    """Stop (App.stop, the page's Stop button) ends the run after its current denoising step: a short message, no
    file, the lock free, and the next run makes what it made before the stop."""
    import threading

    first = app.generate(settings(seed=4))
    files = set(app.output.rglob("*"))
    steps, started, out = [], threading.Event(), {}

    def count(module, args, kwargs):  # the denoiser has run a few steps: press Stop now
        steps.append(1)
        if len(steps) == 3:
            started.set()

    hook = app.pipeline(MODEL).unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        worker = threading.Thread(target=lambda: out.update(result=app.generate(settings(steps=500))))
        worker.start()
        assert started.wait(120) and app.stop()
        worker.join(120)
    finally:
        hook.remove()
    result = out["result"]
    assert result.stopped and not result.images and not result.files
    assert re.fullmatch(r"\*\*Stopped after step (\d+) of 500; nothing of it was saved\*\*\.", result.info)
    assert 3 <= int(re.search(r"step (\d+)", result.info).group(1)) < 500
    assert set(app.output.rglob("*")) == files  # nothing written
    assert not app.stop()  # nothing is running any more
    again = app.generate(settings(seed=4))
    np.testing.assert_array_equal(np.asarray(Image.open(first.images[0][0])),
                                  np.asarray(Image.open(again.images[0][0])))


def test_sizes_beyond_the_model_are_named_before_any_model_work(tmp_path, monkeypatch):
    """Width 1e9 and 8192 on the default model: a message naming the width, before the model is even loaded; the
    width and height boxes say the model's multiple and largest side."""
    from attnctrl.models import DEFAULT_MODEL
    from attnctrl.ui.tabs import size_hint

    fresh = App(DEFAULT_MODEL, tmp_path)
    monkeypatch.setattr(App, "pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    run = _handler(fresh, Tab("plain", "Text to image", None, []), ())
    for width, message in ((1e9, "width must be at most 8192, got 1000000000"),
                           (8192, "width 8192 is more than 4 times this model's native 64 px .at most 256.")):
        values = [getattr(settings(model=DEFAULT_MODEL, width=width), k) for k in COMMON]
        with pytest.raises(gr.Error, match=message):
            run(*values, None)
    values = [getattr(settings(model=DEFAULT_MODEL, height=8192), k) for k in COMMON]
    with pytest.raises(gr.Error, match="height 8192 is more than 4 times"):
        run(*values, None)
    assert size_hint(DEFAULT_MODEL) == {"step": 8, "info": "0: the model's; a multiple of 8, at most 256"}
    assert list(tmp_path.iterdir()) == []


def test_each_tab_shows_progress_and_result_beside_generate_and_a_stop(page):
    """Every tab: Generate and Stop side by side, its run's progress and result just below them; Generate is busy
    while it runs; a new run and an example's click clear the previous run's files and before/after."""
    from attnctrl.ui.tabs import _tabs, cleared

    fns = {fn._id: fn for fn in page.fns.values()}
    after = {fn.trigger_after: fn for fn in fns.values() if fn.trigger_after is not None}
    ends = {}  # what runs after a generation: on success and on failure
    for fn in fns.values():
        if fn.trigger_after is not None and (fn.trigger_only_on_success or fn.trigger_only_on_failure):
            ends.setdefault(fn.trigger_after, []).append(fn)
    ids = lambda comps: [getattr(c, "elem_id", None) for c in comps]  # noqa: E731
    for tab in _tabs():
        key = tab.key
        busy = next(fn for fn in fns.values() if fn.name == "busy" and ids(fn.outputs)[0] == f"generate-{key}")
        run = after[busy._id]
        assert run.name == f"generate_{key}"
        assert ids(run.outputs)[-2:] == [f"status-{key}", f"preview-{key}"]
        assert {f"status-{key}", f"preview-{key}"} <= set(ids(run.show_progress_on))
        assert sorted((f.name, f.trigger_only_on_success, ids(f.outputs)) for f in ends[run._id]) == [
            ("idle", False, [f"generate-{key}", f"stop-{key}"]), ("idle", True, [f"generate-{key}", f"stop-{key}"])]
        assert {"files", "before-after", f"status-{key}"} <= set(ids(busy.outputs))
        stop = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == f"stop-{key}")
        assert not stop.interactive  # until its tab's run starts
        assert any(fn.name == "stop" and stop._id in [t[0] for t in fn.targets] for fn in fns.values())
    button, stop, *values = busy.fn()
    assert (button.value, button.interactive, stop.interactive) == ("Generating...", False, True)
    loads = [fn for fn in fns.values() if (fn.name or "").startswith("load_example_")]
    assert loads and all(after[fn._id].name == "cleared" and {"files", "before-after"} <= set(
        ids(after[fn._id].outputs)) for fn in loads)
    gallery, video, before_after, artifacts, files, info, status, preview = cleared()
    assert files is None and not before_after.visible and gallery == [] and preview is None and info == ""


# -- the page in a browser ------------------------------------------------------------------------------------------
def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("ATTNCTRL_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install chromium chromium-driver)")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(port: int, output: Path, log: Path):
    """``attnctrl ui`` in its own process (as a user starts it), once it answers on ``port``; stopped on exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "attnctrl", "ui", "--model", MODEL, "--port", str(port), "-o",
                             str(output)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"attnctrl ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"attnctrl ui did not answer within 180 s:\n{log.read_text()[-3000:]}")
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


#: no gradio progress read-out ("processing | 0.8s", "4/25 steps", ETA bars) anywhere on the page
IDLE = "!document.querySelector('.progress-text, .eta-bar, .progress-level')"


def test_page_end_to_end(tmp_path):
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    with _serve(port, tmp_path / "outputs", tmp_path / "server.log"):
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")  # the queue's stream never goes idle
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            page.get_by_text("Advanced").click()
            page.get_by_label("Steps").fill(os.environ.get("ATTNCTRL_UI_TEST_STEPS", "3"))
            # 1. an invalid input: a page error message, and the server lives on
            page.get_by_role("tab", name="FreeCustom").click()
            page.locator("#generate-freecustom").click()
            page.get_by_text("upload at least one reference image").first.wait_for(timeout=30_000)
            # 2. attention maps with before/after: the gallery shows the image with its seed, the maps appear, and
            # the tab's own status and preview (below its Generate) show the result
            page.get_by_label("Before/after: also generate without the method (same seed)").check()
            page.get_by_role("tab", name="Attention maps").click()
            page.get_by_label("Heat maps of words (comma-separated)").fill("circle")
            page.locator("#generate-attention-maps").click()
            page.locator("#gallery img").first.wait_for(timeout=120_000)
            page.locator("#artifacts img").first.wait_for(timeout=30_000)
            page.wait_for_function(f"() => document.querySelector('#status-attention-maps').innerText"
                                   f".includes('attention-maps') && {IDLE}", timeout=60_000)
            assert "attention-maps" in page.locator("#info").inner_text()
            assert page.locator("#preview-attention-maps img").count() >= 1
            assert page.locator("#before-after").is_visible() and ".png" in page.locator("#files").inner_text()
            page.get_by_label("Before/after: also generate without the method (same seed)").uncheck()
            # 3. FreeCustom from its example (references with painted masks): the previous run's files and
            # before/after go; then Generate with our steps
            page.get_by_role("tab", name="FreeCustom").click()
            rows = page.locator("tr").filter(has_text="a striped red circle in the middle")
            rows.locator("visible=true").first.click()
            page.wait_for_function("() => !document.querySelector('#files').innerText.includes('.png')",
                                   timeout=30_000)
            assert not page.locator("#before-after").is_visible()
            page.get_by_label("Model").fill(MODEL)
            page.get_by_label("Steps").fill(os.environ.get("ATTNCTRL_UI_TEST_STEPS", "3"))
            info = page.locator("#info")
            before = info.inner_text()
            page.locator("#generate-freecustom").click()
            page.wait_for_function(f"t => {{ const s = document.querySelector('#info').innerText; "
                                   f"return s.includes('freecustom') && s !== t && {IDLE}; }}", arg=before,
                                   timeout=240_000)
            page.locator("#gallery img").first.wait_for(timeout=30_000)
            assert "freecustom" in page.locator("#status-freecustom").inner_text()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            if os.environ.get("ATTNCTRL_SCREENSHOT"):
                page.screenshot(path=os.environ["ATTNCTRL_SCREENSHOT"], full_page=True)
            # 4. an absurd width: a message naming it, before any work
            page.get_by_role("tab", name="Text to image").click()
            page.get_by_label("Width").fill("1e9")
            page.locator("#generate-plain").click()
            page.get_by_text("width must be at most 8192, got 1000000000").first.wait_for(timeout=30_000)
            page.get_by_label("Width").fill("0")
            # 5. Stop: a long run ends after a step with a message beside its button, and Generate is back
            page.get_by_label("Steps").fill("900")
            generate = page.locator("#generate-plain")
            generate.click()
            page.wait_for_function("() => !document.querySelector('#stop-plain').disabled", timeout=30_000)
            assert generate.inner_text() == "Generating..." and generate.is_disabled()
            page.locator("#status-plain .progress-text, #status-plain .eta-bar").first.wait_for(timeout=120_000)
            page.locator("#stop-plain").click()
            page.wait_for_function("() => /Stopped (after step \\d+|before the first step) of 900/"
                                   ".test(document.querySelector('#status-plain').innerText)", timeout=60_000)
            page.wait_for_function("() => !document.querySelector('#generate-plain').disabled", timeout=30_000)
            assert generate.inner_text() == "Generate (Text to image)" and page.locator("#stop-plain").is_disabled()
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert list((tmp_path / "outputs").rglob("*.png"))  # the outputs went where -o said


def drag(page, selector: str, start, end) -> None:
    """Drag the mouse across the image of the editor ``selector`` from ``start`` to ``end`` (fractions of the image,
    which the editor shows centred, at most 70 % of the canvas's height)."""
    page.locator(selector).scroll_into_view_if_needed()
    bb = page.locator(f"{selector} canvas").first.bounding_box()
    side = bb["height"] * 0.7
    left, top = bb["x"] + (bb["width"] - side) / 2, bb["y"] + (bb["height"] - side) / 2
    page.mouse.move(left + side * start[0], top + side * start[1])
    page.mouse.down()
    page.mouse.move(left + side * end[0], top + side * end[1], steps=12)
    page.mouse.up()


DROP = """([selector, name]) => {
  const target = document.querySelector(selector).querySelector('div') || document.querySelector(selector);
  const dt = new DataTransfer();
  dt.items.add(new File(['some notes'], name, {type: 'text/plain'}));
  for (const type of ['dragenter', 'dragover', 'drop']) {
    target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
  }
}"""


def test_page_refuses_wrong_files_at_once_and_examples_fill_every_slot(tmp_path):
    """In the browser: a text file dropped on a reference, picked for a LoRA or for the background is refused at
    once with the slot's name; the CLoRA example loads (its third LoRA slot empty); the API names its parameters."""
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    from gradio_client import Client

    notes, fake = tmp_path / "notes.txt", tmp_path / "fake.png"
    notes.write_text("some notes")
    fake.write_text("not a picture")
    port = _free_port()
    with _serve(port, tmp_path / "outputs", tmp_path / "server.log"):
        api = Client(f"http://127.0.0.1:{port}/", verbose=False).view_api(return_format="dict", print_info=False)
        names = [p["parameter_name"] for p in api["named_endpoints"]["/generate_freecustom"]["parameters"]]
        assert names[:4] == ["model", "prompt", "negative_prompt", "seed"] and "mask_weights" in names
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 3000, "height": 1300})  # every tab in view
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            page.get_by_role("tab", name="FreeCustom").click()
            page.locator("#upload-freecustom-reference_1_image").wait_for(timeout=30_000)
            page.evaluate(DROP, ["#upload-freecustom-reference_1_image", "notes.txt"])
            page.get_by_text("Reference 1: notes.txt is not an image (png, jpg, webp").first.wait_for(timeout=30_000)
            page.get_by_role("tab", name="PrimeComposer").click()
            page.locator("#upload-primecomposer-background input[type=file]").set_input_files(str(fake))
            page.get_by_text("Background: fake.png is not an image").first.wait_for(timeout=30_000)
            # the example's box is drawn; a drag across the background is the new box in the four numbers
            page.locator("tr").filter(has_text="hollow pink circle").locator("visible=true").first.click()
            box = [page.get_by_label(n) for n in ("Box x", "Box y", "Box width", "Box height")]
            page.wait_for_function("() => document.querySelector('#upload-primecomposer-background canvas')",
                                   timeout=30_000)
            page.wait_for_timeout(2000)
            assert [b.input_value() for b in box] == ["36", "16", "24", "28"]
            drag(page, "#upload-primecomposer-background", (0.3, 0.3), (0.45, 0.6))
            page.wait_for_function("() => document.querySelector('#upload-primecomposer-background')"
                                   ".closest('.tabitem, body').querySelector('input[type=number]').value !== '36'",
                                   timeout=30_000)
            x, y, w, h = (float(b.input_value()) for b in box)
            assert 0 < x < 32 and 0 < y < 40 and w > 0 and h > w  # a tall box on the left of the middle
            # an example's mask is visible in its editor (translucent cyan over the reference)
            page.get_by_role("tab", name="FreeCustom").click()
            page.locator("tr").filter(has_text="a striped red circle in the middle").locator("visible=true").first.click()
            page.wait_for_timeout(3000)
            shot = np.asarray(Image.open(io.BytesIO(page.locator("#upload-freecustom-reference_1_image").screenshot()))
                              .convert("RGB")).astype(int)
            assert ((shot[..., 2] > shot[..., 0] + 40) & (shot[..., 2] > 120)).sum() > 500  # the cyan mask
            page.get_by_role("tab", name="CLoRA").click()
            page.locator("#upload-clora-lora_1_file input[type=file]").set_input_files(str(notes))
            page.get_by_text("LoRA 1: notes.txt is not a LoRA file").first.wait_for(timeout=30_000)
            page.locator("tr").filter(has_text="a sks square on the left").locator("visible=true").first.click()
            page.wait_for_function("() => document.querySelector('#upload-clora-lora_2_file').innerText"
                                   ".includes('toyworld-zwx-lora')", timeout=30_000)
            assert "toyworld-sks-lora" in page.locator("#upload-clora-lora_1_file").inner_text()
            assert "safetensors" not in page.locator("#upload-clora-lora_3_file").inner_text()
            assert page.get_by_text("didn't return enough output values").count() == 0
            page.screenshot(path=str(tmp_path / "refused.png"), full_page=True)
            if os.environ.get("ATTNCTRL_SCREENSHOT_REFUSED"):
                page.screenshot(path=os.environ["ATTNCTRL_SCREENSHOT_REFUSED"], full_page=True)
            browser.close()
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_widgets_never_shown_send_none_and_mean_the_defaults():
    from attnctrl.ui.tabs import widget_settings

    values = {k: None for k in COMMON} | {"prompt": "a red circle", "seed": 3, "steps": 0}
    s = widget_settings([values[k] for k in COMMON])
    assert (s.prompt, s.negative_prompt, s.steps, s.seed) == ("a red circle", "", None, 3)


def test_warnings_become_one_toast_each(monkeypatch):
    from attnctrl.errors import notice

    shown = []
    monkeypatch.setattr(gr, "Warning", lambda text, *a, **k: shown.append(text))

    def work():
        notice("the prompt is long")
        notice("the prompt is long")
        notice("seed 3 was used")
        return 7

    assert _user_errors(work) == 7
    assert shown == ["the prompt is long", "seed 3 was used"]
