"""PNG metadata round trip, infotext format, atomic writes."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from attnctrl.io import atomic_path, infotext, parse_infotext, read_png_metadata, save_json, save_png

SETTINGS = {
    "prompt": "a photo of a cat, in the rain",
    "negative_prompt": "blurry",
    "steps": 3,
    "sampler": "DDIM",
    "guidance_scale": 7.5,
    "seed": 42,
    "width": 128,
    "height": 96,
    "model": "tiny-sd15",
    "method": "attention-maps",
    "method_options": {"words": ["cat", "rain"], "half": "cond", "end_step": None},
}


def test_infotext_is_a1111_format_and_parses_back():
    text = infotext(SETTINGS)
    lines = text.split("\n")
    assert lines[0] == SETTINGS["prompt"] and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 128x96")
    parsed = parse_infotext(text)
    assert parsed["prompt"] == SETTINGS["prompt"] and parsed["negative_prompt"] == "blurry"
    assert parsed["Seed"] == "42" and parsed["Size"] == "128x96" and parsed["Model"] == "tiny-sd15"
    assert parsed["Words"] == "[cat; rain]"
    assert parse_infotext(infotext({"prompt": "x", "model": "a, b"}))["Model"] == "a, b"  # quoted values


def test_png_metadata_round_trip(tmp_path):
    path = save_png(tmp_path / "x.png", Image.new("RGB", (4, 4)), SETTINGS)
    meta = read_png_metadata(path)
    assert meta["attnctrl"] == SETTINGS
    assert meta["parameters"] == infotext(SETTINGS)
    plain = save_png(tmp_path / "y.png", Image.new("RGB", (4, 4)), SETTINGS, metadata=False)
    assert read_png_metadata(plain) == {"parameters": None, "attnctrl": None}
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # usual permissions, not mkstemp's
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    save_json(target, {"a": 1})
    assert target.read_text().strip() == '{\n  "a": 1\n}'


def test_a1111_sampler_names():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    from attnctrl.io.metadata import sampler_name

    assert sampler_name(DDIMScheduler()) == "DDIM"
    assert sampler_name(EulerAncestralDiscreteScheduler()) == "Euler a"
    assert sampler_name(DPMSolverMultistepScheduler(use_karras_sigmas=True)) == "DPM++ 2M Karras"
    assert sampler_name(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")) == "DPM++ 2M SDE"
    assert sampler_name(object()) == "object"
