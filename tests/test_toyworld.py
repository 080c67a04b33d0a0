"""Toyworld: deterministic generator, a checker that scores ground truth, the tokenizer, the trainer's wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toyworld

from attnctrl.models.toyworld import (
    HELD_OUT,
    PLACEHOLDERS,
    VOCABULARY,
    CaptionError,
    make_scene,
    parse_caption,
    render,
    score,
)
from attnctrl.models.toyworld.bench import benchmark_captions
from attnctrl.models.toyworld.tokenizer import toy_tokenizer


def test_generator_is_deterministic_by_seed():
    a, b, c = make_scene(11), make_scene(11), make_scene(12)
    assert a.caption == b.caption and a.caption != c.caption
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert render(a).size == (64, 64) and render(a, size=128).size == (128, 128)


def test_training_scenes_never_use_held_out_combinations_or_placeholders():
    for seed in range(2000):
        scene = make_scene(seed)
        assert all((o.colour, o.shape) not in HELD_OUT for o in scene.objects)
        assert not any(p in scene.caption.split() for p in PLACEHOLDERS)
        assert 1 <= len(scene.objects) <= 3


def test_look_alike_scenes_share_one_look_and_name_it_at_most_once():
    from attnctrl.models.toyworld import COLOURS, PATTERNS

    named_none = 0
    for seed in range(500):
        scene = make_scene(seed, look_alike=True)
        assert 1 <= len(scene.objects) <= 3
        assert len({(o.colour, o.pattern) for o in scene.objects}) == 1
        assert all((o.colour, o.shape) not in HELD_OUT for o in scene.objects)
        words = scene.caption.split()
        colours = [w for w in words if w in COLOURS]
        assert len(colours) <= 1 and all(w in ("plain", scene.objects[0].pattern) for w in words if w in PATTERNS)
        assert sum(o.look_said for o in scene.objects) == len(colours)
        named_none += not colours
    assert 325 < named_none < 425  # three quarters name no look at all


def test_checker_scores_ground_truth_at_98_percent_or_more():
    objects = images = ok_images = 0
    right = {"colour": 0, "shape": 0, "side": 0, "pattern": 0}
    for seed in range(300):
        scene = make_scene(seed, held_out=True)
        result = score(render(scene), scene.caption)
        images += 1
        ok_images += result["all"]
        for obj in result["objects"]:
            objects += 1
            for k in right:
                right[k] += obj[k]
    assert all(v / objects >= 0.98 for v in right.values()), right
    assert ok_images / images >= 0.98


def test_checker_sees_mistakes():
    scene = make_scene(5, n_objects=1)
    obj = scene.objects[0]
    wrong_colour = next(c for c in ("red", "blue") if c != obj.colour)
    result = score(render(scene), scene.caption.replace(obj.colour, wrong_colour))
    assert not result["objects"][0]["colour"] and not result["all"]
    blank = np.full((64, 64, 3), 230, np.uint8)
    result = score(blank, "a red circle on the left")
    assert result["objects"][0]["found"] is False and not result["all"]


def test_parse_caption():
    assert parse_caption("a striped blue square on the right and a red circle") == [
        {"colour": "blue", "shape": "square", "pattern": "striped", "side": "right"},
        {"colour": "red", "shape": "circle", "pattern": "plain", "side": None},
    ]
    with pytest.raises(CaptionError):
        parse_caption("a photo of a cat")


def test_tokenizer_has_one_token_per_word():
    tok = toy_tokenizer()
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    ids = tok("a red circle on the left").input_ids
    assert len(ids) == 8 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.model_max_length == 32
    assert len(tok("a dog", add_special_tokens=False).input_ids) > 2  # unknown words fall back to bytes


def test_benchmark_captions_are_fixed_and_held_out():
    sets = benchmark_captions()
    assert len(sets["single"]) == 32 and len(sets["two"]) == 64
    assert sets == benchmark_captions()
    for caption in sets["single"] + sets["two"]:
        assert all((o["colour"], o["shape"]) in HELD_OUT for o in parse_caption(caption))
        assert all(o["side"] is not None for o in parse_caption(caption))


def test_trainer_wiring_resume_and_saved_folder(tmp_path):
    from attnctrl import load_pipeline
    from attnctrl.models.toyworld.train import train

    small = dict(pool_size=64, batch=4, vae_batch=4, vae_minutes=0.05)  # small steps: robust on a busy machine
    out = train(tmp_path, minutes=0.12, final_eval=False, log=lambda m: None, grounding_weight=0.1,
                look_alike_fraction=0.5, reference_fraction=0.5, **small)
    with pytest.raises(FileExistsError):
        train(tmp_path, minutes=0.12, log=lambda m: None, **small)
    out = train(tmp_path, minutes=0.25, resume=True, final_eval=False, log=lambda m: None)
    assert load_pipeline(str(out)).scheduler.config.beta_end == 0.02  # the recipe's schedule
    with pytest.raises(ValueError, match="architecture"):
        train(tmp_path, minutes=0.3, resume=True, log=lambda m: None, unet_channels=(32, 64))
    # a resumed run keeps its settings; an explicit override (a new noise schedule) is saved with the model
    out = train(tmp_path, minutes=0.3, resume=True, final_eval=False, log=lambda m: None, beta_end=0.015)
    pipe = load_pipeline(str(out))
    assert pipe.scheduler.config.beta_end == 0.015 and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.attnctrl_defaults["num_inference_steps"] == 25
    image = pipe("a red circle on the left", num_inference_steps=2).images[0]
    assert image.size == (64, 64)
    # the saved UNet is the checkpoint's EMA UNet (diffusers' EMAModel, written back before saving), not the live one
    from safetensors.torch import load_file

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] > 0 and state["config"]["reference_fraction"] == 0.5 and state["config"]["grounding_weight"]
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v.half()) for k, v in state["ema_unet"].items())
    assert any(not torch.equal(state["ema_unet"][k], v) for k, v in state["unet"].items())
    # migration: a checkpoint saved before beta_end and x0_weight_floor existed resumes with the settings it had
    older = tmp_path / "older"
    older.mkdir()
    del state["config"]["beta_end"], state["config"]["x0_weight_floor"]
    torch.save(state, older / "checkpoint.pt")
    (older / "pool.pt").write_bytes((tmp_path / "pool.pt").read_bytes())
    out = train(older, minutes=state["elapsed"] / 60, resume=True, final_eval=False, log=lambda m: None)
    config = json.loads((out / "attnctrl.json").read_text())["config"]
    assert config["beta_end"] == 0.012 and config["x0_weight_floor"] == 0.0
    assert load_pipeline(str(out)).scheduler.config.beta_end == 0.012


def test_flux_trainer_wiring_resume_and_saved_folder(tmp_path):
    """--arch flux: the same trainer builds, checkpoints and resumes the FLUX variant and saves a FluxPipeline folder
    that load_pipeline loads and that draws 128 px images."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from attnctrl import load_pipeline
    from attnctrl.cli.main import cli
    from attnctrl.models.toyworld.flux import CheckerView, flow_scheduler, flow_shift
    from attnctrl.models.toyworld.train import train

    quiet = dict(log=lambda m: None, final_eval=False)
    tiny = dict(pool_size=16, batch=2, flux_blocks=(1, 1), flux_heads=2, flux_head_dim=16)  # seconds, not hours
    train(tmp_path, minutes=0.02, arch="flux", **quiet, **tiny)
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert first["config"]["arch"] == "flux" and first["config"]["init"] == "toyworld" and first["step"] > 0
    assert first["keep_scaling"] is False and first["latents"][0].shape[1:] == (4, 32, 32)  # 128 px scenes
    with pytest.raises(ValueError, match="keeps its architecture"):
        train(tmp_path, minutes=0.05, resume=True, arch="sd", **quiet)
    # the run's own architecture; a budget past the first run's time, however long its steps took on this machine
    out = train(tmp_path, minutes=first["elapsed"] / 60 + 0.01, resume=True, **quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] > first["step"] and state["shift"] == first["shift"]

    pipe = load_pipeline(str(out))
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer.config.num_single_layers == 1
    assert pipe.vae.config.shift_factor == pytest.approx(state["shift"])
    assert pipe.vae.config.scaling_factor == pytest.approx(state["scaling"])
    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")  # the EMA weights, fp16
    assert all(torch.equal(saved[k], v.half()) for k, v in state["ema_transformer"].items())
    settings = pipe.attnctrl_defaults
    assert (settings["height"], settings["num_inference_steps"], settings["max_sequence_length"]) == (128, 25, 32)
    kw = dict(num_inference_steps=2, true_cfg_scale=settings["true_cfg_scale"], negative_prompt="", height=128,
              width=128, max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0))
    image = pipe("a red circle on the left", **kw).images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()
    assert all(len(pipe.tokenizer_2(w, add_special_tokens=False).input_ids) == 1 for w in VOCABULARY)
    assert CheckerView(pipe)(["a red circle"], num_inference_steps=1).images[0].size == (64, 64)  # for the checker
    # the sampler shifts its sigmas by e^0.5 at the model's 256 tokens (training samples them unshifted)
    sampler = flow_scheduler()
    sampler.set_timesteps(sigmas=[0.5], mu=0.5)
    shift = flow_shift(sampler, 256)
    assert shift == pytest.approx(np.exp(0.5)) and float(sampler.sigmas[0]) == pytest.approx(shift / (1 + shift))
    # a flux folder as --init is fine-tuned whole: its architecture and latent normalisation are kept
    tuned = train(tmp_path / "ft", minutes=0.01, arch="flux", init=str(out), pool_size=16, batch=2, **quiet)
    config = json.loads((tuned / "attnctrl.json").read_text())["config"]
    assert config["flux_blocks"] == [1, 1] and config["flux_head_dim"] == 16 and config["vae_minutes"] == 0
    assert load_pipeline(str(tuned)).vae.config.shift_factor == pytest.approx(state["shift"])

    # the command line: --arch, and the UNet-only options refused before anything is written
    result = CliRunner().invoke(cli, ["train-toy", "-o", str(tmp_path / "g"), "--arch", "flux", "--grounding", "0.1"])
    assert result.exit_code == 1 and "UNet" in result.output and not (tmp_path / "g").exists()
    result = CliRunner().invoke(cli, ["train-toy", "-o", str(tmp_path / "g"), "--arch", "dit"])
    assert result.exit_code == 2 and "Invalid value" in result.output


