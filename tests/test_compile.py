"""``torch.compile`` of the denoiser with attnctrl installed: whole graphs, no recompile per step, eager's output.

The processors read nothing of the step, the pipeline or a ``torch.Generator`` inside the forward: the controller's
pre-forward hook (excluded from compilation) decides all of that before the denoiser runs (``on_step``). The
default test compiles with ``aot_eager`` (Dynamo's tracing, where graph breaks and recompiles come from, and
AOTAutograd, without Inductor's code generation, which takes minutes on a small CPU): outputs are bit for bit
eager's. The slow test runs Inductor and compares within float32 noise.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import run, tiny
from PIL import Image

import attnctrl
from attnctrl.pipelines import FreeCustomPipeline, Reference
from attnctrl.processors.agent import AgentAttention
from attnctrl.processors.clear import CLEAR

STEPS = 3


def _generate(case: str, pipe, ref: str):
    if case == "freecustom":
        return FreeCustomPipeline.from_pipe(pipe)(
            prompt="a photo of a cat", references=[Reference(ref, prompt="a red photo")], num_inference_steps=STEPS,
            height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(3)).images
    return run(pipe, steps=STEPS)


def _compiled_vs_eager(case: str, backend: str, tmp_path):
    """``(eager, compiled, compiled again, graph breaks, graphs)`` with the case's method installed."""
    family = "flux" if case == "clear" else "sd15"
    pipe, name = tiny(family), "transformer" if family == "flux" else "unet"
    ref = str(tmp_path / "ref.png")
    Image.new("RGB", (64, 64), (200, 20, 20)).save(ref)
    plugin = {"agent": AgentAttention(ratio=0.5, switch_step=2), "clear": CLEAR(radius=2)}.get(case)
    denoiser = getattr(pipe, name)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    with attnctrl.apply(pipe, plugin) if plugin is not None else nullcontext():
        eager = _generate(case, pipe, ref)
        setattr(pipe, name, torch.compile(denoiser, backend=backend))
        try:
            counters.clear()
            compiled = _generate(case, pipe, ref)
            again = _generate(case, pipe, ref)
        finally:
            setattr(pipe, name, denoiser)
    return eager, compiled, again, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("case", ["agent", "clear", "freecustom"])
def test_compiled_denoiser_has_whole_graphs_and_eager_outputs(case, tmp_path):
    eager, compiled, again, breaks, graphs = _compiled_vs_eager(case, "aot_eager", tmp_path)
    assert breaks == 0
    # one graph per phase: AgentAttention's two (agent, then ToMe after switch_step), FreeCustom's mask cache
    # filled after the first step; never one per step or per layer
    assert graphs <= 2
    np.testing.assert_array_equal(compiled, eager)
    np.testing.assert_array_equal(again, eager)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["agent", "clear", "freecustom"])
def test_inductor_matches_eager_within_float32_noise(case, tmp_path):
    eager, compiled, again, breaks, graphs = _compiled_vs_eager(case, "inductor", tmp_path)
    assert breaks == 0 and graphs <= 2
    np.testing.assert_allclose(compiled, eager, atol=2e-4)
    np.testing.assert_array_equal(again, compiled)
