"""The video variant of toyworld (``attnctrl train-toy --arch video``): toyworld-video, a CogVideoX-architecture model
of the moving-shapes world (:mod:`.motion`). Networks, tokenizer, clip pool, v-prediction loss, the saved
``CogVideoXPipeline`` folder and the video checker's evaluation; the loop that trains it is :mod:`.train`'s.

Only standard diffusers/transformers classes, as a real CogVideoX checkpoint has them:

* ``AutoencoderKLCogVideoX``: its own tiny 3D causal VAE (channels :data:`VAE_CHANNELS`, three blocks: 4x in space,
  4x in time; :data:`LATENT_CHANNELS` latent channels), trained first (the VAE phase);
* ``T5EncoderModel`` (:func:`~.flux.t5_encoder`, d_model 128) with the toyworld T5 tokenizer over
  :data:`~.motion.VIDEO_VOCABULARY` (one token per word), CogVideoX's only text encoder;
* ``CogVideoXTransformer3DModel``: :data:`VIDEO_LAYERS` blocks of :data:`VIDEO_HEADS` heads of
  :data:`VIDEO_HEAD_DIM`, 2x2 patches, 3D RoPE (CogVideoX-5B style, ``use_rotary_positional_embeddings``),
  adaLN-Zero initialisation (every block starts as the identity);
* ``CogVideoXDDIMScheduler``: v-prediction, zero terminal SNR, trailing spacing, as CogVideoX ships it, without the
  SNR shift (``snr_shift_scale=1``: the shift of 3 moves CogVideoX-2B's 480x720 training toward noise; at 64 px the
  image is decided earlier, the lesson of toyworld-flux, whose shifted sigmas left shape near chance).

Geometry. :data:`VIDEO_FRAMES` = 17 frames of 64 px: the VAE encodes 17 frames into 5 latent frames of 16x16 (its
first latent frame is the first pixel frame, each further one four frames) and the 2x2 patches make 5 x 8 x 8 = 320
video tokens, after CogVideoX's 32 text tokens. The frame count is 8k + 1 (9, 17, 25, ...), not any 4k + 1: diffusers'
CogVideoX decoder decodes latent frames in batches of two after a first batch of three, so 4 latent frames (13 pixel
frames) decode to 16 frames. Objective: CogVideoX's, v-prediction MSE at uniform timesteps, 10 % caption dropout for
classifier-free guidance, half of it as the empty caption (diffusers' CogVideoXPipeline encodes the negative prompt
"") and half as zero text embeddings (CogVideoX's own training and DiTCtrl's official sampler); the text goes through the
pipeline's own ``encode_prompt`` (no attention mask, padded to :data:`~.tokenizer.MAX_TOKENS`): generate with
``max_sequence_length=32`` (recorded in ``attnctrl.json``), not CogVideoX's 226.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import atomic_save
from .flux import t5_encoder, t5_tokenizer
from .motion import NUM_FRAMES, VIDEO_VOCABULARY, make_clip, render_clip
from .tokenizer import MAX_TOKENS
from .world import IMAGE_SIZE

__all__ = [
    "VIDEO_FRAMES", "VIDEO_SIZE", "VIDEO_LAYERS", "VIDEO_HEADS", "VIDEO_HEAD_DIM", "VAE_CHANNELS", "LATENT_CHANNELS",
    "VIDEO_CFG", "VIDEO_RECOMMENDED", "video_tokenizer", "build_video_models", "video_scheduler", "video_pipeline",
    "video_loss", "ClipPool", "clip_uint8", "generate_clips", "evaluate_video", "save_video_pipeline",
]

#: pixel frames of a clip (8k + 1, see the module docstring) and their side
VIDEO_FRAMES = NUM_FRAMES
VIDEO_SIZE = IMAGE_SIZE
VIDEO_LAYERS = 8
VIDEO_HEADS = 4
VIDEO_HEAD_DIM = 32
VAE_CHANNELS = (16, 32, 64)
LATENT_CHANNELS = 16
#: CogVideoXPipeline's ``guidance_scale`` recommended (its default negative prompt "" is the dropped caption)
VIDEO_CFG = 6.0
#: generation settings stored with the model (``attnctrl.json``)
VIDEO_RECOMMENDED = {"num_inference_steps": 25, "guidance_scale": VIDEO_CFG, "num_frames": VIDEO_FRAMES,
                     "height": VIDEO_SIZE, "width": VIDEO_SIZE, "max_sequence_length": MAX_TOKENS,
                     "use_dynamic_cfg": False}


def video_tokenizer():
    """The T5 tokenizer of toyworld-video: one token per word of :data:`~.motion.VIDEO_VOCABULARY`."""
    return t5_tokenizer(vocabulary=VIDEO_VOCABULARY)


def build_video_models(tokenizer, seed: int = 0, layers: int = VIDEO_LAYERS, heads: int = VIDEO_HEADS,
                       head_dim: int = VIDEO_HEAD_DIM):
    """Fresh (random) 3D VAE, T5 text encoder and CogVideoX transformer of toyworld-video."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * len(VAE_CHANNELS),
        up_block_types=("CogVideoXUpBlock3D",) * len(VAE_CHANNELS), block_out_channels=VAE_CHANNELS,
        latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4,
        sample_height=VIDEO_SIZE, sample_width=VIDEO_SIZE, scaling_factor=1.0,
    )
    text_encoder = t5_encoder(tokenizer, seed + 1)
    latent = VIDEO_SIZE // 2 ** (len(VAE_CHANNELS) - 1)
    torch.manual_seed(seed + 2)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, time_embed_dim=heads * head_dim, text_embed_dim=text_encoder.config.d_model,
        num_layers=layers, sample_width=latent, sample_height=latent, sample_frames=VIDEO_FRAMES, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=MAX_TOKENS, use_rotary_positional_embeddings=True,
    )
    with torch.no_grad():  # adaLN-Zero (DiT): zero gates, so every block starts as the identity; zero output
        for layer in [transformer.norm_out.linear, transformer.proj_out,
                      *(n.linear for b in transformer.transformer_blocks for n in (b.norm1, b.norm2))]:
            layer.weight.zero_()
            layer.bias.zero_()
    return vae, text_encoder, transformer


