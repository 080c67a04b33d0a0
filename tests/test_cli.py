"""The command line: generate on the default model with metadata, clear one-line errors, info."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from attnctrl.cli.main import cli
from attnctrl.io import parse_infotext, read_png_metadata
from attnctrl.models import DEFAULT_MODEL


@pytest.fixture
def runner():
    return CliRunner()


def test_generate_with_no_model_writes_png_whose_metadata_round_trips(runner, tmp_path):
    result = runner.invoke(cli, ["generate", "-p", "a photo of a cat", "--steps", "2", "--seed", "7",
                                 "-n", "blurry", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-7-a-photo-of-a-cat.png"]
    meta = read_png_metadata(pngs[0])
    record = meta["attnctrl"]
    assert record["model"] == DEFAULT_MODEL and record["seed"] == 7 and record["steps"] == 2
    assert record["prompt"] == "a photo of a cat" and record["negative_prompt"] == "blurry"
    info = parse_infotext(meta["parameters"])
    assert info["prompt"] == "a photo of a cat" and info["Seed"] == "7" and info["Steps"] == "2"
    assert info["Size"] == f"{record['width']}x{record['height']}"
    # a second run numbers on instead of overwriting
    result = runner.invoke(cli, ["generate", "-p", "a photo of a cat", "--steps", "1", "--seed", "7",
                                 "--num-images", "2", "-o", str(tmp_path), "--no-metadata"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["00000-7-a-photo-of-a-cat.png", "00001-7-a-photo-of-a-cat.png", "00002-8-a-photo-of-a-cat.png"]
    assert read_png_metadata(tmp_path / names[1])["attnctrl"] is None


def test_generate_same_seed_same_pixels(runner, tmp_path):
    import numpy as np
    from PIL import Image

    for out in ("a", "b"):
        assert runner.invoke(cli, ["generate", "-p", "a cat", "--steps", "2", "--seed", "3", "-o",
                                   str(tmp_path / out)]).exit_code == 0
    a, b = (np.asarray(Image.open(next((tmp_path / o).glob("*.png")))) for o in ("a", "b"))
    np.testing.assert_array_equal(a, b)


def test_generate_with_attention_maps_writes_overlays(runner, tmp_path):
    result = runner.invoke(cli, ["generate", "-p", "a photo of a cat", "--steps", "2", "--seed", "1",
                                 "--method", "attention-maps", "--opt", "words=cat,photo", "--opt", "layers=cross",
                                 "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["00000-1-a-photo-of-a-cat-attn-cat.png", "00000-1-a-photo-of-a-cat-attn-photo.png",
                     "00000-1-a-photo-of-a-cat.png"]
    record = read_png_metadata(tmp_path / names[-1])["attnctrl"]
    assert record["method"] == "attention-maps" and record["method_options"]["words"] == ["cat", "photo"]


@pytest.mark.parametrize("args, message", [
    (["--opt", "words=cat"], "--opt sets an option of a method: add --method NAME"),
    (["--words", "cat"], "method options are given as --opt words=VALUE (an option of attention-maps)"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "attention-maps", "--opt", "words=dog"], "word 'dog': not in the prompt"),
    (["--method", "attention-maps", "--opt", "start_step=x"], "option start_step='x' is not valid"),
    (["--method", "attention-maps", "--opt", "words=cat", "--opt", "layers=up.9"], "matched none"),
    (["--method", "attention-maps", "--opt", "mask_weights=3"], "attention-maps has no option 'mask_weights'"),
    (["--method", "attention-maps", "--opt", "words"], "give KEY=VALUE"),
    (["--method", "freecustom"], "freecustom needs references: give at least one (--ref IMAGE[:MASK][:PROMPT])"),
    (["--method", "attention-maps", "--ref", "x.png"], "attention-maps takes no references (--ref IMAGE"),
    (["-p", "a dog"], "several prompts are for ditctrl; plain generation takes one"),
    (["--width", "100"], "multiple of 8"),
    (["--num-frames", "9"], "video models"),
    (["--model", "tiny-sd9"], "unknown tiny model"),
])
def test_user_errors_are_one_line(runner, tmp_path, args, message):
    result = runner.invoke(cli, ["generate", "-p", "a cat", "--steps", "1", "-o", str(tmp_path), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.glob("*.png")) == []  # nothing written before the error


def test_video_model_writes_mp4_and_sidecar(runner, tmp_path):
    result = runner.invoke(cli, ["generate", "-m", "tiny-cogvideox", "-p", "a cat walking", "--steps", "1",
                                 "--num-frames", "9", "--seed", "0", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "00000-0-a-cat-walking.mp4").stat().st_size > 0
    sidecar = json.loads((tmp_path / "00000-0-a-cat-walking.json").read_text())
    assert sidecar["num_frames"] == 9 and sidecar["model"] == "tiny-cogvideox"


def test_missing_model_exits_nonzero_with_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "attnctrl", "generate", "--model", "does-not-exist", "-p", "a cat", "-o",
         str(tmp_path)], capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: model 'does-not-exist' is not available offline")


def test_info(runner):
    result = runner.invoke(cli, ["info"])
    assert result.exit_code == 0
    assert "default model: " + DEFAULT_MODEL in result.output and "attention-maps" in result.output
    data = json.loads(runner.invoke(cli, ["info", "--json"]).output)
    assert data["packages"]["torch"] and "tiny-sd15" in data["tiny_models"]
    result = runner.invoke(cli, ["info", "--layers", "tiny-flux"])
    assert "single_transformer_blocks.1.attn.processor" in result.output


def test_method_options_never_collide_with_generate_options():
    from attnctrl.cli.main import generate

    opts = [opt for p in generate.params for opt in p.opts]
    assert len(opts) == len(set(opts)), sorted(o for o in opts if opts.count(o) > 1)
    assert "--mask-weights" not in opts and "--opt" in opts  # method options live in their own namespace


def test_method_help_lists_its_inputs_and_options(runner):
    result = runner.invoke(cli, ["generate", "--method", "freecustom", "--help"])
    assert result.exit_code == 0, result.output
    assert "--ref IMAGE[:MASK][:PROMPT]" in result.output and "--opt mask_weights=VALUE" in result.output
    assert "--opt radius=VALUE" not in result.output  # another method's option
    result = runner.invoke(cli, ["generate", "--help"])
    assert all(name in result.output for name in ("freecustom", "clora", "ditctrl"))
    result = runner.invoke(cli, ["generate", "--method", "nope", "--help"])
    assert "unknown method 'nope'" in result.output


def test_info_file_prints_the_stored_settings(runner, tmp_path):
    assert runner.invoke(cli, ["generate", "-p", "a cat", "--steps", "1", "--seed", "2", "-o", str(tmp_path)]
                         ).exit_code == 0
    png = next(tmp_path.glob("*.png"))
    result = runner.invoke(cli, ["info", str(png)])
    assert result.exit_code == 0 and json.loads(result.output)["attnctrl"]["seed"] == 2
    result = runner.invoke(cli, ["info", str(tmp_path / "nope.png")])
    assert result.exit_code == 1 and "no such file" in result.output
