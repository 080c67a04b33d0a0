"""Bad inputs found by fuzzing the CLI and the pipelines: each one a clear error (or the right result), never a
traceback or a silently wrong output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from attnctrl.cli.main import cli
from attnctrl.core import AttnCtrlError
from attnctrl.core.masks import box_mask, load_mask
from attnctrl.inputs import Composition, parse_composition, parse_lora, parse_reference, parse_subject, split_spec
from attnctrl.pipelines.primecomposer import composition_geometry
from attnctrl.processors.freecustom import FreeCustom
from attnctrl.processors.magicface import MagicFace
from attnctrl.run.jobs import JobFileError, load_jobs

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "star.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.new("RGB", (200, 100), (10, 200, 10)).save(tmp_path / "wide.png")
    return tmp_path


def test_specs_split_at_colons_but_not_at_a_windows_drive():
    assert split_spec("C:\\imgs\\a.png:D:/m.png:a prompt: with a colon", 3) == [
        "C:\\imgs\\a.png", "D:/m.png", "a prompt: with a colon"]
    assert split_spec("a.png", 3) == ["a.png", "", ""]
    assert split_spec("a.png::a prompt", 3) == ["a.png", "", "a prompt"]
    assert split_spec("C:\\loras\\dog.safetensors:sks dog:a sks: dog", 3) == [
        "C:\\loras\\dog.safetensors", "sks dog", "a sks: dog"]
    assert split_spec("c:/bg.png:D:\\obj.png", 3) == ["c:/bg.png", "D:\\obj.png", ""]


def test_lora_and_composition_shorthands(files):
    import shutil
    from pathlib import Path

    lora = files / "dog.safetensors"
    shutil.copy(Path(__file__).resolve().parent.parent / "assets" / "examples" / "toyworld-sks-lora.safetensors", lora)
    branch = parse_lora(f"{lora}:sks dog:a sks dog: running", 0)
    assert (branch.path, branch.words, branch.prompt) == (str(lora), "sks dog", "a sks dog: running")
    with pytest.raises(AttnCtrlError, match="give PATH:WORD:PROMPT"):
        parse_lora(f"{lora}:sks dog", 0)
    comp = parse_composition(f"{files / 'wide.png'}:{files / 'star.png'}:{files / 'mask.png'}@100,50,50,50")
    assert comp.mask == str(files / "mask.png") and comp.fractions() == (0.5, 0.5, 0.75, 1.0)
    with pytest.raises(AttnCtrlError, match="BACKGROUND:OBJECT"):
        parse_composition(f"{files / 'wide.png'}:{files / 'star.png'}")
    with pytest.raises(AttnCtrlError, match="W, H > 0"):
        parse_composition(f"{files / 'wide.png'}:{files / 'star.png'}@0,0,0,5")


def test_reference_and_subject_specs(files):
    star, mask = files / "star.png", files / "mask.png"
    with pytest.raises(AttnCtrlError, match="mask file a striped star does not exist .*IMAGE::PROMPT"):
        parse_reference(f"{star}:a striped star", 0)
    with pytest.raises(AttnCtrlError, match="is a folder"):
        parse_reference(f"{files}", 0)
    assert parse_reference(f"{star}::a striped star", 0).prompt == "a striped star"
    with pytest.raises(AttnCtrlError, match="image: file .*strr.png does not exist"):  # a typo is not a prompt
        parse_subject(f"star={files / 'strr.png'}:{mask}:a star@0,0.2,0.45,0.8", 0)
    with pytest.raises(AttnCtrlError, match="one @REGION per subject"):
        parse_subject(f"star={star}:{mask}:a star@0,0,0.5,1@0,0.2,0.45,0.8", 0)
    with pytest.raises(AttnCtrlError, match="not valid UTF-8"):
        parse_subject("star=a star \udcff", 0)
    assert parse_subject("star=a photo of a star@0,0,0.5,1", 0).prompt == "a photo of a star"
    assert parse_subject("star=a red/green star", 0).prompt == "a red/green star"  # a slash in a prompt
    with pytest.raises(AttnCtrlError, match="does not exist"):
        parse_subject("star=imgs/star", 0)


def test_boxes_and_masks():
    with pytest.raises(AttnCtrlError, match="finite"):
        box_mask((float("nan"), 0, 10, 10), (64, 64))
    with pytest.raises(AttnCtrlError, match="finite"):
        box_mask((0, 0, float("inf"), 10), (64, 64))
    faint = np.full((8, 8), 1000, np.uint16)  # a 16-bit mask: faint grey background, white square
    faint[2:6, 2:6] = 65535
    mask = load_mask(Image.fromarray(faint))
    assert mask.sum() == 16  # scaled to 8 bits, not clipped (which made every pixel foreground)


def test_non_finite_options_are_refused():
    with pytest.raises(AttnCtrlError, match="mask_weights must be a finite number"):
        FreeCustom(mask_weights=float("nan"))
    with pytest.raises(AttnCtrlError, match="inject_step must be a finite number"):
        MagicFace(inject_step=float("nan"))


def test_primecomposer_boxes_are_in_background_pixels(files):
    star = str(files / "star.png")
    assert Composition(star, star, (0, 0, 1, 1)).fractions() == (0.0, 0.0, 1 / 64, 1 / 64)  # one pixel, not the image
    with pytest.raises(AttnCtrlError, match="outside the 64x64 background"):
        Composition(star, star, (70, 0, 5, 5)).fractions()
    # a 200x100 background at 128x128: its pixel box (100, 50)-(150, 100) is the lower middle quarter
    _, _, _, loc, _ = composition_geometry(files / "wide.png", files / "star.png", files / "mask.png",
                                           (100, 50, 150, 100), 128, 128)
    ys, xs = torch.nonzero(loc, as_tuple=True)
    assert (int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1) == (64, 96, 64, 128)


def test_a_box_partly_off_the_background_is_refused_in_words_of_every_surface(files):
    """A box reaching past the background cut the object off; the one validation refuses it, naming the box (not
    a command-line flag: the app shows the same message)."""
    from attnctrl.run import Request, validate

    def plan(box):
        comp = {"background": str(files / "wide.png"), "object": str(files / "star.png"),
                "mask": str(files / "mask.png"), "box": box}
        return validate(Request("a star", model="tiny-sd15", method="primecomposer", inputs={"composition": [comp]}),
                        check_output=False)

    assert plan([150, 50, 50, 50]).inputs["composition"][0].box == (150, 50, 50, 50)  # up to the edges is fine
    for box, edge in (([160, 50, 50, 50], "right"), ([-5, 0, 20, 20], "left"), ([0, 90, 20, 20], "bottom"),
                      ([10, -1, 20, 20], "top")):
        with pytest.raises(AttnCtrlError, match=f"the box .* goes past the {edge} edge of the 200x100 background, so "
                                                f"the object would be cut off") as e:
            plan(box)
        assert "--" not in str(e.value)


def test_shared_validation_names_inputs_not_command_line_flags(tmp_path):
    """The run layer's messages reach the app and job files too: they name the input; the CLI adds its flag."""
    from attnctrl.run import Request, validate

    ref = {"image": str(EXAMPLES / "striped-red-circle.png"), "prompt": "a circle"}
    cases = [(dict(method="freecustom"), "freecustom needs references: give at least one"),
             (dict(method="attention-maps", options={"words": ["cat"]}, inputs={"references": [ref]}),
              "attention-maps takes no references"),
             (dict(method="attention-maps"), "give the words")]
    for kw, message in cases:
        with pytest.raises(AttnCtrlError, match=message) as e:
            validate(Request("a cat", model="tiny-sd15", **kw), check_output=False)
        assert "--" not in str(e.value)
    result = CliRunner().invoke(cli, ["generate", "-m", "tiny-sd15", "-p", "a cat", "--method", "freecustom", "-o",
                                      str(tmp_path)])
    assert "freecustom needs references: give at least one (--ref IMAGE[:MASK][:PROMPT])" in result.output


