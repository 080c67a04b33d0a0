"""The shipped toyworld-flux model: loads offline, draws what a caption says, and carries CLEAR for real.

One model load for the module (the tests leave the pipeline as they found it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import attnctrl
from attnctrl.methods import CLEAR
from attnctrl.models import EMBEDDED_MODELS, check_model, embedded_path, recommended_settings
from attnctrl.models.toyworld.score import score
from attnctrl.run.request import read_record

CAPTION = "a red circle on the left"


@pytest.fixture(scope="module")
def pipe():
    pipe = attnctrl.load_pipeline("toyworld-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, steps: int | None = None, output_type: str = "pil", **kw):
    call = {k: v for k, v in recommended_settings(pipe).items() if k != "guidance_scale"}
    if steps is not None:
        call["num_inference_steps"] = steps
    return pipe(kw.pop("prompt", CAPTION), output_type=output_type, **call, **kw).images


def test_embedded_and_offline(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "toyworld-flux" in EMBEDDED_MODELS and check_model("toyworld-flux") == "embedded"
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    rec = recommended_settings(pipe)
    assert rec["height"] == rec["width"] == 128 and rec["true_cfg_scale"] > 1 and rec["max_sequence_length"] == 32
    files = [p for p in embedded_path("toyworld-flux").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6  # fp16 weights
    info = json.loads((embedded_path("toyworld-flux") / "attnctrl.json").read_text())
    assert info["steps"] > 0 and info["config"]["arch"] == "flux"


def test_draws_a_single_object_caption_right(pipe):
    """The checker on fixed seeds: the named colour on the named side, every time (shape: see docs/toyworld.md)."""
    from attnctrl.models.toyworld.flux import CheckerView

    view = CheckerView(pipe)
    images = view([CAPTION] * 3, generator=[torch.Generator().manual_seed(s) for s in range(3)]).images
    results = [score(image, CAPTION) for image in images]
    assert all(len(r["objects"]) == 1 for r in results)
    assert all(r["objects"][0]["colour"] and r["objects"][0]["side"] for r in results), results


def test_clear_covering_the_grid_is_full_attention(pipe):
    """A disc holding the whole 16 x 16 grid: CLEAR's own kernels (dense mask, tiles) give full attention's image to
    float rounding; ``auto`` hands such a disc to the stock kernel, bit for bit."""
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    full = _call(pipe, steps=3, output_type="np", generator=generator())
    for backend, tol in (("auto", 0.0), ("dense", 1e-4), ("tiled", 1e-4)):
        with attnctrl.apply(pipe, CLEAR(radius=23, backend=backend)):  # 15^2 + 15^2 < 23^2
            out = _call(pipe, steps=3, output_type="np", generator=generator())
        assert np.abs(out - full).max() <= tol, backend
    with attnctrl.apply(pipe, CLEAR(radius=4)):
        local = _call(pipe, steps=3, output_type="np", generator=generator())
    assert np.abs(local - full).max() > 1e-2  # a real disc changes the picture
    after = _call(pipe, steps=3, output_type="np", generator=generator())
    assert np.array_equal(after, full)  # removed: the model is as it was


def test_generate_cli_with_clear_on_toyworld_flux(tmp_path):
    from PIL import Image

    from attnctrl.cli.main import cli

    result = CliRunner().invoke(cli, ["generate", "-m", "toyworld-flux", "--method", "clear", "--opt", "radius=8",
                                      "-p", CAPTION, "--seed", "0", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size == (128, 128)
    record = read_record(png)
    assert record["model"] == "toyworld-flux" and record["method"] == "clear"
    assert record["steps"] == 25 and record["method_options"]["radius"] == 8