def video_scheduler():
    """CogVideoX's sampler and training schedule (v-prediction, zero terminal SNR, trailing), without the SNR shift."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                                  snr_shift_scale=1.0, timestep_spacing="trailing")


def video_pipeline(vae, text_encoder, tokenizer, transformer):
    """A ``CogVideoXPipeline`` around the given modules (no copies) with the toyworld-video sampler."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=video_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video_loss(pipe, latents: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
    """CogVideoX's v-prediction loss of ``pipe.transformer`` on scaled VAE latents ``(B, C, F, H, W)`` and their
    captions, at uniform timesteps. The text goes through ``pipe.encode_prompt`` with gradients (T5 trains)."""
    scheduler = pipe.scheduler
    latents = latents.permute(0, 2, 1, 3, 4)  # the transformer's (B, F, C, H, W)
    b, f, _, h, w = latents.shape
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t)
    embeds = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=MAX_TOKENS,
                                device=latents.device)[0]
    # half the dropped captions as zero embeddings: CogVideoX's training drops text that way (SAT's ucg_rate) and
    # DiTCtrl's official sampler uses zeros as the unconditional input; the other half as diffusers' T5("")
    zero = torch.tensor([c == "" for c in captions]) & (torch.rand(b, generator=gen) < 0.5)
    embeds = torch.where(zero[:, None, None], torch.zeros_like(embeds), embeds)
    scale = pipe.vae_scale_factor_spatial
    rope = pipe._prepare_rotary_positional_embeddings(h * scale, w * scale, f, latents.device)
    pred = pipe.transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=t, image_rotary_emb=rope,
                            return_dict=False)[0]
    return F.mse_loss(pred, target)


