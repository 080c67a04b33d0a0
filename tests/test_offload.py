"""Offload (diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``) with attnctrl's methods.

On a machine without a GPU the hooks are installed with the CPU as the execution device: the test checks that they
are there and that every output equals the one without offload (``benchmarks/gpu_check.py`` runs it on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnctrl import AttnCtrlError, apply
from attnctrl.methods import AgentAttention
from attnctrl.models import check_offload, enable_offload, tiny_pipeline
from attnctrl.pipelines import FreeCustomPipeline, Reference


def _run(pipe, **kw):
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(3), **kw).images


@pytest.fixture(scope="module")
def pipes():
    plain = tiny_pipeline("sd15")
    offloaded = tiny_pipeline("sd15")  # the same weights: tiny models are seeded
    enable_offload(offloaded, "model", "cpu")
    return plain, offloaded


def test_model_offload_installs_hooks_and_changes_no_output(pipes, tmp_path):
    plain, offloaded = pipes
    assert getattr(offloaded.unet, "_hf_hook", None) is not None and offloaded.attnctrl_offload == "model"
    np.testing.assert_array_equal(_run(plain), _run(offloaded))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    with apply(plain, AgentAttention(ratio=0.4)), apply(offloaded, AgentAttention(ratio=0.4)):
        np.testing.assert_array_equal(_run(plain), _run(offloaded))
    Image.new("RGB", (64, 64), (200, 20, 20)).save(tmp_path / "ref.png")
    refs = [Reference(str(tmp_path / "ref.png"), prompt="a red photo")]
    a = FreeCustomPipeline.from_pipe(plain)(**_kwargs(refs))
    b = FreeCustomPipeline.from_pipe(offloaded)(**_kwargs(refs))
    np.testing.assert_array_equal(a.images, b.images)


def _kwargs(refs):
    return dict(prompt="a photo of a cat", references=refs, num_inference_steps=2, height=64, width=64,
                output_type="np", generator=torch.Generator().manual_seed(3))


def test_offload_needs_a_gpu_and_a_known_mode():
    assert check_offload(None, torch.device("cpu")) is None and check_offload("none", torch.device("cpu")) is None
    with pytest.raises(AttnCtrlError, match="runs here on the CPU anyway"):
        check_offload("model", torch.device("cpu"))
    with pytest.raises(AttnCtrlError, match="unknown offload 'half'"):
        check_offload("half", torch.device("cpu"))