def test_video_trainer_wiring_resume_and_saved_folder(tmp_path):
    """--arch video: the same trainer draws a clip pool, trains the 3D VAE, then the CogVideoX transformer and T5,
    checkpoints and resumes, and saves a CogVideoXPipeline folder that load_pipeline loads and that makes 17-frame
    clips; flipped clips swap "moving left" and "moving right"."""
    from safetensors.torch import load_file

    from attnctrl import load_pipeline
    from attnctrl.models.toyworld.data import sample_latents, swap_sides
    from attnctrl.models.toyworld.train import train
    from attnctrl.models.toyworld.video import VIDEO_FRAMES, video_tokenizer

    quiet = dict(log=lambda m: None, final_eval=False)
    with pytest.raises(ValueError, match="from scratch"):
        train(tmp_path / "x", minutes=0.1, arch="video", init="toyworld", **quiet)
    train(tmp_path, minutes=0.02, arch="video", pool_size=4, batch=2, vae_batch=1, vae_minutes=0.01, video_layers=1,
          **quiet)
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert first["config"]["arch"] == "video" and first["config"]["pool_size"] == 4 and first["vae_step"] > 0
    assert torch.load(tmp_path / "pool.pt")["frames"].shape == (4, VIDEO_FRAMES, 64, 64, 3)
    # resumed past the VAE: the pool's latents are 5 latent frames of 16x16 (17 frames, 4x in time and space)
    out = train(tmp_path, minutes=first["elapsed"] / 60 + 0.02, resume=True, **quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] > 0 and state["latents"][0].shape == (4, 16, 5, 16, 16)
    flip = torch.tensor([True, False])
    latents = sample_latents(*state["latents"], 1.0, torch.tensor([0, 0]), flip, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 16, 5, 16, 16)
    assert swap_sides("a red circle moving left") == "a red circle moving right"

    pipe = load_pipeline(str(out))
    assert type(pipe).__name__ == "CogVideoXPipeline" and pipe.transformer.config.num_layers == 1
    assert pipe.vae.config.scaling_factor == pytest.approx(state["scaling"])
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")  # the EMA weights, fp16
    assert all(torch.equal(saved[k], v.half()) for k, v in state["ema_transformer"].items())
    settings = pipe.attnctrl_defaults
    assert (settings["num_frames"], settings["height"], settings["max_sequence_length"]) == (VIDEO_FRAMES, 64, 32)
    video = pipe("a red circle moving right", num_frames=VIDEO_FRAMES, height=64, width=64, num_inference_steps=2,
                 max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, VIDEO_FRAMES, 64, 64, 3) and np.isfinite(video).all()
    tokenizer = video_tokenizer()
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in ("moving", "still", "turning"))