def test_cli_output_folder_and_prompt_errors_come_before_any_work(files):
    runner = CliRunner()
    (files / "file.txt").write_text("x")
    result = runner.invoke(cli, ["generate", "-p", "a star", "--steps", "1", "-o", str(files / "file.txt" / "sub")])
    assert result.exit_code != 0 and "cannot write to the output folder" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(cli, ["generate", "-p", "a star \udcff", "--steps", "1", "-o", str(files / "out")])
    assert result.exit_code != 0 and "not valid UTF-8" in result.output and not (files / "out").exists()
    result = runner.invoke(cli, ["generate", "-p", "a star", "--steps", "1", "--guidance", "nan", "-o",
                                 str(files / "out")])
    assert result.exit_code != 0 and "finite" in result.output
    for prompt in ("", "   "):  # as the batch runner and the app
        result = runner.invoke(cli, ["generate", "-p", prompt, "--steps", "1", "-o", str(files / "out")])
        assert result.exit_code != 0 and "the prompt is empty" in result.output and not (files / "out").exists()


def test_job_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"prompt": "a star \xff"}\n')
    with pytest.raises(JobFileError, match="not UTF-8"):
        load_jobs(path)
    bad = tmp_path / "jobs.yaml"
    bad.write_text('- prompt: "a star\n- prompt: b\n')
    with pytest.raises(JobFileError, match="line"):
        load_jobs(bad)