class ClipPool:
    """The clips of a video run: ``frames`` (N, F, S, S, 3) uint8 and ``captions``; clip ``i`` is
    ``make_clip(seed * 10_000_000 + i)`` (:mod:`.motion`), drawn at 64 px."""

    def __init__(self, frames: torch.Tensor, captions: list[str]):
        self.frames, self.captions = frames, captions

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def load_or_build(cls, path: Path, size: int, seed: int = 0, num_frames: int = VIDEO_FRAMES,
                      log: Callable[[str], None] = print) -> ClipPool:
        """The pool saved at ``path``, or a new one of ``size`` clips of ``num_frames`` frames saved there."""
        if path.exists():
            saved = torch.load(path)
            if saved["frames"].shape[1] != num_frames:
                raise ValueError(f"{path} holds clips of {saved['frames'].shape[1]} frames, this run trains on "
                                 f"{num_frames}; use a new run folder")
            log(f"pool: {len(saved['captions'])} clips loaded from {path}")
            return cls(saved["frames"], saved["captions"])
        started = time.perf_counter()
        frames = torch.empty(size, num_frames, VIDEO_SIZE, VIDEO_SIZE, 3, dtype=torch.uint8)
        captions = []
        for i in range(size):
            clip = make_clip(seed * 10_000_000 + i, num_frames=num_frames)
            frames[i] = torch.from_numpy(np.stack([np.asarray(f) for f in render_clip(clip)]))
            captions.append(clip.caption)
            if (i + 1) % 1024 == 0:
                log(f"pool: {i + 1}/{size} clips ({time.perf_counter() - started:.0f} s)")
        atomic_save({"frames": frames, "captions": captions}, path)
        return cls(frames, captions)

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Clips ``idx`` as the VAE's (B, 3, F, S, S) floats in [-1, 1]."""
        return self.frames[idx].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def clip_uint8(frames) -> np.ndarray:
    """A generated clip (``output_type="np"``: floats in [0, 1]) as (F, S, S, 3) uint8."""
    return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def generate_clips(pipe, captions: list[str], steps: int = 25, guidance: float = VIDEO_CFG, seed: int = 0,
                   batch: int = 4, num_frames: int = VIDEO_FRAMES) -> list[np.ndarray]:
    """Clips of ``captions`` as (F, S, S, 3) uint8 arrays; caption ``i`` from ``torch.Generator().manual_seed(seed + i)``."""
    clips = []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        out = pipe(chunk, num_frames=num_frames, height=VIDEO_SIZE, width=VIDEO_SIZE, num_inference_steps=steps,
                   guidance_scale=guidance, max_sequence_length=MAX_TOKENS, use_dynamic_cfg=False,
                   generator=generators, output_type="np").frames
        clips += [clip_uint8(v) for v in out]
    return clips


def evaluate_video(pipe, captions: list[str], steps: int = 25, guidance: float = VIDEO_CFG, seed: int = 0,
                   batch: int = 4) -> dict:
    """The video checker's scores (:func:`~.video_score.evaluate_clips`) of clips generated from ``captions``."""
    from .video_score import evaluate_clips

    return evaluate_clips(generate_clips(pipe, captions, steps, guidance, seed, batch), captions)


def save_video_pipeline(path: Path, vae, text_encoder, tokenizer, transformer, info: dict | None = None) -> Path:
    """Save a standard diffusers ``CogVideoXPipeline`` folder with fp16 weights and ``attnctrl.json``
    (:data:`VIDEO_RECOMMENDED`). ``vae.config`` must hold the run's ``scaling_factor``."""
    half = [copy.deepcopy(m).half() for m in (vae, text_encoder, transformer)]
    pipe = video_pipeline(half[0], half[1], tokenizer, half[2])
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "attnctrl.json").write_text(json.dumps({"recommended": VIDEO_RECOMMENDED, **(info or {})}, indent=2) + "\n")
    return path