def test_grounding_targets_recorder_and_loss():
    """TokenCompose's token term: targets name each object's words and silhouette; the recorder changes nothing;
    a map that puts a word's mass inside its object scores 1, a uniform map its area fraction."""
    from attnctrl.models.toyworld.attention import record_cross_attention
    from attnctrl.models.toyworld.data import grounding_targets
    from attnctrl.models.toyworld.losses import grounding_terms

    scene = make_scene(4)  # "a green star on the left and a orange star in the middle and a pink cross on the right"
    masks, words = grounding_targets(scene)
    tok = toy_tokenizer()
    ids = tok(scene.caption).input_ids
    assert [tok.decode([ids[j]]) for j in words[2].tolist() if j >= 0] == ["pink", "cross"]
    assert words[0, 2:].tolist() == [-1, -1]
    cols = masks[2].float().sum(0).nonzero().flatten()
    assert cols.min() > 9 and masks[0].float().sum(0).nonzero().max() < 6  # the cross on the right, the star left
    masks = masks[None].float() / 255
    words = words[None].long()
    q = 64
    uniform = torch.full((1, q, 32), 1 / 32)
    inside, _ = grounding_terms([uniform], masks, words)
    area = torch.nn.functional.adaptive_avg_pool2d(masks, 8).flatten(2).mean(-1)[0]
    assert torch.allclose(inside, area.repeat_interleave(2), atol=1e-6)
    peaked, best = torch.zeros(1, q, 32), []
    for o in range(3):  # each word's mass on its object's best-covered cell: inside = that cell's coverage
        cover = torch.nn.functional.adaptive_avg_pool2d(masks[:, o], 8).flatten(1)[0]
        best += [cover.max()] * 2
        for j in words[0, o].tolist():
            if j >= 0:
                peaked[0, cover.argmax(), j] = 0.5
    inside, pixel_peaked = grounding_terms([peaked], masks, words)
    assert torch.allclose(inside, torch.stack(best)) and min(best) > 0.4
    assert grounding_terms([uniform, torch.rand(1, 4, 32)], masks, words)[0].shape == (12,)  # 2x2 layers too
    # the pixel term: a map equal to the coverage (scaled) beats one cell of it, which beats a uniform map
    filled = torch.zeros(1, q, 32)
    for o in range(3):
        cover = torch.nn.functional.adaptive_avg_pool2d(masks[:, o], 8).flatten(1)[0]
        filled[0, :, words[0, o, :2]] = (cover / cover.sum())[:, None]
    pixel_filled = grounding_terms([filled], masks, words)[1]
    pixel_uniform = grounding_terms([uniform], masks, words)[1]
    assert (pixel_filled < pixel_peaked).all() and (pixel_peaked < pixel_uniform).all()

    unet = toyworld().unet
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 32, 128)
    before = unet.attn_processors
    reference = unet(x, t, ctx).sample
    recorder = record_cross_attention(unet)
    assert set(recorder.processors) == {n for n in before if n.endswith("attn2.processor")}
    assert torch.equal(unet(x, t, ctx).sample, reference)  # not recording: the stock attention
    recorder.state.maps = []
    out = unet(x, t, ctx).sample
    assert torch.equal(out, reference)  # recording changes nothing either (CLoRA's recorder: the stock output)
    assert len(recorder.state.maps) == sum(n.endswith("attn2.processor") for n in before)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in recorder.state.maps)
    assert {m.shape[1] for m in recorder.state.maps} == {256, 64, 16, 4}  # 16x16 down to the 2x2 mid block
    recorder.remove()
    assert unet.attn_processors == before