def test_lists_and_widget_numbers():
    from attnctrl.run import parse_option as parse_field
    from attnctrl.ui.app import _number

    assert parse_field(FreeCustom, "mask_weights", "3,2") == (3.0, 2.0)  # "one value or one per reference"
    assert parse_field(FreeCustom, "mask_weights", "3") == 3.0
    with pytest.raises(AttnCtrlError, match="finite"):
        _number("nan", "Mask weight")
    with pytest.raises(AttnCtrlError, match="at most 1000"):
        _number("5000", "Steps", int, 1, 1000)


def test_reference_methods_refuse_a_step_window_past_the_last_step_and_repeated_words():
    from conftest import tiny

    from attnctrl.pipelines import FreeCustomPipeline, MagicFacePipeline, Reference

    pipe = tiny("sd15")
    ref = Reference(np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 255, np.uint8), "a cat")
    with pytest.raises(AttnCtrlError, match="start_step 5 is not below the 3 steps"):
        FreeCustomPipeline.from_pipe(pipe)("a cat", references=[ref], start_step=5, num_inference_steps=3)
    with pytest.raises(AttnCtrlError, match="cat repeated"):
        MagicFacePipeline.from_pipe(pipe)("a cat and a cat", references=[ref, ref], ref_words=["cat", "cat"],
                                          num_inference_steps=3)


def test_irdiffusion_refuses_repeated_subject_words():
    from conftest import tiny

    from attnctrl.pipelines import IRDiffusionPipeline, Subject

    ir = IRDiffusionPipeline.from_pipe(tiny("sd15"))
    with pytest.raises(AttnCtrlError, match="cat repeated"):
        ir("a cat and a cat", subjects=[Subject("cat", prompt="a cat"), Subject("cat", prompt="a black cat")])


def test_a_generation_that_fails_leaves_no_empty_output_folder(files):
    out = files / "fresh"
    ref = f"{files / 'star.png'}:{files / 'mask.png'}:a red square"
    result = CliRunner().invoke(cli, ["generate", "-m", "tiny-sd15", "--method", "magicface", "-p", "a cat and a dog",
                                      "--ref", ref, "--ref", ref, "--opt", "ref_words=cat", "--steps", "1", "-o", str(out)])
    assert result.exit_code != 0 and "ref_words" in result.output and "Traceback" not in result.output
    assert not out.exists()
