"""Method pipelines are diffusers pipelines: ``from_pipe`` shares the base's components, every method loop keeps the
base pipeline's call contract (callback, output type, return_dict), and the base pipeline is left as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import denoiser_of, tiny
from diffusers import DiffusionPipeline
from test_freecustom import REFS, box_mask, image

import attnctrl
from attnctrl.core import (
    AttnCtrlError,
    AttnCtrlProcessor,
    Controller,
    LayerConflictError,
    MethodState,
    NotAPluginError,
    UnsupportedModelError,
    bind,
)
from attnctrl.methods import (
    CLEAR,
    AgentAttention,
    AttentionMaps,
    CLoRA,
    DiTCtrl,
    FreeCustom,
    IRDiffusion,
    MagicFace,
    PrimeComposer,
)
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
SIZE = 128  # every family (SDXL's tiny UNet has attention at latent/2 and /4: grids 8 and 4)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _size(family):
    return SIZE


# each runner makes one small generation of its method with the given extra call arguments
def freecustom(mp, family, **kw):
    s = _size(family)
    return mp("a circle and a square", references=REFS, num_inference_steps=STEPS, height=s, width=s,
              generator=gen(), **kw)


def magicface(mp, family, **kw):
    s = _size(family)
    return mp("a woman wearing a hat", references=REFS, ref_words=["woman", "hat"], inject_step=1,
              num_inference_steps=STEPS, height=s, width=s, generator=gen(), **kw)


def irdiffusion(mp, family, **kw):
    s = _size(family)
    subjects = [Subject("cat", REFS[0], region=(0, 0.25, 0.45, 0.75)), Subject("dog", REFS[1], region=(0.55, 0.25, 1, 0.75))]
    return mp("a cat and a dog", subjects=subjects, num_inference_steps=STEPS, height=s, width=s, generator=gen(),
              **kw)


def clora(mp, family, **kw):
    s = _size(family)
    return mp(["a cat and a dog", "a dog and a cat"], [None, None], [["cat", "cat"], ["dog", "dog"]], [[], ["dog"]],
              max_iter_to_alter=1, iterative_steps=(), num_inference_steps=STEPS, height=s, width=s, generator=gen(),
              **kw)


def primecomposer(mp, family, **kw):
    s = _size(family)
    return mp(image(1, s), image(2, s), box_mask(20, 30, 90, 100, size=s), location=(s // 4, s // 4, 3 * s // 4, 3 * s // 4),
              prompt="a cat", rca_words=["cat"], num_inference_steps=STEPS, height=s, width=s, generator=gen(), **kw)


def ditctrl(mp, family, **kw):
    return mp(["a cat walks", "a dog runs"], num_frames=9, num_inference_steps=STEPS, overlap=1,
              num_transition_blocks=1, kv_steps=(1, 3), generator=gen(), **kw)


METHODS = {
    "freecustom": (FreeCustomPipeline, freecustom, ("sd15", "sd21", "sdxl")),
    "magicface": (MagicFacePipeline, magicface, ("sd15", "sd21", "sdxl")),
    "irdiffusion": (IRDiffusionPipeline, irdiffusion, ("sd15", "sd21", "sdxl")),
    "clora": (CLoRAPipeline, clora, ("sd15", "sd21", "sdxl")),
    "primecomposer": (PrimeComposerPipeline, primecomposer, ("sd15", "sd21", "sdxl")),
    "ditctrl": (DiTCtrlPipeline, ditctrl, ("cogvideox",)),
}
CASES = [(m, f) for m, (_, _, fams) in METHODS.items() for f in fams]
CONFIGS = {"FreeCustomPipeline": FreeCustom, "MagicFacePipeline": MagicFace, "IRDiffusionPipeline": IRDiffusion,
           "CLoRAPipeline": CLoRA, "PrimeComposerPipeline": PrimeComposer, "DiTCtrlPipeline": DiTCtrl}


def output(out):
    """The images / frames of a pipeline output, whichever form it takes."""
    if isinstance(out, tuple):
        return out[0]
    return out.frames if hasattr(out, "frames") else out.images


def untouched(pipe):
    """A snapshot of what a method must leave as it found it on the base pipeline."""
    den = denoiser_of(pipe)
    return {"processors": dict(den.attn_processors), "pre": dict(den._forward_pre_hooks),
            "post": dict(den._forward_hooks), "scheduler": pipe.scheduler.config, "attrs": dict(vars(pipe))}


def assert_untouched(pipe, before):
    after = untouched(pipe)
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())  # the very same objects
    assert after["pre"] == before["pre"] and after["post"] == before["post"]  # no hook left on the denoiser
    assert after["scheduler"] is before["scheduler"]
    assert after["attrs"].keys() == before["attrs"].keys()
    assert all(after["attrs"][k] is v for k, v in before["attrs"].items())
    assert attnctrl.applied(pipe) == [] and Controller.of(pipe, create=False) is None


# -- from_pipe -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, family", CASES)
def test_from_pipe_is_a_diffusers_pipeline_of_the_method_sharing_the_components(method, family):
    cls = METHODS[method][0]
    pipe = tiny(family)
    before = untouched(pipe)
    mp = cls.from_pipe(pipe)
    assert isinstance(mp, cls) and isinstance(mp, DiffusionPipeline) and isinstance(mp, type(pipe))
    assert type(mp).__name__ == cls.__name__.removesuffix("Pipeline") + type(pipe).__name__
    assert type(cls.from_pipe(pipe)) is type(mp)  # one class per (method, base class)
    assert mp.to("cpu") is mp and mp.to(torch.float32) is mp
    assert mp.components.keys() == pipe.components.keys()
    assert all(mp.components[k] is v for k, v in pipe.components.items())  # the same modules, no copies
    for derived in ("vae_scale_factor", "vae_scale_factor_spatial", "default_sample_size"):
        assert getattr(mp, derived, None) == getattr(pipe, derived, None)
    mp.set_progress_bar_config(disable=False)  # the method pipeline's own setting
    assert before["attrs"]["_progress_bar_config"] == {"disable": True}
    assert_untouched(pipe, before)


def test_from_pipe_of_another_method_pipeline_uses_its_base():
    pipe = tiny("sd15")
    fc = FreeCustomPipeline.from_pipe(pipe)
    freecustom(fc, "sd15", output_type="latent")
    mf = MagicFacePipeline.from_pipe(fc)
    assert type(mf).__name__ == "MagicFaceStableDiffusionPipeline" and not isinstance(mf, FreeCustomPipeline)
    assert all(mf.components[k] is v for k, v in pipe.components.items())
    assert not hasattr(mf, "last_run")  # the other method's results stay with it
    again = FreeCustomPipeline.from_pipe(mf)
    assert type(again) is type(fc) and again is not fc


def test_from_pipe_carries_settings_made_after_construction_and_keeps_shared_configs():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    base = tiny("sd15")
    components = {**base.components, "scheduler": DDIMScheduler.from_config(base.scheduler.config)}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.scheduler.register_to_config(steps_offset=0)  # an old config, which StableDiffusionPipeline.__init__ "fixes"
    offset_config = pipe.scheduler.config
    pipe.attnctrl_model_id = "tiny-sd15"
    pipe.default_sample_size = 12
    fc = FreeCustomPipeline.from_pipe(pipe)
    assert pipe.scheduler.config is offset_config and pipe.scheduler.config.steps_offset == 0  # left as it was
    assert fc.attnctrl_model_id == "tiny-sd15" and fc.default_sample_size == 12
    assert fc.config.requires_safety_checker is False


def test_unsupported_models_raise_before_any_work():
    for cls in (FreeCustomPipeline, MagicFacePipeline, IRDiffusionPipeline, CLoRAPipeline, PrimeComposerPipeline):
        with pytest.raises(UnsupportedModelError, match=f"{cls.__name__} supports SD 1.x/2.x and SDXL pipelines, "
                                                        f"not FluxPipeline \\(flux\\)"):
            cls.from_pipe(tiny("flux"))
        with pytest.raises(UnsupportedModelError, match="CogVideoXPipeline \\(cogvideox\\)"):
            cls.from_pipe(tiny("cogvideox"))
        with pytest.raises(UnsupportedModelError, match="diffusers pipeline"):
            cls.from_pipe(type("Holder", (), {"unet": tiny("sd15").unet})())
    with pytest.raises(UnsupportedModelError, match="DiTCtrlPipeline supports CogVideoX pipelines, not "
                                                    "StableDiffusionPipeline \\(sd\\)"):
        DiTCtrlPipeline.from_pipe(tiny("sd15"))
    with pytest.raises(TypeError, match="unexpected arguments: nonsense"):
        FreeCustomPipeline.from_pipe(tiny("sd15"), nonsense=1)


def test_save_pretrained_writes_the_base_pipeline(tmp_path):
    pipe = tiny("sd15")
    fc = FreeCustomPipeline.from_pipe(pipe)
    fc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(loaded("a cat", generator=gen(), **kw).images, pipe("a cat", generator=gen(), **kw).images)


# -- the call contract ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, family", CASES)
def test_callback_output_type_and_return_dict(method, family):
    cls, runner, _ = METHODS[method]
    pipe = tiny(family)
    before = untouched(pipe)
    mp = cls.from_pipe(pipe)
    seen = []

    def zero_last(p, step, timestep, kw):
        assert p is mp and set(kw) == {"latents"}
        seen.append(step)
        return {"latents": torch.zeros_like(kw["latents"])} if step == STEPS - 1 else kw

    latent = output(runner(mp, family, output_type="latent", callback_on_step_end=zero_last,
                           callback_on_step_end_tensor_inputs=["latents"]))
    assert seen == list(range(STEPS))  # once per denoising step, with the step index
    assert torch.is_tensor(latent) and latent.ndim == (5 if family == "cogvideox" else 4) and latent.shape[0] == 1
    assert torch.all(latent == 0)  # the latents the callback returns replace the loop's
    out = runner(mp, family, output_type="pt", return_dict=False)
    assert isinstance(out, tuple)
    pixels = out[0]
    assert torch.is_tensor(pixels) and pixels.shape[0] == 1 and 0 <= pixels.min() and pixels.max() <= 1
    if family == "cogvideox":
        assert pixels.shape[2] == 3  # (batch, frames, channels, h, w)
    else:
        assert pixels.shape[1:] == (3, _size(family), _size(family))
    assert_untouched(pipe, before)


@pytest.mark.parametrize("method, family", [(m, fams[0]) for m, (_, _, fams) in METHODS.items()])
def test_an_error_inside_the_loop_leaves_the_base_pipeline_as_it_was(method, family):
    cls, runner, _ = METHODS[method]
    pipe = tiny(family)
    before = untouched(pipe)

    def boom(p, step, timestep, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        runner(cls.from_pipe(pipe), family, output_type="latent", callback_on_step_end=boom)
    assert_untouched(pipe, before)


def test_one_image_per_call_and_unoffered_tensor_inputs_raise_before_any_work():
    pipe = tiny("sd15")
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for name in ("freecustom", "magicface", "irdiffusion", "clora", "primecomposer"):
            cls, runner, _ = METHODS[name]
            with pytest.raises(AttnCtrlError, match="one .* per call"):
                runner(cls.from_pipe(pipe), "sd15", num_images_per_prompt=2)
        for name in ("clora", "primecomposer"):
            cls, runner, _ = METHODS[name]
            with pytest.raises(AttnCtrlError, match="'prompt_embeds' not offered .* it offers 'latents'"):
                runner(cls.from_pipe(pipe), "sd15", callback_on_step_end=lambda *a: {},
                       callback_on_step_end_tensor_inputs=["prompt_embeds"])
    finally:
        hook.remove()
    assert calls == []
    dc = DiTCtrlPipeline.from_pipe(tiny("cogvideox"))
    with pytest.raises(AttnCtrlError, match="one long video per call"):
        ditctrl(dc, "cogvideox", num_videos_per_prompt=2)


def test_a_single_ditctrl_prompt_passes_the_callback_to_the_base_call():
    pipe = tiny("cogvideox")
    seen = []
    out = DiTCtrlPipeline.from_pipe(pipe)("a cat walks", num_frames=9, num_inference_steps=2, output_type="latent",
                                          generator=gen(), callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    base = pipe("a cat walks", num_frames=9, num_inference_steps=2, output_type="latent", generator=gen(),
                use_dynamic_cfg=True)  # DiTCtrl's default
    assert seen == [0, 1] and torch.equal(out.frames, base.frames)


# -- configs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline_name", list(CONFIGS))
def test_apply_refuses_a_pipeline_method_and_names_its_pipeline(pipeline_name):
    config = CONFIGS[pipeline_name]()
    pipe = tiny("cogvideox" if pipeline_name == "DiTCtrlPipeline" else "sd15")
    before = untouched(pipe)
    assert config.pipeline == pipeline_name and not isinstance(config, attnctrl.core.Plugin)
    with pytest.raises(NotAPluginError, match=f"use attnctrl.pipelines.{pipeline_name}.from_pipe\\(pipe\\)") as err:
        attnctrl.apply(pipe, config)
    assert isinstance(err.value, AttnCtrlError) and isinstance(err.value, TypeError)
    assert_untouched(pipe, before)


def test_plugins_are_plugins():
    for config in (AttentionMaps(), AgentAttention(), CLEAR()):
        assert isinstance(config, attnctrl.core.Plugin) and config.pipeline is None


# -- offloading ----------------------------------------------------------------------------------------------------

def test_model_cpu_offload():
    """``enable_model_cpu_offload`` is the base pipeline's: without an accelerator diffusers refuses it (here, a
    CPU-only torch); with ``device="cpu"`` its accelerate hooks run on the CPU and every loop gives the same result."""
    from attnctrl.models import tiny_pipeline

    if not (torch.cuda.is_available() or getattr(torch, "xpu", None) and torch.xpu.is_available()):
        with pytest.raises(RuntimeError, match="requires accelerator"):
            FreeCustomPipeline.from_pipe(tiny("sd15")).enable_model_cpu_offload()
    offloaded = tiny_pipeline("sd15")  # this test's own copy: the hooks go on its modules
    try:
        for name in ("freecustom", "clora", "primecomposer"):
            cls, runner, _ = METHODS[name]
            mp = cls.from_pipe(offloaded)
            mp.enable_model_cpu_offload(device="cpu")
            assert all(hasattr(m, "_hf_hook") for m in (offloaded.unet, offloaded.vae, offloaded.text_encoder))
            ours = output(runner(mp, "sd15", output_type="np"))
            plain = output(runner(cls.from_pipe(tiny("sd15")), "sd15", output_type="np"))
            np.testing.assert_array_equal(ours, plain)
            mp.remove_all_hooks()
    finally:
        offloaded.remove_all_hooks()


# -- bind ----------------------------------------------------------------------------------------------------------

def _passthrough(layer, ctl, state, config):
    return AttnCtrlProcessor(layer, ctl)


def test_bind_installs_for_one_call_and_the_controller_reads_the_calling_pipeline():
    pipe = tiny("sd15")
    before = untouched(pipe)
    fc = FreeCustomPipeline.from_pipe(pipe)
    state = MethodState()
    with attnctrl.apply(pipe, AttentionMaps(layers="down")) as maps:
        ctl = maps.controller
        assert ctl.pipe is pipe
        with bind(fc, FreeCustom(), state, _passthrough) as bound:
            assert ctl.pipe is fc  # CFG and step count come from the pipeline whose call runs
            assert bound.config == FreeCustom() and bound.state is state and attnctrl.applied(pipe) == [maps, bound]
            assert {la.name for la in bound.layers} == {la.name for la in FreeCustom().select_layers(ctl)}
            with pytest.raises(LayerConflictError, match="FreeCustom and FreeCustom"):  # never stacks or replaces
                bind(pipe, FreeCustom(), MethodState(), _passthrough)
            with pytest.raises(LayerConflictError, match="AttentionMaps and AttentionMaps"):
                bind(fc, AttentionMaps(layers="down"))  # a plugin bound for a call does not replace the user's
            assert attnctrl.applied(pipe) == [maps, bound]
        assert ctl.pipe is pipe and attnctrl.applied(pipe) == [maps]
    with pytest.raises(NotAPluginError, match="config without processors"):
        attnctrl.apply(pipe, attnctrl.core.Method())
    with pytest.raises(TypeError):
        bind(pipe, FreeCustom(), state)  # a state needs its processor factory
    assert_untouched(pipe, before)


def test_a_plugin_on_the_base_pipeline_composes_with_a_method_call():
    """AgentAttention on the encoder's first level of the base pipeline, FreeCustom on the decoder of a method
    pipeline built from it: the plugin's processors read the method pipeline's CFG layout during its call."""
    pipe = tiny("sd15")
    plain = output(freecustom(FreeCustomPipeline.from_pipe(pipe), "sd15", output_type="np"))
    with attnctrl.apply(pipe, AgentAttention(layers="down.0", ratio=0.0)) as agent:  # ratio 0: the identity
        out = output(freecustom(FreeCustomPipeline.from_pipe(pipe), "sd15", output_type="np"))
        assert attnctrl.applied(pipe) == [agent] and agent.controller.pipe is pipe
    np.testing.assert_allclose(out, plain, atol=1e-5)


def test_a_ready_config_is_taken_as_is_and_not_with_option_keywords():
    """The run layer hands a method pipeline the config it validated (config=), never rebuilt from its fields."""
    import pytest

    from attnctrl.core import AttnCtrlError
    from attnctrl.methods import CLoRA, FreeCustom
    from attnctrl.pipelines.base import call_config

    config = FreeCustom(mask_weights=2.0)
    assert call_config(FreeCustom, config, {}) is config
    assert call_config(FreeCustom, None, {"mask_weights": 2.0}) == config
    with pytest.raises(AttnCtrlError, match="not both"):
        call_config(FreeCustom, config, {"mask_weights": 3.0})
    with pytest.raises(AttnCtrlError, match="must be a FreeCustom, not a CLoRA"):
        call_config(FreeCustom, CLoRA(), {})