def test_reference_attention_is_mrsa_in_the_decoder_and_plain_elsewhere():
    """Reference training's processor: no plan or no reference = the stock attention; a reference changes its target
    only; an empty mask is -inf on all its keys (= no reference); reference rows attend to themselves only."""
    from attnctrl.core import describe
    from attnctrl.models.toyworld.attention import ReferenceAttnProcessor, reference_attention

    unet = toyworld().unet
    x, t, ctx = torch.randn(3, 4, 16, 16), torch.tensor([500] * 3), torch.randn(3, 32, 128)
    before = unet.attn_processors
    with torch.no_grad():
        plain = unet(x, t, ctx).sample
        references = reference_attention(unet)
        chosen = {la.name for la in describe(unet).select("decoder-high-res") if la.kind == "self"}
        assert 0 < len(chosen) < len(before) // 2 and set(references.processors) == chosen
        assert all(isinstance(unet.attn_processors[n], ReferenceAttnProcessor) for n in chosen)
        assert torch.equal(unet(x, t, ctx).sample, plain)

        def run(slots, mask):
            references.state.plan = {"slots": torch.tensor(slots), "weights": torch.full((2, 2), 3.0), "masks": mask}
            return unet(x, t, ctx).sample

        full, empty = torch.ones(1, 16, 16), torch.zeros(1, 16, 16)
        assert torch.allclose(run([[-1, -1], [-1, -1]], full), plain, atol=1e-5)
        out = run([[0, -1], [-1, -1]], full)
        assert (out[0] - plain[0]).abs().max() > 0.05
        assert torch.allclose(out[1], plain[1], atol=1e-5) and torch.equal(out[2], plain[2])
        assert torch.allclose(run([[0, -1], [-1, -1]], empty), plain, atol=1e-5)
    references.state.plan = None
    references.remove()
    assert unet.attn_processors == before


