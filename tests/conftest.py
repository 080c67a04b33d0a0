"""Shared fixtures: tiny pipelines built once per test session (each in well under a second, offline)."""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")

FAMILIES = ("sd15", "sd21", "sdxl", "flux", "cogvideox")

_CACHE: dict[str, object] = {}


def tiny(family: str):
    """The session's tiny pipeline of ``family`` (build once; tests must leave it as they found it)."""
    if family not in _CACHE:
        from attnctrl.models import tiny_pipeline

        _CACHE[family] = tiny_pipeline(family)
    return _CACHE[family]


def toyworld():
    """The shipped toyworld pipeline, loaded once per session (tests must leave it as they found it)."""
    if "toyworld" not in _CACHE:
        import attnctrl

        pipe = attnctrl.load_pipeline("toyworld")
        pipe.set_progress_bar_config(disable=True)
        _CACHE["toyworld"] = pipe
    return _CACHE["toyworld"]


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def run(pipe, prompt: str = "a photo of a cat", steps: int = 3, seed: int = 0, **kw):
    """Run a tiny pipeline to numpy output with a fixed CPU generator."""
    video = "num_frames" in inspect.signature(pipe.__call__).parameters
    if video:
        kw.setdefault("num_frames", 9)
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np",
               **kw)
    return out.frames if video else out.images


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _no_leftover_methods():
    """Every test must undo what it applied to the shared pipelines."""
    yield
    import attnctrl

    for pipe in _CACHE.values():
        leftover = attnctrl.applied(pipe)
        if leftover:
            attnctrl.remove(pipe)
            pytest.fail(f"test left methods applied: {leftover}")


@pytest.fixture
def no_grad():
    """Autograd off for one test (modules opt in with ``pytestmark = pytest.mark.usefixtures("no_grad")``); the
    global mode is restored afterwards, so later modules that train or differentiate are not affected."""
    with torch.no_grad():
        yield
