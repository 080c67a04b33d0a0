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