def test_reference_training_draws_same_look_references_and_drops_their_look_words(tmp_path):
    from functools import partial

    from attnctrl.models.toyworld.data import ScenePool, drop_looks, sample_latents

    pool = ScenePool.load_or_build(tmp_path / "pool.pt", 512, look_alike_fraction=0.3, log=lambda m: None)
    pool.index_looks()
    zeros = torch.zeros(512, 4, 16, 16, dtype=torch.half)
    latents = partial(sample_latents, zeros, zeros, 1.0)
    gen = torch.Generator().manual_seed(0)
    drawn = 0
    for _ in range(8):
        idx = torch.randint(0, 512, (16,), generator=gen)
        captions = [pool.captions[i] for i in idx.tolist()]
        refs = pool.references(idx, captions, gen, 0.5, latents)
        if refs is None:
            continue
        slots = refs["slots"]
        assert (slots[8:] < 0).all() and refs["latents"].shape[0] == len(refs["captions"]) == (slots >= 0).sum()
        assert torch.equal(idx[refs["owner"]], idx[(slots >= 0).nonzero()[:, 0]])
        dropped = {}
        for (b, s), (j, o, k) in zip((slots >= 0).nonzero().tolist(), refs["sources"]):
            i = int(idx[b])
            assert j != i and pool.looks[j][o] == pool.looks[i][k]  # same colour, shape and pattern
            assert 0 <= refs["weights"][b, s] <= 3
            mask = refs["masks"][slots[b, s]]
            assert mask.max() > 0.5 and mask.min() >= 0 and mask.max() <= 1  # coverage: the processor keeps > 0.5
            dropped.setdefault(b, []).extend(pool.words[i, k].tolist())
            drawn += 1
        for b in range(16):  # exactly the referenced objects' colour and pattern words are gone
            original = pool.captions[int(idx[b])]
            assert captions[b] == (drop_looks(original, dropped[b]) if b in dropped else original)
    assert drawn > 20
    assert drop_looks("a small striped green star on the left and a red square", [2, 3, 4, 5]) == \
        "a small star on the left and a red square"


