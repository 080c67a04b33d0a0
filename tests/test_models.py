"""Tiny pipelines and load_pipeline: offline, deterministic, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny

import attnctrl
from attnctrl.core import AttnCtrlError, ModelNotAvailableError
from attnctrl.models import TINY_FAMILIES, load_pipeline, parse_dtype, tiny_pipeline


def test_tiny_models_are_deterministic_and_in_eval_mode():
    a, b = tiny_pipeline("sd15", seed=0), tiny_pipeline("sd15", seed=0)
    for name in ("unet", "vae", "text_encoder"):
        ma, mb = getattr(a, name), getattr(b, name)
        assert not ma.training
        assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    c = tiny_pipeline("sd15", seed=1)
    assert not torch.equal(next(iter(a.unet.parameters())), next(iter(c.unet.parameters())))
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_pipeline("sd3")


def test_sd15_topology_matches_sd15():
    layers = attnctrl.describe(denoiser_of(tiny("sd15")))
    assert len(layers) == 32 and layers.num_blocks == 16
    assert tiny("sd15").tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_load_pipeline_references(tmp_path):
    pipe = load_pipeline("tiny-sd15", device="cpu")
    assert pipe.attnctrl_model_id == "tiny-sd15" and pipe.dtype == torch.float32
    assert load_pipeline("tiny-sd15", dtype="bf16").dtype == torch.bfloat16
    # a saved local folder reloads offline and produces the same image
    pipe.save_pretrained(tmp_path / "m")
    again = load_pipeline(str(tmp_path / "m"))
    np.testing.assert_array_equal(run(again, steps=2), run(pipe, steps=2))


@pytest.mark.parametrize("ref, msg", [
    ("does-not-exist", "not available offline"),
    ("org/not-cached-model", "not in the Hugging Face cache"),
    ("tiny-sd9", "unknown tiny model"),
    ("not a model!", r"neither an embedded model \(toyworld, toyworld-flux\), a tiny model"),
])
def test_unavailable_models_fail_with_one_sentence(ref, msg):
    with pytest.raises(ModelNotAvailableError, match=msg) as e:
        load_pipeline(ref)
    assert "\n" not in str(e.value)


def test_a_missing_embedded_model_names_the_command_that_trains_it(tmp_path, monkeypatch):
    from attnctrl.models import check_model, loading

    monkeypatch.setattr(loading, "embedded_path", lambda name: tmp_path / name)
    with pytest.raises(ModelNotAvailableError, match=r"toyworld-flux model is missing .* `attnctrl train-toy --arch "
                                                     r"flux -o DIR`"):
        check_model("toyworld-flux")


def test_folder_and_file_errors(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotAvailableError, match="could not load checkpoint file"):
        load_pipeline(str(bad))


def test_dtypes():
    cpu = torch.device("cpu")
    assert parse_dtype(None, cpu) == torch.float32 and parse_dtype("fp16", cpu) == torch.float16
    with pytest.raises(AttnCtrlError, match="unknown dtype"):
        parse_dtype("int8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(AttnCtrlError, match="CUDA"):
            load_pipeline("tiny-sd15", device="cuda")


def test_every_tiny_family_loads_by_name():
    for family in TINY_FAMILIES:
        assert load_pipeline(f"tiny-{family}") is not None


def test_the_family_and_default_dtype_come_from_the_checkpoint_not_its_name(tmp_path):
    import json

    from attnctrl.models.loading import family_of, makes_video

    folder = tmp_path / "my-model"  # a FLUX checkpoint whose name does not say so
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert family_of(str(folder)) == "flux" and not makes_video(str(folder))
    named = tmp_path / "flux-lookalike"  # a name that says flux, a checkpoint that is SD
    named.mkdir()
    (named / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert family_of(str(named)) is None
    assert family_of("tiny-cogvideox") == "cogvideox" and makes_video("tiny-cogvideox")
    assert family_of("toyworld") is None and not makes_video("toyworld")
    assert parse_dtype(None, torch.device("cuda"), family_of(str(folder))) in (torch.bfloat16, torch.float16)
