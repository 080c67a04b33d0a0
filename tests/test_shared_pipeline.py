"""A method pipeline shares its base pipeline's components: a call must leave them exactly as it found it.

For every method pipeline and every plugin: a plain generation with a fixed generator, one call of the method on a
pipeline built ``from_pipe`` of the same object (or the plugin applied and removed), the plain generation again:
the bytes are identical, and the attention processors, LoRA adapters, scheduler and progress-bar settings are those
of before. Nothing here unloads or restores anything after a method call: that is the method pipelines' job.
Nested ``attnctrl.apply`` of an equal config is reference-counted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny
from test_freecustom import REFS, box_mask, image

import attnctrl
from attnctrl.core import Controller
from attnctrl.methods import CLEAR, AgentAttention, AttentionMaps
from attnctrl.models import tiny_pipeline
from attnctrl.models.lora import random_lora
from attnctrl.pipelines import (
    CLoRAPipeline,
    DiTCtrlPipeline,
    FreeCustomPipeline,
    IRDiffusionPipeline,
    MagicFacePipeline,
    PrimeComposerPipeline,
    Subject,
)

STEPS = 2
SIZE = 128  # as tests/test_pipelines.py


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd15():
    """This module's own tiny SD 1.5 pipeline (LoRAs are loaded into it; the session's stays untouched)."""
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loras(sd15, tmp_path_factory):
    """Two real LoRA files for the tiny UNet (random, non-zero: each changes the output)."""
    folder = tmp_path_factory.mktemp("loras")
    return [str(random_lora(sd15, folder / "dog.safetensors", seed=1)),
            str(random_lora(sd15, folder / "cat.safetensors", seed=2))]


def plain(pipe):
    """The base pipeline's own generation: its output bytes."""
    if hasattr(pipe, "transformer"):
        return pipe("a cat walks", num_frames=9, num_inference_steps=STEPS, output_type="np", generator=gen()).frames
    return pipe("a cat and a dog", num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                generator=gen()).images


def snapshot(pipe) -> dict:
    """What a method must leave as it found it on the base pipeline (objects by identity, the rest by value)."""
    den = getattr(pipe, "unet", None) or pipe.transformer
    state = {
        "processors": dict(den.attn_processors),
        "pre_hooks": dict(den._forward_pre_hooks), "hooks": dict(den._forward_hooks),
        "modules": [(name, type(m)) for name, m in den.named_modules()],
        "training": [m.training for m in den.modules()],
        "requires_grad": [p.requires_grad for p in den.parameters()],
        "scheduler": pipe.scheduler, "scheduler_class": type(pipe.scheduler),
        "scheduler_config": dict(pipe.scheduler.config), "scheduler_config_object": pipe.scheduler.config,
        "progress": dict(pipe._progress_bar_config), "rng": torch.get_rng_state(),
        "components": dict(pipe.components),
    }
    if hasattr(pipe, "get_list_adapters"):
        state["adapters"] = pipe.get_list_adapters()
        state["active"] = pipe.get_active_adapters()
        state["peft_config"] = {k: dict(getattr(v, "peft_config", {})) for k, v in pipe.components.items()
                                if isinstance(v, torch.nn.Module)}
        state["lora_enabled"] = [getattr(m, "_disable_adapters", None) for m in den.modules()]
        state["lora_scaling"] = [dict(getattr(m, "scaling", {}) or {}) for m in den.modules()
                                 if hasattr(m, "lora_A")]
    return state


def assert_as_before(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())  # the very same objects
    for key in ("scheduler", "scheduler_config_object"):
        assert after[key] is before[key], key
    for key in ("pre_hooks", "hooks", "modules", "training", "requires_grad", "scheduler_class", "scheduler_config",
                "progress", "adapters", "active", "peft_config", "lora_enabled", "lora_scaling"):
        assert after.get(key) == before.get(key), key
    assert torch.equal(after["rng"], before["rng"])  # a generator was given: the global RNG is not drawn from
    assert all(after["components"][k] is v for k, v in before["components"].items())
    assert attnctrl.applied(pipe) == [] and Controller.of(pipe, create=False) is None


# -- the method pipelines ------------------------------------------------------------------------------------------

def freecustom(pipe, loras, **kw):
    return FreeCustomPipeline.from_pipe(pipe)("a circle and a square", references=REFS, num_inference_steps=STEPS,
                                              height=SIZE, width=SIZE, generator=gen(), output_type="np", **kw)


def magicface(pipe, loras, **kw):
    return MagicFacePipeline.from_pipe(pipe)("a woman wearing a hat", references=REFS, ref_words=["woman", "hat"],
                                             inject_step=1, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                                             generator=gen(), output_type="np", **kw)