def test_training_time_leaves_out_time_the_process_spent_stopped():
    """A step during which the process was stopped and continued (SIGCONT) counts as long as the step before it."""
    import os
    import signal
    import time

    from attnctrl.models.toyworld.train import _continues_counted, _StepClock

    if not hasattr(signal, "SIGCONT"):
        pytest.skip("no SIGCONT on this platform")
    clock = _StepClock()
    before = signal.getsignal(signal.SIGCONT)
    with _continues_counted(clock):
        clock.start()
        time.sleep(0.02)
        first = clock.seconds()
        clock.start()
        os.kill(os.getpid(), signal.SIGCONT)  # as after a SIGSTOP; continuing a running process changes nothing else
        time.sleep(0.3)
        assert clock.seconds() == first < 0.3
        clock.start()
        time.sleep(0.05)
        assert clock.seconds() >= 0.05  # later steps count by the clock again
    assert signal.getsignal(signal.SIGCONT) == before


def test_ema_is_diffusers_emamodel_with_the_decay_of_the_runs():
    """The trainer's EMA (diffusers' EMAModel) decays by min(0.999, (1 + n) / (10 + n)) at optimiser step n, as the
    hand-written EMA the shipped model was trained with, also when a run resumes at step n; and it updates as
    ``ema.lerp_(live, 1 - decay)`` did."""
    from attnctrl.models.toyworld.train import _ema

    live = [torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(3, 5))]
    for start in (0, 700, 20_000):
        shadow = [p.detach().clone() for p in live]
        ema, by_hand = _ema(shadow, 0.999, start), [p.detach().clone() for p in live]
        for n in range(start + 1, start + 40):
            with torch.no_grad():
                for p in live:
                    p.add_(torch.randn(p.shape), alpha=0.1)
            ema.step(live)
            decay = min(0.999, (1 + n) / (10 + n))
            assert ema.cur_decay_value == decay and ema.optimization_step == n
            for e, p in zip(by_hand, live):
                e.lerp_(p.detach(), 1 - decay)
        target = [p.detach().clone() for p in live]
        ema.copy_to(target)
        for a, b in zip(target, by_hand):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_grounding_refuses_a_pool_built_without_object_masks(tmp_path):
    from attnctrl.models.toyworld.train import train

    torch.save({"images": torch.zeros(4, 64, 64, 3, dtype=torch.uint8), "captions": ["a red circle"] * 4},
               tmp_path / "pool.pt")  # a pool saved before the grounding targets existed
    with pytest.raises(ValueError, match="without object masks"):
        train(tmp_path, minutes=0.1, vae_minutes=0.05, pool_size=4, grounding_weight=0.1, log=lambda m: None)


def test_loss_weights_keep_the_clean_image_error_weighted_at_high_noise():
    from attnctrl.models.toyworld.architecture import noise_scheduler
    from attnctrl.models.toyworld.losses import min_snr_weights

    sch = noise_scheduler()
    snr = sch.alphas_cumprod / (1 - sch.alphas_cumprod)
    plain, floored = min_snr_weights(sch, 5.0), min_snr_weights(sch, 5.0, floor=0.1)
    torch.testing.assert_close(plain * snr, torch.clamp(snr, max=5.0))  # min-SNR: clean-image weight min(SNR, 5)
    torch.testing.assert_close(floored * snr, torch.clamp(snr, 0.1, 5.0))
    assert torch.equal(plain[snr >= 0.1], floored[snr >= 0.1]) and floored[999] > 400 * plain[999]


