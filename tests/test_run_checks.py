"""The run layer's checks after the model loads: results that are not finite, prompts longer than the model reads,
sizes beyond the model, the method's own defaults, and making an output again from its own metadata."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny

from attnctrl.cli.main import cli
from attnctrl.core import AttnCtrlError, AttnCtrlWarning
from attnctrl.io import read_png_metadata
from attnctrl.run import Request, Session, generate, validate

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def _plan(**kw):
    kw.setdefault("prompts", "a photo of a cat")
    return validate(Request(model="tiny-sd15", steps=2, **kw), check_output=False)


def test_a_result_that_is_not_finite_is_an_error_and_nothing_is_saved(tmp_path, monkeypatch):
    pipe = tiny("sd15")
    plan = _plan(output=tmp_path / "out", guidance=40.0)
    original = type(pipe).__call__

    def nan_call(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.images[:] = np.nan
        return out

    monkeypatch.setattr(type(pipe), "__call__", nan_call)
    with pytest.raises(AttnCtrlError, match=r"not finite .* nothing was saved: the guidance 40 is very high"):
        list(generate(plan, pipe=pipe))
    assert not (tmp_path / "out").exists()


def test_a_prompt_longer_than_the_model_reads_is_said_once(tmp_path):
    pipe = tiny("sd15")
    long = "a cat " * 2000
    with pytest.warns(AttnCtrlWarning, match=r"is \d+ tokens long but this model reads the first 77") as caught:
        with Session(_plan(prompts=long), pipe):
            pass
    assert len([w for w in caught if issubclass(w.category, AttnCtrlWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttnCtrlWarning)
        with Session(_plan(prompts="a cat"), pipe):  # a short prompt: nothing to say
            pass
    result = CliRunner().invoke(cli, ["generate", "-m", "tiny-sd15", "--steps", "1", "-p", long, "-o",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("Warning:")] == [
        next(line for line in result.output.splitlines() if line.startswith("Warning:"))]


def test_a_size_far_beyond_the_model_is_refused_before_any_work():
    pipe = tiny("sd15")
    with pytest.raises(AttnCtrlError, match="more than 4 times this model's native"):
        Session(_plan(width=8192, height=8192), pipe)


def test_the_methods_own_defaults_win_over_the_base_pipelines(tmp_path):
    from attnctrl.methods import entry

    pipe = tiny("sd15")
    pipe.attnctrl_defaults = {"num_inference_steps": 7, "guidance_scale": 7.5}  # what a model folder recommends
    comp = {"background": "composition-background.png", "object": "hollow-pink-circle.png",
            "mask": "hollow-pink-circle-mask.png", "box": [36, 16, 24, 28]}
    plan = validate(Request(prompts="a hollow pink circle", model="tiny-sd15", method="primecomposer",
                            inputs={"composition": [comp]}, base=EXAMPLES), check_output=False)
    session = Session(plan, pipe)
    try:
        assert entry("primecomposer").defaults == {"num_inference_steps": 20, "guidance_scale": None}
        assert session.kwargs["num_inference_steps"] == 20 and "guidance_scale" not in session.kwargs
    finally:
        session.close()
        del pipe.attnctrl_defaults
    plain = Session(_plan(), pipe)
    assert plain.kwargs["num_inference_steps"] == 2  # the request's own value wins over everything


def test_a_models_other_recommended_settings_reach_the_call():
    """toyworld-flux recommends true CFG against an empty negative prompt and 32 text tokens: the call gets them,
    and --guidance sets true_cfg_scale (the model has no guidance embedding for guidance_scale)."""
    pipe = tiny("flux")
    pipe.attnctrl_defaults = {"num_inference_steps": 25, "guidance_scale": 5.0, "true_cfg_scale": 5.0,
                              "negative_prompt": "", "max_sequence_length": 32, "not_a_parameter": 1}
    try:
        plan = validate(Request(model="tiny-flux", prompts="a cat", guidance=3.0), check_output=False)
        with Session(plan, pipe) as session:
            assert session.kwargs == {"num_inference_steps": 25, "true_cfg_scale": 3.0, "negative_prompt": "",
                                      "max_sequence_length": 32}
        plan = validate(Request(model="tiny-flux", prompts="a cat", negative_prompt="blur"), check_output=False)
        with Session(plan, pipe) as session:
            assert session.kwargs["true_cfg_scale"] == 5.0 and session.kwargs["negative_prompt"] == "blur"
    finally:
        del pipe.attnctrl_defaults


def test_generate_from_an_output_makes_it_again_byte_identical(tmp_path):
    runner = CliRunner()
    first = runner.invoke(cli, ["generate", "-m", "tiny-sd15", "--steps", "2", "--seed", "11", "-p", "a cat",
                                "-n", "blurry", "--method", "agent", "--opt", "ratio=0.3", "--guidance", "6",
                                "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    png = next((tmp_path / "a").glob("*.png"))
    again = runner.invoke(cli, ["generate", "--from", str(png), "-o", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    copy = next((tmp_path / "b").glob("*.png"))
    assert copy.read_bytes() == png.read_bytes()
    record = read_png_metadata(copy)["attnctrl"]
    assert record["seed"] == 11 and record["method"] == "agent" and record["method_options"]["ratio"] == 0.3
    assert record["sampler"] == "DDIM" and record["scheduler"] == "DDIMScheduler"
    # a flag given with --from replaces the stored value
    other = runner.invoke(cli, ["generate", "--from", str(png), "--seed", "12", "-o", str(tmp_path / "c")])
    assert other.exit_code == 0, other.output
    assert read_png_metadata(next((tmp_path / "c").glob("*.png")))["attnctrl"]["seed"] == 12


def test_a_model_that_is_not_there_is_refused_before_any_work(tmp_path, monkeypatch):
    """The model reference is an input: validation resolves it (loading nothing), so the web app keeps the model
    it has loaded when a user types a name that does not exist."""
    from attnctrl.core import ModelNotAvailableError
    from attnctrl.ui.app import App, Settings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for bad in ("nobody/nothing", "tiny-sd99", str(tmp_path)):  # not cached; unknown tiny; a folder without a model
        with pytest.raises(ModelNotAvailableError):
            validate(Request(model=bad, prompts="a cat"), check_output=False)
    app = App("tiny-sd15", str(tmp_path / "out"), "cpu", "fp32")
    app._pipe, app._model_id, app._runtime = tiny("sd15"), "tiny-sd15", (None, None)
    with pytest.raises(ModelNotAvailableError):
        app.generate(Settings(prompt="a cat", model="nobody/nothing", steps=1))
    assert app._model_id == "tiny-sd15" and app._pipe is tiny("sd15")


def test_should_stop_ends_a_run_between_steps_saving_nothing_and_leaving_the_pipeline_as_it_was(tmp_path):
    """``should_stop`` (a function or a ``threading.Event``) is asked after every step: the run ends with
    ``Stopped`` naming the step, writes nothing, and the shared pipeline is exactly as before (processors, hooks,
    adapters, scheduler), plain, with a plugin and with a method pipeline."""
    import threading

    from test_shared_pipeline import assert_as_before, plain, snapshot

    from attnctrl.core.errors import Stopped
    from attnctrl.models import tiny_pipeline

    pipe = tiny_pipeline("sd15")  # this test's own: generate() switches the progress bar on
    pipe.set_progress_bar_config(disable=False, leave=False, desc="steps")
    first = plain(pipe)
    ref = {"image": str(EXAMPLES / "striped-green-star.png"), "mask": str(EXAMPLES / "striped-green-star-mask.png"),
           "prompt": "a striped green star"}
    asked = []

    def should_stop() -> bool:  # asked before the run, then after each step: true after step 3
        asked.append(1)
        return len(asked) > 3

    for method, inputs, options in ((None, {}, {}), ("attention-maps", {}, {"words": ["star"]}),
                                    ("freecustom", {"references": [ref]}, {})):
        before = snapshot(pipe)
        plan = validate(Request(prompts="a striped green star", model="tiny-sd15", method=method, inputs=inputs,
                                options=options, steps=40, output=tmp_path / "out"))
        asked.clear()
        with pytest.raises(Stopped, match=r"^Stopped after step 3 of 40; nothing of it was saved$"):
            list(generate(plan, pipe=pipe, should_stop=should_stop))
        assert not (tmp_path / "out").exists(), method
        assert_as_before(pipe, before)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match="before the first step of 40"):
        list(generate(plan, pipe=pipe, should_stop=stop))
    np.testing.assert_array_equal(plain(pipe), first)  # bit for bit


def test_a_runs_inputs_are_kept_next_to_its_outputs_and_the_folder_remakes_it_anywhere(tmp_path):
    """References (any input file) are copied next to the outputs as ``inputs/<sha256-12>.png`` and the record names
    those copies: with the originals gone and the output folder moved, ``generate --from`` makes the same pixels."""
    import re
    import shutil

    from PIL import Image

    from attnctrl.run import read_record

    src = tmp_path / "src"
    src.mkdir()
    for name in ("striped-green-star.png", "striped-green-star-mask.png"):
        shutil.copy(EXAMPLES / name, src / name)
    request = Request(prompts="a striped green star", model="toyworld", method="freecustom", steps=3, seed=5,
                      inputs={"references": [{"image": str(src / "striped-green-star.png"),
                                              "mask": str(src / "striped-green-star-mask.png"),
                                              "prompt": "a striped green star"}]}, output=tmp_path / "out")
    image = next(o.path for o in generate(validate(request)) if o.kind == "image")
    (ref,) = read_record(image)["inputs"]["references"]
    for key, name in (("image", "striped-green-star.png"), ("mask", "striped-green-star-mask.png")):
        assert re.fullmatch(r"inputs/[0-9a-f]{12}\.png", ref[key]), ref
        assert (tmp_path / "out" / ref[key]).read_bytes() == (src / name).read_bytes()
    shutil.rmtree(src)
    moved = tmp_path / "elsewhere" / "out"
    shutil.move(tmp_path / "out", moved)
    result = CliRunner().invoke(cli, ["generate", "--from", str(moved / image.name), "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    again = tmp_path / "again" / image.name  # the same counter, seed and prompt
    np.testing.assert_array_equal(np.asarray(Image.open(moved / image.name)), np.asarray(Image.open(again)))
    assert read_record(again)["inputs"] == read_record(moved / image.name)["inputs"]  # the same names: same bytes
    assert ref["name"] == "striped-green-star.png"  # the original's name, so the masks are named as before
    assert sorted(p.name for p in (tmp_path / "again").rglob("*.png")) == sorted(p.name for p in moved.rglob("*.png"))


def test_the_size_rule_read_before_loading_is_the_loaded_models(tmp_path):
    """The multiple and native side read from a model's configs (before it loads) are the loaded pipeline's; a side
    the model cannot take is refused before any work, naming it."""
    import json

    from conftest import toyworld

    from attnctrl.models import size_rule
    from attnctrl.run.generate import native_size, size_multiple

    assert size_rule("toyworld") == (native_size(toyworld()), size_multiple(toyworld())) == (64, 8)
    assert size_rule("tiny-sd15") is None  # built in code: checked once loaded
    assert size_multiple(tiny("flux")) == 16 and size_multiple(tiny("sd15")) == 8
    flux = tmp_path / "flux"  # a FLUX folder's configs: 2x2 packed latents on an 8x VAE
    for name, config in (("model_index.json", {"_class_name": "FluxPipeline"}),
                         ("vae/config.json", {"block_out_channels": [8, 8, 8, 8]}),
                         ("transformer/config.json", {"_class_name": "FluxTransformer2DModel", "patch_size": 1})):
        (flux / name).parent.mkdir(parents=True, exist_ok=True)
        (flux / name).write_text(json.dumps(config))
    assert size_rule(str(flux)) == (None, 16)
    with pytest.raises(AttnCtrlError, match="width 136 is not a multiple of 16, which this model needs; try 128"):
        validate(Request(prompts="a cat", model=str(flux), width=136), check_output=False)
    with pytest.raises(AttnCtrlError, match="height 8192 is more than 4 times this model's native 64 px"):
        validate(Request(prompts="a cat", model="toyworld", height=8192), check_output=False)
