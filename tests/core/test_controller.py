"""Controller: identity when idle, exact undo, composition, conflicts, step tracking, clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import denoiser_of, run, tiny

import attnctrl
from attnctrl.core import (
    AttnCtrlProcessor,
    Controller,
    LayerConflictError,
    LayerSelectionError,
    MethodState,
    Plugin,
    UnsupportedModelError,
)


@dataclass(frozen=True)
class Passthrough(Plugin):
    """Controller-managed processors that do nothing."""

    tag: int = 0
    name = "passthrough"

    def make_processor(self, layer, ctl, state):
        return AttnCtrlProcessor(layer, ctl)


@dataclass(frozen=True)
class Other(Passthrough):
    name = "other"


@dataclass(frozen=True)
class SelfOnly(Passthrough):
    name = "self-only"
    kinds = ("self",)


class IPAdapterLike(torch.nn.Module):
    """A custom processor with weights, placed before attnctrl (like IP-Adapter's)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.proj = torch.nn.Linear(2, 2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


def test_idle_processors_are_bit_identical_and_undo_is_exact(family):
    pipe = tiny(family)
    den = denoiser_of(pipe)
    plain = run(pipe)
    name = next(iter(den.attn_processors))
    custom = IPAdapterLike(den.attn_processors[name]) if family in ("sd15", "sd21", "sdxl") else None
    if custom is not None:
        den.get_submodule(name[: -len(".processor")]).set_processor(custom)
    before = dict(den.attn_processors)
    hooks_before = len(den._forward_pre_hooks)
    try:
        with attnctrl.apply(pipe, Passthrough()) as handle:
            assert len(handle.layers) == len(before)
            assert all(isinstance(p, AttnCtrlProcessor) for p in den.attn_processors.values())
            assert len(den._forward_pre_hooks) == hooks_before + 1
            with_method = run(pipe)
        after = den.attn_processors
        assert all(after[k] is before[k] for k in before)  # the very same objects
        assert len(den._forward_pre_hooks) == hooks_before
        assert Controller.of(pipe, create=False) is None  # no state left behind
        np.testing.assert_array_equal(with_method, plain)  # bit for bit
        np.testing.assert_array_equal(run(pipe), plain)  # same seed, same image, after undo
        if custom is not None:
            assert den.get_submodule(name[: -len(".processor")]).processor is custom
            assert any(m is custom for m in den.modules())  # re-registered as a submodule with its weights
    finally:
        if custom is not None:
            den.get_submodule(name[: -len(".processor")]).set_processor(custom.inner)


def test_same_seed_same_image_twice(family):
    pipe = tiny(family)
    np.testing.assert_array_equal(run(pipe, seed=3), run(pipe, seed=3))
    assert not np.array_equal(run(pipe, seed=3), run(pipe, seed=4))


def test_apply_twice_does_not_stack_and_same_method_replaces():
    pipe = tiny("sd15")
    h1 = attnctrl.apply(pipe, Passthrough())
    procs = dict(denoiser_of(pipe).attn_processors)
    assert attnctrl.apply(pipe, Passthrough()) is h1
    assert denoiser_of(pipe).attn_processors == procs
    h2 = attnctrl.apply(pipe, Passthrough(tag=1))
    assert not h1.active and h2.active and attnctrl.applied(pipe) == [h2]
    h2.remove()
    h2.remove()  # idempotent
    assert attnctrl.applied(pipe) == []


def test_disjoint_methods_compose_and_overlap_raises():
    pipe = tiny("sd15")
    den = denoiser_of(pipe)
    before = dict(den.attn_processors)
    a = attnctrl.apply(pipe, Passthrough(layers="encoder"))
    b = attnctrl.apply(pipe, Other(layers="decoder"))
    assert len(attnctrl.applied(pipe)) == 2
    with pytest.raises(LayerConflictError, match="SelfOnly and Other both want 3 layer"):
        attnctrl.apply(pipe, SelfOnly(layers="up.3"))
    a.remove()
    assert all(den.attn_processors[la.name] is before[la.name] for la in a.layers)
    assert all(den.attn_processors[la.name] is b.processors[la.name] for la in b.layers)
    assert attnctrl.remove(pipe) == 1
    assert den.attn_processors == before
    assert len(den._forward_pre_hooks) == 0


def test_failed_apply_leaves_nothing_behind():
    pipe = tiny("sd15")
    before = dict(denoiser_of(pipe).attn_processors)

    @dataclass(frozen=True)
    class Broken(Passthrough):
        name = "broken"

        def make_processor(self, layer, ctl, state):
            if layer.index == 5:
                raise RuntimeError("boom")
            return super().make_processor(layer, ctl, state)

    with pytest.raises(RuntimeError, match="boom"):
        attnctrl.apply(pipe, Broken())
    assert denoiser_of(pipe).attn_processors == before
    assert Controller.of(pipe, create=False) is None


def test_zero_layers_and_wrong_kind_and_unsupported_raise():
    pipe = tiny("sd15")
    with pytest.raises(LayerSelectionError, match="valid terms"):
        attnctrl.apply(pipe, Passthrough(layers="up.9"))
    with pytest.raises(LayerSelectionError, match="acts on self attention"):
        attnctrl.apply(pipe, SelfOnly(layers="cross"))
    with pytest.raises(UnsupportedModelError):
        attnctrl.apply(torch.nn.Linear(2, 2), Passthrough())
    with pytest.raises(UnsupportedModelError):
        attnctrl.apply(object(), Passthrough())

    @dataclass(frozen=True)
    class SDOnly(Passthrough):
        name = "sd-only"
        families = ("sd",)

    with pytest.raises(UnsupportedModelError, match="FLUX"):
        attnctrl.apply(tiny("flux"), SDOnly())
    with pytest.raises(TypeError):
        attnctrl.apply(pipe, "not a config")
    assert Controller.of(pipe, create=False) is None


class _Recorder(MethodState):
    def __init__(self):
        self.events = []

    def on_run(self, ctl):
        self.events.append(("run",))

    def on_step(self, ctl):
        self.events.append(("step", ctl.step, ctl.timestep))


@dataclass(frozen=True)
class Tracker(Passthrough):
    name = "tracker"

    def create_state(self, ctl, layers):
        return _Recorder()


@pytest.mark.parametrize("fam", ["sd15", "flux", "cogvideox"])
def test_step_tracking(fam):
    pipe = tiny(fam)
    with attnctrl.apply(pipe, Tracker()) as h:
        run(pipe, steps=3)
        run(pipe, steps=2)
        ctl = h.controller
        assert ctl.step == 1 and ctl.num_steps == 2
    steps = [e[1] for e in h.state.events if e[0] == "step"]
    runs = sum(e[0] == "run" for e in h.state.events)
    assert steps == [0, 1, 2, 0, 1] and runs == 2


def test_one_step_runs_are_runs_of_their_own():
    """Two one-step runs share their only timestep: the new schedule (``set_timesteps``) starts the second run."""
    pipe = tiny("sd15")
    with attnctrl.apply(pipe, Tracker()) as h:
        run(pipe, steps=1)
        run(pipe, steps=1)
    assert sum(e[0] == "run" for e in h.state.events) == 2


def probe(record, layers=None) -> Plugin:
    """A method whose processors call ``record(processor, q, text_len)`` and otherwise do nothing."""

    class Probe(AttnCtrlProcessor):
        def attend(self, attn, q, k, v, mask=None, text_len=0):
            record(self, q, text_len)
            return super().attend(attn, q, k, v, mask, text_len)

    @dataclass(frozen=True)
    class P(Passthrough):
        name = "probe"

        def make_processor(self, layer, ctl, state):
            return Probe(layer, ctl)

    return P(layers=layers)


def test_call_info_and_cfg():
    pipe = tiny("sd15")
    seen = []

    def record(proc, q, text_len):
        seen.append((proc.ctl.call.grid, proc.ctl.call.batch, proc.ctl.cfg, proc.ctl.call.text_len))

    with attnctrl.apply(pipe, probe(record, "layers[0]")):
        run(pipe, steps=1, height=96, width=64)
        run(pipe, steps=1, guidance_scale=1.0)
    assert seen == [((12, 8), 2, True, 77), ((16, 16), 1, False, 77)]


def test_flux_single_stream_gets_text_length():
    pipe = tiny("flux")
    seen = []
    with attnctrl.apply(pipe, probe(lambda proc, q, text_len: seen.append((proc.layer.kind, text_len, q.shape[2])))):
        run(pipe, steps=1, max_sequence_length=32)
    assert seen == [("joint", 32, 96), ("joint", 32, 96), ("single", 32, 96), ("single", 32, 96)]


def test_apply_to_denoiser_directly_and_remove_by_class():
    den = denoiser_of(tiny("sd15"))
    h = attnctrl.apply(den, Passthrough(layers="mid"))
    assert attnctrl.applied(tiny("sd15")) == [h]  # the same controller, reached through the pipeline
    assert attnctrl.remove(den, Other) == 0
    assert attnctrl.remove(den, Passthrough) == 1
    assert attnctrl.remove(den) == 0