def test_fine_tuning_from_a_saved_folder_keeps_its_vae_and_schedule(tmp_path):
    from safetensors.torch import load_file

    from attnctrl import load_pipeline
    from attnctrl.models import toyworld_path
    from attnctrl.models.toyworld.train import train

    out = train(tmp_path / "ft", minutes=0.1, init="toyworld", pool_size=64, batch=2, final_eval=False,
                log=lambda m: None)
    shipped = toyworld_path()
    for name in ("vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        a, b = shipped / name, out / name
        if name.endswith(".safetensors"):
            sa, sb = load_file(a), load_file(b)
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        else:
            assert json.loads(a.read_text())["beta_end"] == json.loads(b.read_text())["beta_end"]
    pipe = load_pipeline(str(out))
    assert pipe.vae.config.scaling_factor == toyworld().vae.config.scaling_factor
    config = json.loads((out / "attnctrl.json").read_text())["config"]
    assert config["init"] == "toyworld" and config["x0_weight_floor"] == 0.1
    with pytest.raises(ValueError, match="starting point"):
        train(tmp_path / "ft", minutes=0.05, resume=True, init="toyworld", log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="not a toyworld model folder"):
        train(tmp_path / "other", minutes=0.05, init=str(tmp_path), log=lambda m: None)


def test_shipped_model_is_the_offline_default(monkeypatch):
    import attnctrl
    from attnctrl.models import DEFAULT_MODEL, recommended_settings, toyworld_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert DEFAULT_MODEL == "toyworld"
    files = [p for p in toyworld_path().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    pipe = attnctrl.load_pipeline()  # the default, from inside the package
    assert recommended_settings(pipe)["height"] == 64
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle on the left", "a red circle on the left"], num_inference_steps=2, output_type="np",
               generator=[torch.Generator().manual_seed(0) for _ in range(2)])
    assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()
    np.testing.assert_array_equal(out.images[0], out.images[1])
    tok = pipe.tokenizer
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in ("red", "circle", "sks"))


def test_concept_scenes_name_the_concept_by_its_placeholder_and_class_noun_only():
    from attnctrl.models.toyworld.lora import concept_scene

    for seed in range(50):
        scene = concept_scene(np.random.default_rng(seed), "sks", ("blue", "square", "dotted"))
        assert "sks square" in scene.caption and "dotted blue square" not in scene.caption
        assert sum((o.colour, o.shape, o.pattern) == ("blue", "square", "dotted") for o in scene.objects) == 1
        assert score(render(scene), scene.caption.replace("sks square", "dotted blue square"))["all"]
    again = concept_scene(np.random.default_rng(3), "sks", ("blue", "square", "dotted"))
    assert again.caption == concept_scene(np.random.default_rng(3), "sks", ("blue", "square", "dotted")).caption


def test_concept_lora_trains_saves_and_loads_through_the_public_path(tmp_path):
    from attnctrl.models.toyworld.lora import train_concept_lora

    pipe = toyworld()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for taken in ("red", "left", "not-a-word"):
        with pytest.raises(ValueError, match="placeholder"):
            train_concept_lora(pipe, taken, ("blue", "square", "dotted"), tmp_path / "x.safetensors", steps=1)
    assert not (tmp_path / "x.safetensors").exists()
    with torch.enable_grad():
        path = train_concept_lora(pipe, "sks", ("blue", "square", "dotted"), tmp_path / "sks.safetensors", steps=2,
                                  batch=2, log=lambda m: None)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # untouched
    kw = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    plain = pipe("a sks square", **kw).images
    pipe.load_lora_weights(str(path), adapter_name="sks")
    try:
        tuned = pipe("a sks square", **{**kw, "generator": torch.Generator().manual_seed(0)}).images
    finally:
        pipe.delete_adapters("sks")
    assert np.abs(plain - tuned).max() > 1e-4  # trained B != 0: the LoRA changes the output


