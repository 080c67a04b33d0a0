"""Attention backends: the plain attention of attnctrl's processors goes through diffusers' dispatcher.

With the native backend the output is bit for bit the stock processors' (``tests/core/test_controller.py`` checks
that for every family; here the dispatcher is shown to be the path, and a chosen backend to be honoured)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import attnctrl
from attnctrl.core import AttnCtrlError, AttnCtrlProcessor, Plugin
from attnctrl.models import check_attention_backend, set_attention_backend
from attnctrl.processors.agent import AgentAttention


@dataclass(frozen=True)
class Plain(Plugin):
    """attnctrl processors on every attention layer, doing nothing of their own."""

    name = "plain"

    def make_processor(self, layer, ctl, state):
        return AttnCtrlProcessor(layer, ctl)


@pytest.fixture
def calls(monkeypatch):
    """Counts of each backend function called (the registry's functions wrapped), and the active backend restored."""
    counts: dict[str, int] = {}
    for name in (AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH):
        fn = _AttentionBackendRegistry._backends[name]

        def counted(*args, _fn=fn, _name=name.value, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counted)
    active = _AttentionBackendRegistry._active_backend
    yield counts
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("fam", ["sd15", "cogvideox"])
def test_plain_attention_goes_through_the_dispatcher(fam, calls):
    pipe = tiny(fam)
    stock = run(pipe, steps=1)
    assert not calls  # the stock UNet / CogVideoX processors call SDPA themselves
    with attnctrl.apply(pipe, Plain()) as handle:
        out = run(pipe, steps=1)
    np.testing.assert_array_equal(out, stock)  # the native backend: bit for bit
    assert calls["native"] % len(handle.processors) == 0 and calls["native"] >= len(handle.processors)


def test_a_chosen_backend_applies_to_attnctrl_processors(calls):
    pipe = tiny("sd15")
    base = run(pipe, steps=1)
    with attnctrl.apply(pipe, AgentAttention(ratio=0.5, agent_ratio=0.0)):  # merged tokens, plain attention
        agent = run(pipe, steps=1)
        calls.clear()
        set_attention_backend(pipe, "_native_math")
        try:
            math = run(pipe, steps=1)
        finally:
            set_attention_backend(pipe, "native")
            del pipe.attnctrl_attention_backend
    assert calls.get("_native_math", 0) > 0 and "native" not in calls
    np.testing.assert_allclose(math, agent, atol=1e-5)  # another kernel, the same attention
    np.testing.assert_array_equal(run(pipe, steps=1), base)


def test_processors_inherit_the_backend_of_the_layers_they_replace(calls):
    pipe = tiny("flux")
    denoiser = denoiser_of(pipe)
    set_attention_backend(pipe, "_native_math")
    try:
        with attnctrl.apply(pipe, Plain()) as handle:
            assert {p._attention_backend for p in handle.processors.values()} == {AttentionBackendName._NATIVE_MATH}
        assert {p._attention_backend for p in denoiser.attn_processors.values()} == {AttentionBackendName._NATIVE_MATH}
    finally:
        set_attention_backend(pipe, "native")
        del pipe.attnctrl_attention_backend


def test_backend_checks_are_one_clear_sentence():
    cpu = torch.device("cpu")
    assert check_attention_backend(None, cpu) is None and check_attention_backend("auto", cpu) is None
    assert check_attention_backend("native", cpu) == "native"
    with pytest.raises(AttnCtrlError, match="unknown attention backend 'fast'.*flash"):
        check_attention_backend("fast", cpu)
    with pytest.raises(AttnCtrlError, match="'flash' runs on a GPU only; on the CPU use auto, native or flex"):
        check_attention_backend("flash", cpu)
    with pytest.raises(AttnCtrlError, match="'xformers' (runs on a GPU only|cannot run here)"):
        check_attention_backend("xformers", torch.device("cuda") if torch.cuda.is_available() else cpu)