def irdiffusion(pipe, loras, **kw):
    subjects = [Subject("cat", REFS[0], region=(0, 0.25, 0.45, 0.75)), Subject("dog", prompt="a dog")]  # rehearsal
    return IRDiffusionPipeline.from_pipe(pipe)("a cat and a dog", subjects=subjects, num_inference_steps=STEPS,
                                               height=SIZE, width=SIZE, generator=gen(), output_type="np", **kw)


def clora(pipe, loras, **kw):
    return CLoRAPipeline.from_pipe(pipe)(
        ["a cat and a dog", "a sks dog and a cat", "a zwx cat and a dog"], [None, *loras],
        [["cat", "cat", "zwx cat"], ["dog", "sks dog", "dog"]], [[], ["sks dog"], ["zwx cat"]],
        max_iter_to_alter=1, iterative_steps=(), num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=gen(),
        output_type="np", **kw)


def primecomposer(pipe, loras, **kw):
    return PrimeComposerPipeline.from_pipe(pipe)(
        image(1, SIZE), image(2, SIZE), box_mask(20, 30, 90, 100, size=SIZE), location=(32, 32, 96, 96),
        prompt="a cat", rca_words=["cat"], num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=gen(),
        output_type="np", **kw)


def ditctrl(pipe, loras, **kw):
    return DiTCtrlPipeline.from_pipe(pipe)(["a cat walks", "a dog runs"], num_frames=9, num_inference_steps=STEPS,
                                           overlap=1, num_transition_blocks=1, kv_steps=(1, 3), generator=gen(),
                                           output_type="np", **kw)


METHODS = {"freecustom": freecustom, "magicface": magicface, "irdiffusion": irdiffusion, "clora": clora,
           "primecomposer": primecomposer, "ditctrl": ditctrl}


@pytest.fixture(scope="module")
def pipes(sd15):
    return {"sd15": sd15, "cogvideox": tiny("cogvideox")}


@pytest.fixture(scope="module")
def plains(pipes):
    """Each base pipeline's plain output, made once, before any method ran on it."""
    return {name: plain(pipe) for name, pipe in pipes.items()}


def _base(method, pipes):
    return pipes["cogvideox" if method == "ditctrl" else "sd15"]


def _boom(p, step, timestep, kw):
    raise RuntimeError("stop")


@pytest.mark.parametrize("method", list(METHODS))
def test_a_call_leaves_the_base_pipeline_exactly_as_it_found_it(method, pipes, plains, loras):
    pipe = _base(method, pipes)
    before = snapshot(pipe)
    METHODS[method](pipe, loras)
    assert_as_before(pipe, before)
    again = plain(pipe)
    assert np.array_equal(again, plains["cogvideox" if method == "ditctrl" else "sd15"])  # bit for bit


@pytest.mark.parametrize("method", list(METHODS))
def test_an_error_inside_the_loop_leaves_everything_restored(method, pipes, plains, loras):
    pipe = _base(method, pipes)
    before = snapshot(pipe)
    with pytest.raises(RuntimeError, match="stop"):
        METHODS[method](pipe, loras, callback_on_step_end=_boom)
    assert_as_before(pipe, before)
    assert np.array_equal(plain(pipe), plains["cogvideox" if method == "ditctrl" else "sd15"])


def test_clora_unloads_exactly_the_loras_it_loaded_and_keeps_the_users(sd15, plains, loras, tmp_path):
    """A LoRA the user loaded (at weight 0.5, active) stays loaded, active and weighted; the call's own go."""
    sd15.load_lora_weights(loras[0], adapter_name="mine")
    try:
        sd15.set_adapters(["mine"], adapter_weights=[0.5])
        mine = plain(sd15)
        assert not np.array_equal(mine, plains["sd15"])  # the user's LoRA is in effect
        before = snapshot(sd15)
        assert before["adapters"] == {"unet": ["mine"]} and before["active"] == ["mine"]
        clora(sd15, loras)
        assert_as_before(sd15, before)
        assert np.array_equal(plain(sd15), mine)
        sd15.disable_lora()  # disabled by the user: a call leaves it disabled
        before = snapshot(sd15)
        clora(sd15, loras)
        assert_as_before(sd15, before)
        assert np.array_equal(plain(sd15), plains["sd15"])
    finally:  # the test's own LoRA (not the call's)
        sd15.unload_lora_weights()
    assert sd15.get_list_adapters() == {} and np.array_equal(plain(sd15), plains["sd15"])