def test_train_toy_refuses_a_vae_budget_that_leaves_the_unet_no_time(tmp_path):
    from click.testing import CliRunner

    from attnctrl.cli.main import cli

    for args in (["--minutes", "5"], ["--minutes", "5", "--vae-minutes", "6"]):  # the recipe's VAE takes 20
        result = CliRunner().invoke(cli, ["train-toy", "-o", str(tmp_path / "run"), *args])
        assert result.exit_code == 1 and "fewer than" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()  # nothing written
    result = CliRunner().invoke(cli, ["train-toy", "-o", str(tmp_path / "run"), "--resume", "--seed", "3"])
    assert result.exit_code == 1 and "keeps its own --seed" in result.output and not (tmp_path / "run").exists()
    result = CliRunner().invoke(cli, ["train-toy", "-o", str(tmp_path / "run"), "--resume", "--look-alike", "0.3"])
    assert result.exit_code == 1 and "keeps its own --look-alike" in result.output  # the pool is the run's
    for bad in (["--look-alike", "1.5"], ["--grounding", "-1"], ["--references", "2"]):
        result = CliRunner().invoke(cli, ["train-toy", "-o", str(tmp_path / "run"), *bad])
        assert result.exit_code == 2 and "Invalid value" in result.output and not (tmp_path / "run").exists()


def test_clora_example_job_uses_the_64px_settings():
    from attnctrl.models.toyworld.lora import CLORA_SETTINGS

    job = json.loads((Path(__file__).resolve().parents[1] / "attnctrl" / "assets" / "jobs" / "clora.jsonl").read_text())
    assert job["options"] == CLORA_SETTINGS  # the job spells out the settings the benchmark and the app use


def test_texture_energies_ignore_the_phase_of_a_pattern_but_not_the_pattern():
    from attnctrl.models.toyworld.decoder import decoder_loss, texture_energies

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def stripes(shift):
        return (((xx + yy + shift) % 6) < 2.6).float().expand(1, 3, 64, 64) * 2 - 1

    def gap(a, b):
        return sum(float((p - q).abs().mean()) for p, q in zip(texture_energies(a), texture_energies(b)))

    plain, dots = torch.zeros(1, 3, 64, 64), (((xx % 6 - 3) ** 2 + (yy % 6 - 3) ** 2) < 1.6**2).float()
    assert gap(stripes(0), stripes(3)) < 0.05 * gap(stripes(0), plain)  # another phase: nearly the same energy
    assert gap(stripes(0), dots.expand(1, 3, 64, 64) * 2 - 1) > 0.2 * gap(stripes(0), plain)  # dots differ
    loss, parts = decoder_loss(stripes(3), stripes(0))
    assert parts["texture"] < 0.05 * decoder_loss(plain, stripes(0))[1]["texture"] and loss.item() > 0


def test_decoder_fine_tune_changes_only_the_decoder(tmp_path):
    from safetensors.torch import load_file

    from attnctrl.models.loading import model_folder
    from attnctrl.models.toyworld.decoder import finetune_decoder

    out = finetune_decoder("toyworld", tmp_path / "m", minutes=5, pool_size=8, batch=4, max_steps=2, log=lambda s: None)
    src = model_folder("toyworld")
    old, new = (load_file(next((f / "vae").glob("*.safetensors"))) for f in (src, out))
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    for part in ("unet", "text_encoder"):
        a, b = (load_file(next((f / part).glob("*.safetensors"))) for f in (src, out))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "attnctrl.json").read_text())["decoder_finetunes"][-1]["steps"] == 2
    with pytest.raises(FileExistsError):
        finetune_decoder("toyworld", out, max_steps=1, pool_size=2)


def test_shipped_examples_are_what_the_generator_draws(tmp_path):
    """``assets/examples`` is regenerated by ``python -m attnctrl.models.toyworld.examples``: same index, same pixels."""
    from PIL import Image

    from attnctrl.models.toyworld.examples import SHIPPED, write_examples

    index = write_examples(tmp_path)
    assert json.loads((SHIPPED / "examples.json").read_text()) == index
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(drawn) == 2 * (len(index) - 1) + 1  # image + mask per reference, one composition background
    for name in drawn:
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(SHIPPED / name))), name
