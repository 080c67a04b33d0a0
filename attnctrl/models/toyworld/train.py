"""Train the toyworld text-to-image model from scratch on CPU (``attnctrl train-toy``): the training loop.

The pieces it puts together, one module each:

* :mod:`.architecture`: the networks (``AutoencoderKL``, ``CLIPTextModel``, ``UNet2DConditionModel``), the noise
  schedule and the saved diffusers folder; :mod:`.tokenizer`: the word-level ``CLIPTokenizer``;
* :mod:`.data`: the scene pool, its grounding targets and the draws of reference training;
* :mod:`.losses`: VAE loss, min-SNR-weighted epsilon loss, TokenCompose's grounding terms;
* :mod:`.attention`: the training-time attention hooks (CLoRA's cross-attention recorder, MRSA on references);
* :mod:`.flux`: the FLUX-architecture variant (``arch="flux"``): its networks, tokenizer, rectified-flow loss and
  ``FluxPipeline`` folder, trained by this same loop (see below).

Recipe: a fixed pool of procedurally drawn scenes, the VAE first (L1 + MSE + 1e-6 KL; 20 minutes: at 10 it confuses
yellow/orange and red/orange, and the log reports the colour fidelity of its reconstructions), then the latents of
the pool are cached and the UNet and text encoder are trained with epsilon prediction on the scaled-linear schedule,
min-SNR-5 loss weighting (the clean-image weight kept >= 0.1 at high noise), 10 % caption dropout for
classifier-free guidance, horizontal flips (with "left"/"right" swapped in the caption), AdamW with warm-up and a
cosine decay over the time budget, and EMA weights (0.999, diffusers' ``EMAModel``), which are what gets saved.
Options for attention like SD's: a grounding loss on the cross-attention of object words (``grounding_weight``),
look-alike scenes (``look_alike_fraction``) and in-context references in the decoder's self-attention
(``reference_fraction``). Training is resumable from ``DIR/checkpoint.pt`` and can start from a saved model
(``init``); the result is a standard diffusers folder ``DIR/model`` (fp16 weights) that
``StableDiffusionPipeline.from_pretrained`` loads.

``arch="flux"`` trains the FLUX-architecture variant (:mod:`.flux`) with the same loop, pool, checkpoints, EMA,
learning-rate schedule and evaluations: the scenes are drawn at 128 px, the VAE and CLIP text encoder come from a
saved toyworld model (the shipped one unless ``init`` names another; a flux folder given as ``init`` is fine-tuned
whole), the VAE is kept (no VAE phase) and the pool's latents are normalised FLUX's way (``shift_factor`` and
``scaling_factor``); a ``FluxTransformer2DModel`` and a T5 encoder are trained with the CLIP text encoder by rectified
flow; the result is a ``FluxPipeline`` folder. The grounding loss and in-context references are UNet-only.

``arch="video"`` trains toyworld-video (:mod:`.video`), a CogVideoX-architecture model of moving shapes, from scratch
with the same loop: the pool holds clips of :mod:`.motion` (flipped with "left"/"right" swapped too), the VAE phase
trains its 3D VAE on them, then a ``CogVideoXTransformer3DModel`` and its T5 encoder are trained by v-prediction;
the quick evaluations use the video checker; the result is a ``CogVideoXPipeline`` folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..loading import model_folder
from .architecture import BETA_END, UNET_CHANNELS, build_models, noise_scheduler, save_pipeline
from .attention import record_cross_attention, reference_attention
from .data import ScenePool, atomic_save, sample_latents, swap_sides
from .flux import (
    FLUX_BLOCKS,
    FLUX_HEAD_DIM,
    FLUX_HEADS,
    FLUX_IMAGE_SIZE,
    CheckerView,
    build_flux_models,
    flow_loss,
    flow_scheduler,
    flux_pipeline,
    save_flux_pipeline,
    t5_tokenizer,
)
from .losses import epsilon_loss, grounding_loss, grounding_terms, min_snr_weights, vae_loss
from .tokenizer import MAX_TOKENS, toy_tokenizer
from .video import (
    VIDEO_LAYERS,
    VIDEO_SIZE,
    ClipPool,
    build_video_models,
    evaluate_video,
    save_video_pipeline,
    video_loss,
    video_pipeline,
    video_scheduler,
    video_tokenizer,
)
from .world import IMAGE_SIZE

__all__ = ["ARCHS", "TrainConfig", "train", "cosine_factor"]

#: the architectures ``train`` builds: the UNet (Stable Diffusion-like) model, the FLUX-like and the CogVideoX-like
#: (video) variants
ARCHS = ("sd", "flux", "video")


@dataclass
class TrainConfig:
    minutes: float = 90.0  # training-time budget, across resumes
    vae_minutes: float = 20.0
    # UNet widths per level; every level but the last has self- and cross-attention (latent 16, 8, 4 tokens a side)
    unet_channels: tuple[int, ...] = UNET_CHANNELS
    pool_size: int = 32768
    batch: int = 32
    vae_batch: int = 16
    lr: float = 4e-4
    vae_lr: float = 1e-3
    warmup_steps: int = 300
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # Floor of the clean-image loss weight: min-SNR weights the clean-image error at high noise by its SNR (2e-4 at
    # t = 999), so the steps that decide the layout were barely trained and "left"/"right" were not learned at all
    # (docs/toyworld.md); the floor keeps that error weighted by at least this much.
    x0_weight_floor: float = 0.1
    # Fraction of look-alike scenes in the pool (world.sample_scene): objects whose caption leaves out their look
    # copy it from the others, which teaches self-attention to carry looks across objects (docs/toyworld.md).
    look_alike_fraction: float = 0.0
    # Weight of the grounding loss (TokenCompose, Wang et al. CVPR 2024: L_token + L_pixel, see grounding_terms):
    # each object word's cross-attention is pulled inside its object's silhouette and spread over it, so the maps
    # of words are local as SD's are (CLoRA's masks, MagicFace's segmentation); 0 = off (docs/toyworld.md).
    grounding_weight: float = 0.0
    # Fraction of each batch trained with in-context references (see attention.ReferenceAttnProcessor): one or two
    # objects of the scene lose their look words and a pool scene holding an object of the same look and shape is
    # put in the decoder self-attention as a masked reference, so looks are copied from references as SD copies
    # them; 0 = off.
    reference_fraction: float = 0.0
    # the noise schedule's last beta (see architecture.BETA_END: SD's 0.012 leaves too much signal at t = 999)
    beta_end: float = BETA_END
    ema_decay: float = 0.999
    seed: int = 0
    # fine-tune a saved toyworld folder instead of training from scratch (its VAE is kept: a 0-minute VAE phase)
    init: str | None = None
    checkpoint_minutes: float = 10.0
    eval_minutes: float = 20.0
    final_eval: bool = True
    # "sd": the UNet model; "flux": the FLUX-architecture variant (flux.py), sized by the three fields below;
    # "video": the CogVideoX-architecture variant (video.py) of video_layers transformer blocks
    arch: str = "sd"
    flux_blocks: tuple[int, int] = FLUX_BLOCKS  # double-stream, single-stream blocks
    flux_heads: int = FLUX_HEADS
    flux_head_dim: int = FLUX_HEAD_DIM
    video_layers: int = VIDEO_LAYERS


#: settings of runs saved before they existed (a resumed old checkpoint keeps the behaviour it was trained with)
_OLDER_RUNS = {"beta_end": 0.012, "x0_weight_floor": 0.0}


def cosine_factor(progress: float) -> float:
    """The learning-rate factor of toyworld's training runs: a cosine from 1 to 0.1 over ``progress`` in [0, 1].

    Hand-written rather than diffusers' ``get_scheduler``: progress is the share of the *time* budget spent (runs are
    budgeted in minutes, the step count is not known in advance), and the decay ends at 0.1, not 0."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _ema(parameters, decay: float, updates: int):
    """diffusers' ``EMAModel`` with the decay of toyworld's runs: ``min(decay, (1 + n) / (10 + n))`` at the n-th
    update (n = the optimiser step, from 1). ``EMAModel`` counts its first update as 0 (decay 0: a copy); the
    trainer's EMA starts as a copy of the model and counts from 1, hence ``update_after_step=-1``, which gives the
    same decay at every step (tested)."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(parameters, decay=decay, update_after_step=-1, foreach=True)
    ema.optimization_step = updates
    return ema


class _StepClock:
    """Seconds of training steps by the wall clock, without the time the process spent stopped (SIGSTOP, Ctrl-Z, a
    scheduler pausing it for other work): a step during which the process was continued (SIGCONT, counted by
    :func:`_continues_counted`) counts as long as the step before it. Without this a run paused mid-step for an hour
    counted that hour as training time (its budget and learning-rate schedule ran on while it was stopped)."""

    def __init__(self):
        self.continued = self.seen = 0
        self.last: float | None = None
        self.t0 = 0.0

    def start(self) -> float:
        self.t0 = time.perf_counter()
        self.seen = self.continued
        return self.t0

    def seconds(self) -> float:
        """Seconds since :meth:`start` (the previous step's if the process was stopped and continued meanwhile)."""
        took = time.perf_counter() - self.t0
        if self.continued != self.seen and self.last is not None:
            took = self.last
        self.last = took
        return took


@contextlib.contextmanager
def _continues_counted(clock: _StepClock):
    """While the block runs, each SIGCONT the process receives is counted on ``clock`` (the previous handler is
    restored afterwards). Off the main thread, or without SIGCONT (Windows), a no-op."""
    if not hasattr(signal, "SIGCONT") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        clock.continued += 1
        if callable(previous):
            previous(signum, frame)

    previous = signal.signal(signal.SIGCONT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGCONT, previous if previous is not None else signal.SIG_DFL)


class _Trainer:
    def __init__(self, out: Path, cfg: TrainConfig, log: Callable[[str], None]):
        self.out, self.cfg, self.log = out, cfg, log
        self.clock = _StepClock()
        self.flux, self.video = cfg.arch == "flux", cfg.arch == "video"
        self.tokenizer = video_tokenizer() if self.video else toy_tokenizer()
        if self.video:  # CogVideoX has one text encoder, T5: it is the pipeline's ``text_encoder``
            self.tokenizer_2 = self.text_encoder_2 = None
            self.vae, self.text_encoder, self.denoiser = build_video_models(self.tokenizer, cfg.seed, cfg.video_layers)
            self.scheduler = video_scheduler()
        elif self.flux:
            self.tokenizer_2 = t5_tokenizer()
            self.vae, self.text_encoder, self.text_encoder_2, self.denoiser = build_flux_models(
                self.tokenizer, self.tokenizer_2, cfg.seed, tuple(cfg.flux_blocks), cfg.flux_heads, cfg.flux_head_dim)
            self.scheduler = flow_scheduler()
        else:
            self.tokenizer_2 = self.text_encoder_2 = None
            self.vae, self.text_encoder, self.denoiser = build_models(self.tokenizer, cfg.seed, cfg.unet_channels)
            self.scheduler = noise_scheduler(cfg.beta_end)
        # the denoiser's component name: its folder in the saved pipeline and its key in the checkpoint
        self.name = "transformer" if self.flux or self.video else "unet"
        self.image_size = FLUX_IMAGE_SIZE if self.flux else VIDEO_SIZE if self.video else IMAGE_SIZE
        self.pool: ScenePool | ClipPool | None = None
        self.phase = "pool"  # then "vae", then "unet" (the denoiser's phase, whatever the architecture)
        self.elapsed = 0.0
        self.step = 0
        self.vae_step = 0
        self.ema = self.ema_denoiser = self.ema_text = self.ema_text_2 = None
        self.opt = self.vae_opt = None
        self.scaling = 1.0
        self.shift = 0.0  # FLUX's VAE shift_factor (the latent mean), 0 for the UNet model
        self.keep_scaling = False  # True when the latent normalisation comes with the starting folder
        self.history: list[dict] = []
        if cfg.init:
            self._load_init(model_folder(cfg.init))

    def _load_init(self, folder: Path) -> None:
        from safetensors.torch import load_file

        modules = {"vae": self.vae, "text_encoder": self.text_encoder, self.name: self.denoiser}
        if self.flux:
            modules["text_encoder_2"] = self.text_encoder_2
            if not (folder / "transformer").is_dir():  # a UNet model's folder: its VAE and CLIP text encoder only
                del modules["transformer"], modules["text_encoder_2"]
        for name, module in modules.items():
            files = sorted((folder / name).glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"--init {folder}: no {name}/*.safetensors (not a toyworld model folder)")
            weights = {k: v.float() for k, v in load_file(files[0]).items()}
            tied = getattr(module, "_tied_weights_keys", None)
            if isinstance(tied, dict):  # transformers saves tied weights once (T5's embed_tokens = its shared table)
                weights.update({k: weights[src] for k, src in tied.items() if k not in weights and src in weights})
            try:
                module.load_state_dict(weights)
            except RuntimeError as e:
                shape = (f"flux_blocks={tuple(self.cfg.flux_blocks)}, flux_heads={self.cfg.flux_heads}, "
                         f"flux_head_dim={self.cfg.flux_head_dim}" if self.flux
                         else f"unet_channels={self.cfg.unet_channels}")
                raise ValueError(f"--init {folder}: its {name} is not the toyworld architecture with {shape} "
                                 f"({str(e).splitlines()[0]})") from None
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
        self.scaling = vae_config["scaling_factor"]
        if self.flux and self.name not in modules:
            self.log(f"initialised from {folder}: its VAE (kept) and CLIP text encoder; new T5 encoder and transformer")
            return
        self.shift = vae_config.get("shift_factor") or 0.0
        self.keep_scaling = True
        self.log(f"initialised from {folder} (VAE kept, scaling factor {self.scaling:.3f})")

    # -- data ------------------------------------------------------------------------------------------------------
    def build_pool(self) -> None:
        cfg = self.cfg
        if self.video:
            self.pool = ClipPool.load_or_build(self.out / "pool.pt", cfg.pool_size, cfg.seed, log=self.log)
            return
        self.pool = ScenePool.load_or_build(self.out / "pool.pt", cfg.pool_size, cfg.seed, cfg.look_alike_fraction,
                                            need_masks=bool(cfg.grounding_weight or cfg.reference_fraction),
                                            log=self.log, image_size=self.image_size)
        if cfg.reference_fraction:
            self.pool.index_looks()

    def _latents(self, idx: torch.Tensor, flip: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled latents of pool scenes ``idx`` sampled from their cached VAE posteriors, flipped where ``flip``."""
        return sample_latents(self.lat_mean, self.lat_logvar, self.scaling, idx, flip, gen, self.shift)

    # -- VAE ---------------------------------------------------------------------------------------------------------
    def vae_loop(self) -> None:
        cfg, pool = self.cfg, self.pool
        if self.vae_opt is None:
            self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.vae.train()
        gen = torch.Generator().manual_seed(cfg.seed + self.vae_step)
        total = cfg.vae_minutes * 60
        while self.elapsed < total:
            self.clock.start()
            x = pool.pixels(torch.randint(0, len(pool), (cfg.vae_batch,), generator=gen))
            post = self.vae.encode(x).latent_dist
            rec = self.vae.decode(post.sample(generator=gen)).sample
            loss = vae_loss(rec, x, post)
            lr = cfg.vae_lr * cosine_factor(self.elapsed / total)
            for g in self.vae_opt.param_groups:
                g["lr"] = lr
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vae_step += 1
            self.elapsed += self.clock.seconds()
            if self.vae_step % 50 == 0:
                psnr = -10 * math.log10(F.mse_loss(rec, x).item() / 4)
                self.log(f"vae step {self.vae_step}: loss {loss.item():.4f}, PSNR {psnr:.1f} dB, "
                         f"{self.elapsed / 60:.1f} min")
        if self.elapsed >= total:
            self.finish_vae()

    @torch.no_grad()
    def finish_vae(self) -> None:
        pool = self.pool
        self.vae.eval()
        means, logvars = [], []
        chunk = 16 if self.video else 256 if self.image_size == IMAGE_SIZE else 64  # (memory)
        for start in range(0, len(pool), chunk):
            post = self.vae.encode(pool.pixels(torch.arange(start, min(start + chunk, len(pool))))).latent_dist
            means.append(post.mean.half())
            logvars.append(post.logvar.half())
            if (self.flux or self.video) and (start // chunk + 1) % 64 == 0:
                self.log(f"pool encoded: {start + chunk}/{len(pool)}")
        self.lat_mean, self.lat_logvar = torch.cat(means), torch.cat(logvars)
        if not self.keep_scaling:
            if self.flux:  # FLUX's VAE normalisation: (z - shift_factor) * scaling_factor
                self.shift = float(self.lat_mean.float().mean())
            self.scaling = float(1.0 / self.lat_mean.float().std())
        self.vae.register_to_config(scaling_factor=self.scaling)
        if self.flux:
            self.vae.register_to_config(shift_factor=self.shift)
        rec = self.vae.decode(self.lat_mean[: 16 if self.video else 64].float()).sample
        psnr = -10 * math.log10(F.mse_loss(rec, pool.pixels(torch.arange(len(rec)))).item() / 4)
        shift = f"shift factor {self.shift:.3f}, " if self.flux else ""
        self.log(f"vae done: pool encoded, {shift}scaling factor {self.scaling:.3f}, reconstruction PSNR {psnr:.1f} dB, "
                 f"on reconstructions {self._fidelity(rec)}")
        self.phase = "unet"

    def _fidelity(self, rec: torch.Tensor) -> str:
        """What the checker reads right on VAE reconstructions of pool scenes: the objects' colour (the scenes whose
        caption names every object's colour) or, for clips, the video checker's colour, shape and direction."""
        from PIL import Image

        from .score import CaptionError, score

        if self.video:
            from .video_score import evaluate_clips

            clips = ((rec.permute(0, 2, 3, 4, 1) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
            found = evaluate_clips(list(clips), self.pool.captions[: len(clips)])
            return f"colour {found['colour']:.0%}, shape {found['shape']:.0%}, direction {found['direction']:.0%}"
        pixels = ((rec.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
        hits = []
        for image, caption in zip(pixels, self.pool.captions):
            image = Image.fromarray(image)
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):  # the checker is calibrated at 64 px
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
            try:
                hits += [obj["colour"] for obj in score(image, caption)["objects"]]
            except CaptionError:  # a look-alike scene's copies name no colour
                continue
        return f"right colour {sum(hits) / max(1, len(hits)):.0%}"

    # -- denoiser + text encoders --------------------------------------------------------------------------------
    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids

    def _texts(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.flux else [])

    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.denoiser, *self._texts()) for p in m.parameters()]

    def _start_ema(self, saved: dict | None = None) -> None:
        """EMA copies of the denoiser and text encoder(s) (``saved``: their state dicts from a checkpoint) and the
        ``EMAModel`` that updates them, at the run's step."""
        self.ema_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        if self.flux:
            self.ema_text_2 = copy.deepcopy(self.text_encoder_2).requires_grad_(False)
        if saved is not None:
            self.ema_denoiser.load_state_dict(saved[f"ema_{self.name}"])
            self.ema_text.load_state_dict(saved["ema_text"])
            if self.flux:
                self.ema_text_2.load_state_dict(saved["ema_text_2"])
        self.ema = _ema(self._ema_parameters(), self.cfg.ema_decay, self.step)

    def _ema_parameters(self) -> list[torch.nn.Parameter]:
        emas = (self.ema_denoiser, self.ema_text) + ((self.ema_text_2,) if self.flux else ())
        return [p for m in emas for p in m.parameters()]

    def _sync_ema(self) -> None:
        """Write the EMA weights into ``ema_denoiser`` / ``ema_text`` (before they are evaluated or saved)."""
        if self.ema is not None:
            self.ema.copy_to(self._ema_parameters())

    def unet_loop(self) -> None:
        """The denoiser's phase (a UNet or, with ``arch="flux"``, a FLUX transformer) with the text encoder(s)."""
        cfg, pool = self.cfg, self.pool
        params = self._trained()
        if self.opt is None:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
            self._start_ema()
        self.denoiser.train()
        for module in self._texts():
            module.train()
        references = reference_attention(self.denoiser) if cfg.reference_fraction else None
        recorder = record_cross_attention(self.denoiser) if cfg.grounding_weight else None
        try:
            self._unet_steps(cfg, pool, params, references, recorder)
        finally:
            for handle in (recorder, references):
                if handle is not None:
                    handle.remove()

    def _unet_steps(self, cfg: TrainConfig, pool: ScenePool, params, references, recorder) -> None:
        if self.flux:
            live = flux_pipeline(self.vae, self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2,
                                 self.denoiser)
            # unshifted logit-normal sigmas (SD3's): the sampler's shift at 256 tokens (e^0.5) left 3 % of the
            # steps below sigma 0.2, where a shape's edges are drawn, and shape stayed near chance (docs/toyworld.md)
            shift = 1.0
        elif self.video:
            live = video_pipeline(self.vae, self.text_encoder, self.tokenizer, self.denoiser)
        else:
            alphas = self.scheduler.alphas_cumprod
            weights = min_snr_weights(self.scheduler, cfg.min_snr_gamma, cfg.x0_weight_floor)
        gen = torch.Generator().manual_seed(cfg.seed * 7 + self.step)
        budget = cfg.minutes * 60
        unet_start = cfg.vae_minutes * 60
        next_ckpt = self.elapsed + cfg.checkpoint_minutes * 60
        next_eval = self.elapsed + cfg.eval_minutes * 60
        smooth = smooth_inside = None
        while self.elapsed < budget:
            t0 = self.clock.start()
            idx = torch.randint(0, len(pool), (cfg.batch,), generator=gen)
            flip = torch.rand(cfg.batch, generator=gen) < 0.5
            latents = self._latents(idx, flip, gen)
            captions = [pool.captions[i] for i in idx.tolist()]
            refs = (pool.references(idx, captions, gen, cfg.reference_fraction, self._latents)
                    if references is not None else None)
            captions = [swap_sides(c) if f else c for c, f in zip(captions, flip)]
            drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            if self.flux:
                loss = flow_loss(live, latents, captions, gen, shift)
            elif self.video:
                loss = video_loss(live, latents, captions, gen)
            else:
                loss, inside = self._epsilon_step(cfg, pool, alphas, weights, idx, flip, drop, latents, captions,
                                                  refs, references, recorder, gen)
                if inside is not None:
                    smooth_inside = inside if smooth_inside is None else 0.98 * smooth_inside + 0.02 * inside
            progress = min(1.0, (self.elapsed - unet_start) / max(1.0, budget - unet_start))
            lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) * cosine_factor(progress)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            self.step += 1
            self.ema.step(params)
            self.elapsed += self.clock.seconds()
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            if self.step % 50 == 0:
                grounded = f", word attention inside its object {smooth_inside:.2f}" if recorder is not None else ""
                self.log(f"step {self.step}: loss {smooth:.4f}{grounded}, lr {lr:.2e}, {time.perf_counter() - t0:.2f} "
                         f"s/step, {self.elapsed / 60:.1f}/{cfg.minutes:.0f} min")
            if self.elapsed >= next_ckpt:
                self.checkpoint()
                next_ckpt = self.elapsed + cfg.checkpoint_minutes * 60
            if self.elapsed >= next_eval:
                self.quick_eval()
                next_eval = self.elapsed + cfg.eval_minutes * 60

    def _epsilon_step(self, cfg: TrainConfig, pool: ScenePool, alphas, weights, idx, flip, drop, latents, captions,
                      refs, references, recorder, gen: torch.Generator):
        """The UNet's loss on a batch: min-SNR-weighted epsilon prediction, with the in-context references' rows and
        the grounding loss when they are on. Returns the loss and the mean of the grounding's inside term (or None)."""
        t = torch.randint(0, len(alphas), (cfg.batch,), generator=gen)
        if refs is not None:  # references share their target's timestep (re-noised as at inference)
            latents = torch.cat([latents, refs["latents"]])
            t = torch.cat([t, t[refs["owner"]]])
            captions += refs["captions"]
            references.state.plan = refs
        noise = torch.randn(latents.shape, generator=gen)
        noisy = self.scheduler.add_noise(latents, noise, t)
        context = self.text_encoder(self._tokens(captions))[0]
        if recorder is not None:
            recorder.state.maps = []
        pred = self.denoiser(noisy, t, context).sample
        if references is not None:
            references.state.plan = None
        loss = epsilon_loss(pred, noise, weights[t])
        mean = None
        if recorder is not None:
            masks = pool.masks[idx].float() / 255
            masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
            words = torch.where(drop[:, None, None], -1, pool.words[idx].long())
            if refs is not None:  # captions that lost look words: their word positions moved
                words[(refs["slots"] >= 0).any(1)] = -1
            inside, pixel = grounding_terms([m[: cfg.batch] for m in recorder.state.maps], masks, words)
            recorder.state.maps = None
            if inside.numel():  # every caption of the batch dropped: no word to ground
                loss = loss + cfg.grounding_weight * grounding_loss(inside, pixel)
                mean = inside.mean().item()
        return loss, mean

    def pipeline(self):
        """A pipeline of the EMA weights for the quick evaluation: a ``StableDiffusionPipeline``, for the flux variant a
        ``FluxPipeline`` seen through :class:`~.flux.CheckerView` (true CFG, 64 px images), for the video one a
        ``CogVideoXPipeline``."""
        from diffusers import StableDiffusionPipeline

        self._sync_ema()
        if self.video:
            return video_pipeline(self.vae, self.ema_text, self.tokenizer, self.ema_denoiser)
        if self.flux:
            return CheckerView(flux_pipeline(self.vae, self.ema_text, self.tokenizer, self.ema_text_2, self.tokenizer_2,
                                             self.ema_denoiser), self.image_size)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.ema_text, tokenizer=self.tokenizer, unet=self.ema_denoiser,
            scheduler=noise_scheduler(self.cfg.beta_end), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def quick_eval(self) -> dict:
        started = time.perf_counter()
        scores, summary = self._video_scores() if self.video else self._image_scores()
        self.denoiser.train()
        for module in self._texts():
            module.train()
        entry = {"step": self.step, "minutes": round(self.elapsed / 60, 1), **scores}
        self.history.append(entry)
        self.log(f"eval at step {self.step}: {summary} ({time.perf_counter() - started:.0f} s, not counted)")
        return entry

    def _image_scores(self) -> tuple[dict, str]:
        from .bench import benchmark_captions, evaluate, evaluate_look_alike

        captions = benchmark_captions()
        single = evaluate(self.pipeline(), captions["single"][::2], steps=20)
        two = evaluate(self.pipeline(), captions["two"][::4], steps=20)
        look = evaluate_look_alike(self.pipeline(), n=16, steps=20)
        return {"single": single, "two": two, "look_alike": look}, (
            f"single colour {single['colour']:.2f} shape {single['shape']:.2f} side {single['side']:.2f}; two-object "
            f"colour {two['colour']:.2f} shape {two['shape']:.2f}; look-alike same colour {look['same']:.2f}")

    def _video_scores(self) -> tuple[dict, str]:
        from .motion import video_benchmark_captions

        captions = video_benchmark_captions()
        single = evaluate_video(self.pipeline(), captions["single"][::3], steps=20)
        two = evaluate_video(self.pipeline(), captions["two"][::4], steps=20)
        return {"single": single, "two": two}, (
            f"single colour {single['colour']:.2f} shape {single['shape']:.2f} direction {single['direction']:.2f} "
            f"persistence {single['persistence']:.2f} largest jump {single['max_jump']:.1f} px; two-object colour "
            f"{two['colour']:.2f} direction {two['direction']:.2f}")

    def save(self, path: Path, info: dict) -> Path:
        """The EMA weights as a diffusers folder: ``StableDiffusionPipeline`` or, for the flux variant, ``FluxPipeline``."""
        self._sync_ema()
        if self.video:
            return save_video_pipeline(path, self.vae, self.ema_text, self.tokenizer, self.ema_denoiser, info)
        if self.flux:
            return save_flux_pipeline(path, self.vae, self.ema_text, self.tokenizer, self.ema_text_2, self.tokenizer_2,
                                      self.ema_denoiser, info)
        return save_pipeline(path, self.vae, self.ema_text, self.tokenizer, self.ema_denoiser, info,
                             beta_end=self.cfg.beta_end)

    # -- state ------------------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        self._sync_ema()
        state = {
            "config": asdict(self.cfg), "phase": self.phase, "elapsed": self.elapsed, "step": self.step,
            "vae_step": self.vae_step, "scaling": self.scaling, "history": self.history,
            "vae": self.vae.state_dict(), "text_encoder": self.text_encoder.state_dict(),
            self.name: self.denoiser.state_dict(),
            "vae_opt": self.vae_opt.state_dict() if self.vae_opt else None,
            "opt": self.opt.state_dict() if self.opt else None,
            f"ema_{self.name}": self.ema_denoiser.state_dict() if self.ema_denoiser else None,
            "ema_text": self.ema_text.state_dict() if self.ema_text else None,
        }
        if self.flux:
            state.update(shift=self.shift, keep_scaling=self.keep_scaling,
                         text_encoder_2=self.text_encoder_2.state_dict(),
                         ema_text_2=self.ema_text_2.state_dict() if self.ema_text_2 else None)
        if self.phase == "unet":
            state["latents"] = (self.lat_mean, self.lat_logvar)
        atomic_save(state, self.out / "checkpoint.pt")
        self.log(f"checkpoint saved at {self.elapsed / 60:.1f} min (step {self.step})")

    def restore(self, state: dict) -> None:
        self.phase, self.elapsed, self.step = state["phase"], state["elapsed"], state["step"]
        self.vae_step, self.scaling, self.history = state["vae_step"], state["scaling"], state.get("history", [])
        self.vae.load_state_dict(state["vae"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.denoiser.load_state_dict(state[self.name])
        if self.flux:
            self.shift, self.keep_scaling = state["shift"], state["keep_scaling"]
            self.text_encoder_2.load_state_dict(state["text_encoder_2"])
        if state["vae_opt"] is not None:
            self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.vae_lr)
            self.vae_opt.load_state_dict(state["vae_opt"])
        if state["opt"] is not None:
            self.opt = torch.optim.AdamW(self._trained(), lr=self.cfg.lr, weight_decay=1e-2)
            self.opt.load_state_dict(state["opt"])
            self._start_ema(state)
        if self.phase == "unet":
            self.lat_mean, self.lat_logvar = state["latents"]
            self.vae.register_to_config(scaling_factor=self.scaling)
            if self.flux:
                self.vae.register_to_config(shift_factor=self.shift)
            self.vae.eval()


def train(out_dir: str | os.PathLike, minutes: float = 90.0, resume: bool = False,
          log: Callable[[str], None] = print, **overrides) -> Path:
    """Train (or resume training) into ``out_dir``; returns the path of the saved diffusers folder ``out_dir/model``.

    ``minutes`` is the training-time budget across resumes (building and encoding the scene pool, checkpoints, the
    periodic evaluations and time the process spends stopped are not counted); resuming with a larger value continues the same run. On resume the run
    keeps its own settings except those passed in ``overrides`` (e.g. ``beta_end``, to fine-tune onto another noise
    schedule; the architecture cannot change). ``init=FOLDER`` (or ``"toyworld"``, the shipped model) starts a new run
    from a saved model instead of from scratch: its VAE is kept (a VAE phase of 0 minutes: the pool is only encoded),
    the UNet and text encoder are fine-tuned.

    ``arch="flux"`` trains the FLUX-architecture variant (:mod:`.flux`); its ``init`` (default ``"toyworld"``) is a
    UNet model folder, whose VAE (kept) and CLIP text encoder it starts from, or a flux folder, fine-tuned whole (its
    architecture is taken from it). A resumed run keeps its architecture: ``arch``, if given, must be the run's.
    """
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it or choose another -o")
    arch = overrides.pop("arch", None)
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")
    if arch == "flux":
        if not (resume and ckpt.exists()):
            overrides = _flux_start(overrides)
    elif arch == "video":
        if overrides.get("init"):
            raise ValueError("--init: toyworld-video trains from scratch (resume a video run with --resume)")
        if not (resume and ckpt.exists()):  # clips cost ~17 scenes each: a smaller pool, VAE batches, longer VAE
            overrides = {"pool_size": 8192, "vae_batch": 2, "vae_minutes": 30.0, **overrides}
    elif overrides.get("init"):  # fine-tuning: the folder's architecture and schedule, no VAE phase
        init = model_folder(str(overrides["init"]))
        if not (init / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"--init {init}: not a toyworld model folder (no unet/config.json)")
        channels = tuple(json.loads((init / "unet" / "config.json").read_text())["block_out_channels"])
        beta_end = json.loads((init / "scheduler" / "scheduler_config.json").read_text())["beta_end"]
        overrides = {"beta_end": beta_end, **overrides, "init": str(overrides["init"]), "vae_minutes": 0.0,
                     "unet_channels": channels}
    cfg = TrainConfig(minutes=minutes, **overrides, **({"arch": arch} if arch else {}))
    _check_arch(cfg)
    if not resume and cfg.vae_minutes >= cfg.minutes:
        raise ValueError(f"the VAE's {cfg.vae_minutes} minutes must be fewer than the {cfg.minutes} in all "
                         f"(the UNet needs time too)")
    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(ckpt, weights_only=False) if resume and ckpt.exists() else None
    if state is not None:  # the run's own settings (architecture included) but the budget and explicit overrides
        if _ARCHITECTURE & overrides.keys():
            raise ValueError("a resumed run keeps its architecture and starting point (unet_channels, flux sizes, "
                             "init)")
        if arch is not None and arch != state["config"].get("arch", "sd"):
            raise ValueError(f"{out} holds a training run of the {state['config'].get('arch', 'sd')} architecture, "
                             f"not {arch}; a resumed run keeps its architecture")
        cfg = TrainConfig(**{**_OLDER_RUNS, **state["config"], **overrides, "minutes": minutes})
        _check_arch(cfg)
    trainer = _Trainer(out, cfg, log)
    if state is not None:
        trainer.restore(state)
        log(f"resumed at {trainer.elapsed / 60:.1f} min, phase {trainer.phase}, step {trainer.step}")
    trainer.build_pool()
    if trainer.phase == "pool":
        trainer.phase = "vae"
    with _continues_counted(trainer.clock):
        if trainer.phase == "vae":
            trainer.vae_loop()
        if trainer.phase == "unet":
            trainer.unet_loop()
    trainer.checkpoint()
    if trainer.phase != "unet" or trainer.step == 0:
        log(f"stopped before the {trainer.name} phase; resume with a larger --minutes")
        return out
    entry = trainer.quick_eval() if cfg.final_eval else None
    info = {"trained_minutes": round(trainer.elapsed / 60, 1), "steps": trainer.step, "vae_steps": trainer.vae_step,
            "config": asdict(cfg), "last_eval": entry}
    path = trainer.save(out / "model", info)
    log(f"saved {path}")
    return path


#: settings that fix a run's networks and starting point (a resumed run keeps them)
_ARCHITECTURE = frozenset({"unet_channels", "flux_blocks", "flux_heads", "flux_head_dim", "video_layers", "init"})


def _check_arch(cfg: TrainConfig) -> None:
    """Refuse the UNet-only options (the grounding loss and in-context references hook a UNet's attention) in a
    flux or video run."""
    if cfg.arch != "sd":
        unet_only = [f"--{n}" for n, v in (("grounding", cfg.grounding_weight), ("references", cfg.reference_fraction))
                     if v]
        if unet_only:
            raise ValueError(f"{' and '.join(unet_only)}: for the UNet (sd) architecture only, not --arch {cfg.arch}")


def _flux_start(overrides: dict) -> dict:
    """The settings of a new flux run: its starting folder (``init``, default the shipped model), no VAE phase (the
    VAE is kept) and, from a flux folder, the folder's architecture."""
    ref = str(overrides.get("init") or "toyworld")
    init = model_folder(ref)
    sizes = {}
    if (init / "transformer" / "config.json").is_file():  # a flux model: fine-tuned whole, its architecture kept
        c = json.loads((init / "transformer" / "config.json").read_text())
        sizes = {"flux_blocks": (c["num_layers"], c["num_single_layers"]), "flux_heads": c["num_attention_heads"],
                 "flux_head_dim": c["attention_head_dim"]}
    elif not (init / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"--init {init}: not a toyworld model folder (no unet/ or transformer/config.json)")
    return {**overrides, **sizes, "init": ref, "vae_minutes": 0.0}