def test_the_registry_prepare_and_call_of_clora_leave_the_base_pipeline_as_they_found_it(sd15, plains, loras):
    """As a run.Session does: the entry's prepare (it loads the LoRAs to check them) and its call."""
    from attnctrl.inputs import LoraBranch
    from attnctrl.methods import CLoRA, entry

    clora_entry = entry("clora")
    pipeline = clora_entry.pipeline_class().from_pipe(sd15)
    inputs = {"loras": [LoraBranch(loras[0], "sks dog", "a sks dog and a cat"),
                        LoraBranch(loras[1], "zwx cat", "a zwx cat and a dog")]}
    before = snapshot(sd15)
    config = CLoRA(max_iter_to_alter=1, iterative_steps=())
    clora_entry.prepare(pipeline, config, ["a cat and a dog"], inputs)
    assert_as_before(sd15, before)
    clora_entry.call(pipeline, config, ["a cat and a dog"], inputs, num_inference_steps=STEPS, height=SIZE,
                     width=SIZE, generator=gen(), output_type="np")
    assert_as_before(sd15, before)
    assert np.array_equal(plain(sd15), plains["sd15"])


def test_whatever_a_call_changes_on_shared_state_is_put_back(sd15, plains, loras):
    """A step callback that reconfigures the scheduler, swaps it, replaces processors, changes the progress bar,
    draws from the global RNG and puts the UNet in train mode: all undone when the call ends."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor

    before = snapshot(sd15)
    seen = []

    def meddle(p, step, timestep, kw):
        p.scheduler.register_to_config(steps_offset=7)
        p.unet.set_attn_processor(AttnProcessor())
        p.set_progress_bar_config(disable=False, desc="meddled")
        p._progress_bar_config["leave"] = False
        p.unet.train()
        torch.rand(3)
        if step == STEPS - 1:  # after the last scheduler step
            p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
        seen.append(step)
        return kw

    fc = FreeCustomPipeline.from_pipe(sd15)
    fc_progress = fc._progress_bar_config
    fc("a circle and a square", references=REFS, num_inference_steps=STEPS, height=SIZE, width=SIZE,
       generator=gen(), output_type="np", callback_on_step_end=meddle)
    assert seen == [0, 1]
    assert_as_before(sd15, before)
    assert fc.scheduler is sd15.scheduler and fc._progress_bar_config is fc_progress and fc_progress == {"disable": True}
    assert np.array_equal(plain(sd15), plains["sd15"])


# -- the plugins ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [AttentionMaps(words=["cat"]), AgentAttention(ratio=0.5), CLEAR(radius=2)],
                         ids=["attention_maps", "agent", "clear"])
def test_a_plugin_applied_and_removed_leaves_the_pipeline_exactly_as_it_found_it(config, sd15, plains):
    pipe = tiny("flux") if isinstance(config, CLEAR) else sd15
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    if isinstance(config, CLEAR):
        kw["max_sequence_length"] = 32
    first = pipe("a cat and a dog", generator=gen(), **kw).images
    before = snapshot(pipe)
    handle = attnctrl.apply(pipe, config)
    pipe("a cat and a dog", generator=gen(), **kw)
    attnctrl.remove(pipe, handle)
    assert_as_before(pipe, before)
    assert np.array_equal(pipe("a cat and a dog", generator=gen(), **kw).images, first)


# -- nested apply --------------------------------------------------------------------------------------------------

def test_nested_apply_of_an_equal_config_keeps_the_outer_block_working(sd15):
    before = snapshot(sd15)
    with attnctrl.apply(sd15, AttentionMaps(words=["cat"])) as outer:
        with attnctrl.apply(sd15, AttentionMaps(words=["cat"])) as inner:
            assert inner is outer and outer.uses == 2
            plain(sd15)
        assert outer.active and attnctrl.applied(sd15) == [outer] and outer.uses == 1
        heat = outer.heat_maps()["cat"]  # the maps are still there after the inner block
        assert np.isfinite(heat).all() and heat.max() > 0
        plain(sd15)  # and it still records
        assert outer.heat_maps()["cat"].shape == heat.shape
    assert not outer.active
    assert_as_before(sd15, before)


def test_remove_uninstalls_at_once_whatever_the_count(sd15):
    before = snapshot(sd15)
    outer = attnctrl.apply(sd15, AttentionMaps())
    inner = attnctrl.apply(sd15, AttentionMaps())
    assert inner is outer and outer.uses == 2
    outer.remove()
    assert outer.active and outer.uses == 1
    with attnctrl.apply(sd15, AttentionMaps()):
        assert attnctrl.remove(sd15) == 1
        assert not outer.active
    outer.remove()  # removed: nothing to do
    assert_as_before(sd15, before)
    # a different config of the same method replaces the old handle, whatever its count
    first = attnctrl.apply(sd15, AttentionMaps())
    attnctrl.apply(sd15, AttentionMaps())
    second = attnctrl.apply(sd15, AttentionMaps(words=["cat"]))
    assert not first.active and second.active and second.uses == 1
    second.remove()
    assert_as_before(sd15, before)
