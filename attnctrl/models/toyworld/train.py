"""Train the toyworld text-to-image model from scratch on CPU (``attnctrl train-toy``).

An SD-style latent diffusion model built only from standard diffusers/transformers classes:

* ``AutoencoderKL`` (0.95 M parameters, block_out_channels (32, 64, 64): 64x64 RGB <-> 16x16x4 latents);
* ``CLIPTextModel`` (hidden 128, 3 layers) trained jointly with the UNet, and a word-level ``CLIPTokenizer``
  (a tiny BPE over the toyworld vocabulary, so each word is one ``word</w>`` token; 32 tokens max);
* ``UNet2DConditionModel`` (5.9 M parameters, block_out_channels (64, 128, 128), self- and cross-attention at
  16x16 and 8x8 and in the 4x4 mid block, 4 heads, cross_attention_dim 128).

Recipe: a fixed pool of procedurally drawn scenes (:mod:`.world`, held-out colour-shape combinations excluded), the
VAE first (L1 + MSE + 1e-6 KL; 20 minutes: at 10 it confuses yellow/orange and red/orange, and the log reports the
colour fidelity of its reconstructions), then the latents of the pool are cached and the UNet and text encoder are
trained with epsilon prediction on the scaled-linear schedule, min-SNR-5 loss weighting (the clean-image weight
kept >= 0.1 at high noise), 10 % caption dropout for classifier-free guidance, horizontal flips (with "left"/"right"
swapped in the caption), AdamW with warm-up and a cosine decay over the time budget, and EMA weights (0.999), which
are what gets saved. Options for attention like SD's: a grounding loss on the cross-attention of object words
(``grounding_weight``), look-alike scenes (``look_alike_fraction``) and in-context references in the decoder's
self-attention (``reference_fraction``, :class:`_ReferenceAttention`). Training is resumable from
``DIR/checkpoint.pt`` and can start from a saved model (``init``); the result is a standard diffusers folder
``DIR/model`` (fp16 weights) that ``StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..loading import model_folder
from .world import COLOURS, IMAGE_SIZE, PATTERNS, SHAPES, SIZES, VOCABULARY, make_scene, object_mask, render

__all__ = ["TrainConfig", "train", "toy_tokenizer", "build_models", "save_pipeline", "min_snr_weights", "RECOMMENDED"]

#: generation settings stored with the model (``attnctrl.json``) and used by attnctrl's surfaces by default
RECOMMENDED = {"num_inference_steps": 25, "guidance_scale": 5.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
MAX_TOKENS = 32


@dataclass
class TrainConfig:
    minutes: float = 90.0  # training-time budget, across resumes
    vae_minutes: float = 20.0
    # UNet widths per level; every level but the last has self- and cross-attention (latent 16, 8, 4 tokens a side)
    unet_channels: tuple[int, ...] = (64, 128, 128, 128)
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
    # Fraction of each batch trained with in-context references (see _ReferenceAttention): one or two objects of the
    # scene lose their look words and a pool scene holding an object of the same look and shape is put in the decoder
    # self-attention as a masked reference, so looks are copied from references as SD copies them; 0 = off.
    reference_fraction: float = 0.0
    # Scaled-linear betas end at 0.02, not SD's 0.012: at SD's end a 16x16x4 latent keeps enough signal at t = 999
    # (sqrt(alpha_bar) = 0.068) for the model to read the layout from x_t and all but ignore the caption at the
    # highest noise levels (measured in docs/toyworld.md).
    beta_end: float = 0.02
    ema_decay: float = 0.999
    seed: int = 0
    # fine-tune a saved toyworld folder instead of training from scratch (its VAE is kept: a 0-minute VAE phase)
    init: str | None = None
    checkpoint_minutes: float = 10.0
    eval_minutes: float = 20.0
    final_eval: bool = True


def _learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every word of ``words`` into one ``word</w>`` token (deterministic BPE)."""
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        counts: Counter = Counter()
        for s in seqs.values():
            counts.update(zip(s, s[1:]))
        if not counts:
            return merges
        best = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best)
        merges.append(pair)
        joined = pair[0] + pair[1]
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out


def toy_tokenizer(model_max_length: int = MAX_TOKENS):
    """A ``CLIPTokenizer`` whose BPE turns each toyworld word into one token (unknown words fall back to bytes)."""
    from transformers import CLIPTokenizer

    from ..tokenizers import _bytes_to_unicode

    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(VOCABULARY)
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    for word in VOCABULARY:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:  # pragma: no cover - guarded by the tests
            raise RuntimeError(f"toy tokenizer splits {word!r} into {tok.convert_ids_to_tokens(ids)}")
    return tok


def build_models(tokenizer, seed: int = 0, unet_channels: tuple[int, ...] = TrainConfig.unet_channels):
    """Fresh (random) VAE, text encoder and UNet of the toyworld architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    ))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (len(unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(unet_channels) - 1), cross_attention_dim=128,
        attention_head_dim=4, norm_num_groups=32,
    )
    return vae, text_encoder, unet


def _scheduler(beta_end: float = TrainConfig.beta_end):
    """The training schedule; sampling starts at t = 999 ("trailing" spacing) where the training noise is purest."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=beta_end, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing", num_train_timesteps=1000)


def min_snr_weights(scheduler, gamma: float = 5.0, floor: float = 0.0) -> torch.Tensor:
    """Per-timestep epsilon-loss weights ``clamp(SNR_t, floor, gamma) / SNR_t``: min-SNR-gamma (Hang et al. 2023),
    whose clean-image weight ``min(SNR_t, gamma)`` is also kept >= ``floor`` (truncated-SNR style) at high noise."""
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    return torch.clamp(snr, min=floor, max=gamma) / snr


def save_pipeline(path: Path, vae, text_encoder, tokenizer, unet, info: dict | None = None,
                  beta_end: float = TrainConfig.beta_end) -> Path:
    """Save a standard diffusers ``StableDiffusionPipeline`` folder with fp16 weights and ``attnctrl.json``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text_encoder).half(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(), scheduler=_scheduler(beta_end), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "attnctrl.json").write_text(json.dumps({"recommended": RECOMMENDED, **(info or {})}, indent=2) + "\n")
    return path


def cosine_factor(progress: float) -> float:
    """The learning-rate factor of toyworld's training runs: a cosine from 1 to 0.1 over ``progress`` in [0, 1]."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _swap_sides(caption: str) -> str:
    return caption.replace("left", "\0").replace("right", "left").replace("\0", "right")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


_LATENT = IMAGE_SIZE // 4  # 16: the latent grid (the VAE downsamples 4x)
_OBJECT_WORDS = frozenset((*COLOURS, *SHAPES, *PATTERNS, *SIZES))


def _grounding_targets(scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object (up to 3): its silhouette's coverage of each latent cell (uint8, 255 = covered) and the token
    positions of its words in the caption (size, pattern, colour, shape; -1 = none). The toy tokenizer gives one
    token per word after ``<|startoftext|>``, and the caption names the objects in order, one "and"-phrase each."""
    masks = torch.zeros(3, _LATENT, _LATENT, dtype=torch.uint8)
    words = torch.full((3, 4), -1, dtype=torch.int8)
    position = 1
    for i, phrase in enumerate(scene.caption.split(" and ")):
        found = [position + j for j, w in enumerate(phrase.split()) if w in _OBJECT_WORDS]
        words[i, : len(found)] = torch.tensor(found[:4], dtype=torch.int8)
        position += len(phrase.split()) + 1  # the phrase and the "and" after it
        cover = np.asarray(object_mask(scene, i), np.float32).reshape(_LATENT, 4, _LATENT, 4).mean((1, 3))
        masks[i] = torch.from_numpy(np.round(cover).astype(np.uint8))
    return masks, words


class _CrossAttentionRecorder:
    """Training-time cross-attention processor of a UNet's ``attn2`` layers (math as diffusers' ``AttnProcessor``)
    that keeps each call's head-averaged probabilities ``(batch, queries, tokens)`` while ``maps`` is a list."""

    def __init__(self, unet):
        self.unet, self.maps = unet, None
        self.before = unet.attn_processors
        unet.set_attn_processor({name: self if name.endswith("attn2.processor") else proc
                                 for name, proc in self.before.items()})

    def remove(self) -> None:
        self.unet.set_attn_processor(self.before)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        if self.maps is not None:
            self.maps.append(probs.unflatten(0, (-1, attn.heads)).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def grounding_terms(maps: list[torch.Tensor], masks: torch.Tensor, words: torch.Tensor):
    """TokenCompose's two grounding terms for every object word at every recorded cross-attention layer (16x16 down
    to the 2x2 mid block, CLoRA's maps on toyworld): ``inside``, the fraction of the word's attention mass over the
    image that falls inside its object (L_token = mean((1 - inside)^2)), and ``pixel``, the binary cross-entropy
    between the word's map scaled to peak 1 and its object's coverage (L_pixel: the map should fill the object, not
    one cell of it). ``maps``: ``(B, Q, T)`` each; ``masks``: ``(B, 3, 16, 16)`` coverage in [0, 1]; ``words``:
    ``(B, 3, 4)`` token positions, -1 = none. Returns both, flattened over the valid (layer, word) pairs."""
    valid = words >= 0
    inside, pixel = [torch.zeros(0)], [torch.zeros(0)]
    for probs in maps:
        side = math.isqrt(probs.shape[1])
        cover = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (B, 3, Q)
        index = words.clamp(min=0).flatten(1)[:, None, :].expand(-1, probs.shape[1], -1)
        per_word = probs.gather(2, index).unflatten(2, words.shape[1:])  # (B, Q, 3, 4)
        inside.append((torch.einsum("bqow,boq->bow", per_word, cover) / per_word.sum(1).clamp_min(1e-12))[valid])
        scaled = (per_word / per_word.amax(1, keepdim=True).clamp_min(1e-12)).clamp(1e-6, 1 - 1e-6)
        target = cover.transpose(1, 2)[..., None].expand_as(scaled)
        pixel.append(F.binary_cross_entropy(scaled, target, reduction="none").mean(1)[valid])
    return torch.cat(inside), torch.cat(pixel)


class _ReferenceAttention:
    """Training-time self-attention with in-context references for the layers FreeCustom, MagicFace and IR-Diffusion
    use (``"decoder-high-res"``; math as diffusers' ``AttnProcessor2_0`` everywhere else). The UNet batch is
    ``[targets; references]``; while ``plan`` is set, target ``b`` attends to one softmax over its own keys and the
    keys of its references ``plan["slots"][b]`` (row offsets into the references, -1 = none), each reference's keys
    biased by ``plan["weights"][b, s]`` inside its object mask and -inf outside: FreeCustom's MRSA (spec §3.5) with
    the bonus drawn at random so that any of the methods' bonuses is in the trained range. Reference rows attend to
    themselves only, as at inference."""

    def __init__(self, unet):
        from ...core.layers import describe

        self.unet, self.plan = unet, None
        self.before = unet.attn_processors
        chosen = {layer.name for layer in describe(unet).select("decoder-high-res") if layer.kind == "self"}
        unet.set_attn_processor({name: self if name in chosen else proc for name, proc in self.before.items()})

    def remove(self) -> None:
        self.unet.set_attn_processor(self.before)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q, k, v = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        q, k, v = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))  # (N, heads, L, d)
        if self.plan is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            slots, weights, masks = self.plan["slots"], self.plan["weights"], self.plan["masks"]
            n_tgt, side = slots.shape[0], math.isqrt(q.shape[2])
            rows = n_tgt + slots.clamp(min=0)  # (B, S) rows of the references in the batch
            inside = F.interpolate(masks[:, None], size=(side, side), mode="nearest").flatten(1) > 0.5  # (R, L)
            allowed = inside[slots.clamp(min=0)] & (slots >= 0)[..., None]  # (B, S, L)
            bias = torch.where(allowed, weights[..., None], float("-inf")).flatten(1)  # (B, S*L)
            bias = torch.cat([bias.new_zeros(n_tgt, q.shape[2]), bias], 1)[:, None, None]
            keys = torch.cat([k[:n_tgt], *k[rows].unbind(1)], 2)
            values = torch.cat([v[:n_tgt], *v[rows].unbind(1)], 2)
            out = torch.cat([F.scaled_dot_product_attention(q[:n_tgt], keys, values, attn_mask=bias.to(q.dtype)),
                             F.scaled_dot_product_attention(q[n_tgt:], k[n_tgt:], v[n_tgt:])])
        out = out.transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def _drop_looks(caption: str, positions) -> str:
    """``caption`` without the pattern and colour words among the token ``positions`` (1-based words; -1 = none)."""
    words = caption.split()
    drop = {int(p) - 1 for p in positions if p >= 0 and words[int(p) - 1] in (*COLOURS, *PATTERNS)}
    return " ".join(w for i, w in enumerate(words) if i not in drop)


class _Trainer:
    def __init__(self, out: Path, cfg: TrainConfig, log: Callable[[str], None]):
        self.out, self.cfg, self.log = out, cfg, log
        self.tokenizer = toy_tokenizer()
        self.vae, self.text_encoder, self.unet = build_models(self.tokenizer, cfg.seed, cfg.unet_channels)
        self.scheduler = _scheduler(cfg.beta_end)
        self.phase = "pool"
        self.elapsed = 0.0
        self.step = 0
        self.vae_step = 0
        self.ema_unet = self.ema_text = None
        self.opt = self.vae_opt = None
        self.scaling = 1.0
        self.history: list[dict] = []
        if cfg.init:
            self._load_init(model_folder(cfg.init))

    def _load_init(self, folder: Path) -> None:
        from safetensors.torch import load_file

        for name, module in (("vae", self.vae), ("text_encoder", self.text_encoder), ("unet", self.unet)):
            files = sorted((folder / name).glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"--init {folder}: no {name}/*.safetensors (not a toyworld model folder)")
            try:
                module.load_state_dict({k: v.float() for k, v in load_file(files[0]).items()})
            except RuntimeError as e:
                raise ValueError(f"--init {folder}: its {name} is not the toyworld architecture with unet_channels="
                                 f"{self.cfg.unet_channels} ({str(e).splitlines()[0]})") from None
        self.scaling = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
        self.log(f"initialised from {folder} (VAE kept, scaling factor {self.scaling:.3f})")

    # -- data ------------------------------------------------------------------------------------------------------
    def _pool_scene(self, i: int):
        """Scene ``i`` of the run's pool (look-alike scenes evenly spread over it)."""
        look_alike = (i * 0.6180339887) % 1.0 < self.cfg.look_alike_fraction
        return make_scene(self.cfg.seed * 10_000_000 + i, look_alike=look_alike)

    def build_pool(self) -> None:
        path = self.out / "pool.pt"
        if path.exists():
            pool = torch.load(path)
            self.images, self.captions = pool["images"], pool["captions"]
            self.masks, self.words = pool.get("masks"), pool.get("words")
            self.log(f"pool: {len(self.captions)} scenes loaded from {path}")
            if (self.cfg.grounding_weight or self.cfg.reference_fraction) and self.masks is None:
                raise ValueError(f"{path} was built without object masks; the grounding loss and reference training "
                                 f"need a new run folder")
        else:
            started = time.perf_counter()
            n = self.cfg.pool_size
            images = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
            masks = torch.zeros(n, 3, _LATENT, _LATENT, dtype=torch.uint8)
            words = torch.full((n, 3, 4), -1, dtype=torch.int8)
            captions = []
            for i in range(n):
                scene = self._pool_scene(i)
                images[i] = torch.from_numpy(np.array(render(scene)))
                captions.append(scene.caption)
                masks[i], words[i] = _grounding_targets(scene)
                if (i + 1) % 4096 == 0:
                    self.log(f"pool: {i + 1}/{n} scenes ({time.perf_counter() - started:.0f} s)")
            self.images, self.captions, self.masks, self.words = images, captions, masks, words
            _atomic_save({"images": images, "captions": captions, "masks": masks, "words": words}, path)
        if self.cfg.reference_fraction:
            self._index_looks()

    def _index_looks(self) -> None:
        """Each pool scene's object looks (colour, shape, pattern), rebuilt from the scene seeds, and where each look
        occurs in the pool (the candidate references of reference training)."""
        self.looks, self.by_look = [], {}
        for i, caption in enumerate(self.captions):
            scene = self._pool_scene(i)
            if scene.caption != caption:
                raise ValueError(f"pool scene {i} is not the scene of its seed ({caption!r} vs {scene.caption!r}): "
                                 f"the pool was built with other settings; reference training needs a new run folder")
            self.looks.append([(o.colour, o.shape, o.pattern) for o in scene.objects])
            for k, look in enumerate(self.looks[-1]):
                self.by_look.setdefault(look, []).append((i, k))

    def _references(self, idx: torch.Tensor, captions: list[str], gen: torch.Generator) -> dict | None:
        """Reference training's draw for a batch (captions edited in place): the first ``reference_fraction`` of the
        items (``idx`` is random) each get one or two of their objects' looks dropped from the caption and, for each,
        a pool scene holding an object of the same look and shape as a reference (its latent, mask, caption or "",
        and a random MRSA bonus in [0, 3]; ``sources``: (scene, object, target's object) per reference). None if no
        item got a reference."""
        slots = torch.full((len(idx), 2), -1, dtype=torch.long)
        weights = torch.zeros(len(idx), 2)
        sources = []  # (scene, its object, the target's object) per reference, in row order
        for b in range(round(len(idx) * self.cfg.reference_fraction)):
            i = int(idx[b])
            count = 2 if len(self.looks[i]) > 1 and torch.rand(1, generator=gen).item() < 0.5 else 1
            chosen = torch.randperm(len(self.looks[i]), generator=gen)[:count].tolist()
            dropped = []
            for s, k in enumerate(chosen):
                candidates = self.by_look[self.looks[i][k]]
                j, o = candidates[int(torch.randint(len(candidates), (1,), generator=gen))]
                if j == i:  # the scene itself (or a look seen once in the pool): no reference for this object
                    continue
                slots[b, s], weights[b, s] = len(sources), 3 * torch.rand(1, generator=gen).item()
                sources.append((j, o, k))
                dropped += self.words[i, k].tolist()
            captions[b] = _drop_looks(captions[b], dropped)
        if not sources:
            return None
        ref, obj, _ = torch.tensor(sources).unbind(1)
        flip = torch.rand(len(sources), generator=gen) < 0.5
        latents = self._latents(ref, flip, gen)
        masks = self.masks[ref, obj].float() / 255
        keep = torch.rand(len(sources), generator=gen) < 0.5
        ref_captions = [(_swap_sides(self.captions[j]) if f else self.captions[j]) if c else ""
                        for j, f, c in zip(ref.tolist(), flip.tolist(), keep.tolist())]
        return {"slots": slots, "weights": weights, "owner": (slots >= 0).nonzero()[:, 0], "latents": latents,
                "masks": torch.where(flip[:, None, None], masks.flip(-1), masks), "captions": ref_captions,
                "sources": sources}

    def _latents(self, idx: torch.Tensor, flip: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled latents of pool scenes ``idx`` sampled from their cached VAE posteriors, flipped where ``flip``."""
        mean, logvar = self.lat_mean[idx].float(), self.lat_logvar[idx].float()
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * self.scaling
        return torch.where(flip[:, None, None, None], latents.flip(-1), latents)

    def _pixels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0

    # -- VAE ---------------------------------------------------------------------------------------------------------
    def vae_loop(self) -> None:
        cfg = self.cfg
        if self.vae_opt is None:
            self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.vae.train()
        gen = torch.Generator().manual_seed(cfg.seed + self.vae_step)
        total = cfg.vae_minutes * 60
        while self.elapsed < total:
            t0 = time.perf_counter()
            x = self._pixels(torch.randint(0, len(self.captions), (cfg.vae_batch,), generator=gen))
            post = self.vae.encode(x).latent_dist
            rec = self.vae.decode(post.sample(generator=gen)).sample
            loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
            lr = cfg.vae_lr * cosine_factor(self.elapsed / total)
            for g in self.vae_opt.param_groups:
                g["lr"] = lr
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vae_step += 1
            self.elapsed += time.perf_counter() - t0
            if self.vae_step % 50 == 0:
                psnr = -10 * math.log10(F.mse_loss(rec, x).item() / 4)
                self.log(f"vae step {self.vae_step}: loss {loss.item():.4f}, PSNR {psnr:.1f} dB, "
                         f"{self.elapsed / 60:.1f} min")
        if self.elapsed >= total:
            self.finish_vae()

    @torch.no_grad()
    def finish_vae(self) -> None:
        self.vae.eval()
        means, logvars = [], []
        for start in range(0, len(self.captions), 256):
            post = self.vae.encode(self._pixels(torch.arange(start, min(start + 256, len(self.captions))))).latent_dist
            means.append(post.mean.half())
            logvars.append(post.logvar.half())
        self.lat_mean, self.lat_logvar = torch.cat(means), torch.cat(logvars)
        if not self.cfg.init:
            self.scaling = float(1.0 / self.lat_mean.float().std())
        self.vae.register_to_config(scaling_factor=self.scaling)
        rec = self.vae.decode(self.lat_mean[:64].float()).sample
        psnr = -10 * math.log10(F.mse_loss(rec, self._pixels(torch.arange(64))).item() / 4)
        self.log(f"vae done: pool encoded, scaling factor {self.scaling:.3f}, reconstruction PSNR {psnr:.1f} dB, "
                 f"right colour on reconstructions {self._colour_fidelity(rec):.0%}")
        self.phase = "unet"

    def _colour_fidelity(self, rec: torch.Tensor) -> float:
        """Fraction of objects whose colour :func:`score` reads right on VAE reconstructions of pool scenes (those whose
        caption names every object's colour)."""
        from PIL import Image

        from .score import CaptionError, score

        pixels = ((rec.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
        hits = []
        for image, caption in zip(pixels, self.captions):
            try:
                hits += [obj["colour"] for obj in score(Image.fromarray(image), caption)["objects"]]
            except CaptionError:  # a look-alike scene's copies name no colour
                continue
        return sum(hits) / max(1, len(hits))

    # -- UNet + text encoder -------------------------------------------------------------------------------------
    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids

    def unet_loop(self) -> None:
        cfg = self.cfg
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        if self.opt is None:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
            self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
            self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()
        references = _ReferenceAttention(self.unet) if cfg.reference_fraction else None
        recorder = _CrossAttentionRecorder(self.unet) if cfg.grounding_weight else None
        alphas = self.scheduler.alphas_cumprod
        weights = min_snr_weights(self.scheduler, cfg.min_snr_gamma, cfg.x0_weight_floor)
        gen = torch.Generator().manual_seed(cfg.seed * 7 + self.step)
        budget = cfg.minutes * 60
        unet_start = cfg.vae_minutes * 60
        next_ckpt = self.elapsed + cfg.checkpoint_minutes * 60
        next_eval = self.elapsed + cfg.eval_minutes * 60
        smooth = smooth_inside = None
        while self.elapsed < budget:
            t0 = time.perf_counter()
            idx = torch.randint(0, len(self.captions), (cfg.batch,), generator=gen)
            flip = torch.rand(cfg.batch, generator=gen) < 0.5
            latents = self._latents(idx, flip, gen)
            captions = [self.captions[i] for i in idx.tolist()]
            refs = self._references(idx, captions, gen) if references is not None else None
            captions = [_swap_sides(c) if f else c for c, f in zip(captions, flip)]
            drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            t = torch.randint(0, len(alphas), (cfg.batch,), generator=gen)
            if refs is not None:  # references share their target's timestep (re-noised as at inference)
                latents = torch.cat([latents, refs["latents"]])
                t = torch.cat([t, t[refs["owner"]]])
                captions += refs["captions"]
                references.plan = refs
            noise = torch.randn(latents.shape, generator=gen)
            noisy = self.scheduler.add_noise(latents, noise, t)
            context = self.text_encoder(self._tokens(captions))[0]
            if recorder is not None:
                recorder.maps = []
            pred = self.unet(noisy, t, context).sample
            if references is not None:
                references.plan = None
            loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * weights[t]).mean()
            if recorder is not None:
                masks = self.masks[idx].float() / 255
                masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
                words = torch.where(drop[:, None, None], -1, self.words[idx].long())
                if refs is not None:  # captions that lost look words: their word positions moved
                    words[(refs["slots"] >= 0).any(1)] = -1
                inside, pixel = grounding_terms([m[: cfg.batch] for m in recorder.maps], masks, words)
                recorder.maps = None
                if inside.numel():  # every caption of the batch dropped: no word to ground
                    loss = loss + cfg.grounding_weight * (((1 - inside) ** 2).mean() + pixel.mean())
                    mean = inside.mean().item()
                    smooth_inside = mean if smooth_inside is None else 0.98 * smooth_inside + 0.02 * mean
            progress = min(1.0, (self.elapsed - unet_start) / max(1.0, budget - unet_start))
            lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) * cosine_factor(progress)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            self.step += 1
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text_encoder)):
                    for pe, pl in zip(ema.parameters(), live.parameters()):
                        pe.lerp_(pl, 1 - decay)
            self.elapsed += time.perf_counter() - t0
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
        if recorder is not None:
            recorder.remove()
        if references is not None:
            references.remove()

    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.ema_text, tokenizer=self.tokenizer, unet=self.ema_unet,
            scheduler=_scheduler(self.cfg.beta_end), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def quick_eval(self) -> dict:
        from .bench import benchmark_captions, evaluate, evaluate_look_alike

        started = time.perf_counter()
        captions = benchmark_captions()
        single = evaluate(self.pipeline(), captions["single"][::2], steps=20)
        two = evaluate(self.pipeline(), captions["two"][::4], steps=20)
        look = evaluate_look_alike(self.pipeline(), n=16, steps=20)
        self.unet.train()
        self.text_encoder.train()
        entry = {"step": self.step, "minutes": round(self.elapsed / 60, 1), "single": single, "two": two,
                 "look_alike": look}
        self.history.append(entry)
        self.log(f"eval at step {self.step}: single colour {single['colour']:.2f} shape {single['shape']:.2f} side "
                 f"{single['side']:.2f}; two-object colour {two['colour']:.2f} shape {two['shape']:.2f}; look-alike same "
                 f"colour {look['same']:.2f} ({time.perf_counter() - started:.0f} s, not counted)")
        return entry

    # -- state ------------------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        state = {
            "config": asdict(self.cfg), "phase": self.phase, "elapsed": self.elapsed, "step": self.step,
            "vae_step": self.vae_step, "scaling": self.scaling, "history": self.history,
            "vae": self.vae.state_dict(), "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(),
            "vae_opt": self.vae_opt.state_dict() if self.vae_opt else None,
            "opt": self.opt.state_dict() if self.opt else None,
            "ema_unet": self.ema_unet.state_dict() if self.ema_unet else None,
            "ema_text": self.ema_text.state_dict() if self.ema_text else None,
        }
        if self.phase == "unet":
            state["latents"] = (self.lat_mean, self.lat_logvar)
        _atomic_save(state, self.out / "checkpoint.pt")
        self.log(f"checkpoint saved at {self.elapsed / 60:.1f} min (step {self.step})")

    def restore(self, state: dict) -> None:
        self.phase, self.elapsed, self.step = state["phase"], state["elapsed"], state["step"]
        self.vae_step, self.scaling, self.history = state["vae_step"], state["scaling"], state.get("history", [])
        self.vae.load_state_dict(state["vae"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.unet.load_state_dict(state["unet"])
        if state["vae_opt"] is not None:
            self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.vae_lr)
            self.vae_opt.load_state_dict(state["vae_opt"])
        if state["opt"] is not None:
            params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
            self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=1e-2)
            self.opt.load_state_dict(state["opt"])
            self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
            self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
            self.ema_unet.load_state_dict(state["ema_unet"])
            self.ema_text.load_state_dict(state["ema_text"])
        if self.phase == "unet":
            self.lat_mean, self.lat_logvar = state["latents"]
            self.vae.register_to_config(scaling_factor=self.scaling)
            self.vae.eval()


def train(out_dir: str | os.PathLike, minutes: float = 90.0, resume: bool = False,
          log: Callable[[str], None] = print, **overrides) -> Path:
    """Train (or resume training) into ``out_dir``; returns the path of the saved diffusers folder ``out_dir/model``.

    ``minutes`` is the training-time budget across resumes (building and encoding the scene pool, checkpoints and
    the periodic evaluations are not counted); resuming with a larger value continues the same run. On resume the run
    keeps its own settings except those passed in ``overrides`` (e.g. ``beta_end``, to fine-tune onto another noise
    schedule; the architecture cannot change). ``init=FOLDER`` (or ``"toyworld"``, the shipped model) starts a new run
    from a saved model instead of from scratch: its VAE is kept (a VAE phase of 0 minutes: the pool is only encoded),
    the UNet and text encoder are fine-tuned.
    """
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it or choose another -o")
    if overrides.get("init"):  # fine-tuning: the folder's architecture and schedule, no VAE phase
        init = model_folder(str(overrides["init"]))
        if not (init / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"--init {init}: not a toyworld model folder (no unet/config.json)")
        channels = tuple(json.loads((init / "unet" / "config.json").read_text())["block_out_channels"])
        beta_end = json.loads((init / "scheduler" / "scheduler_config.json").read_text())["beta_end"]
        overrides = {"beta_end": beta_end, **overrides, "init": str(overrides["init"]), "vae_minutes": 0.0,
                     "unet_channels": channels}
    cfg = TrainConfig(minutes=minutes, **overrides)
    if not resume and cfg.vae_minutes >= cfg.minutes:
        raise ValueError(f"the VAE's {cfg.vae_minutes} minutes must be fewer than the {cfg.minutes} in all "
                         f"(the UNet needs time too)")
    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(ckpt, weights_only=False) if resume and ckpt.exists() else None
    if state is not None:  # the run's own settings (architecture included) but the budget and explicit overrides
        if "unet_channels" in overrides or "init" in overrides:
            raise ValueError("a resumed run keeps its architecture and starting point (unet_channels, init)")
        older = {"beta_end": 0.012, "x0_weight_floor": 0.0}  # runs saved before these settings existed
        cfg = TrainConfig(**{**older, **state["config"], **overrides, "minutes": minutes})
    trainer = _Trainer(out, cfg, log)
    if state is not None:
        trainer.restore(state)
        log(f"resumed at {trainer.elapsed / 60:.1f} min, phase {trainer.phase}, step {trainer.step}")
    trainer.build_pool()
    if trainer.phase == "pool":
        trainer.phase = "vae"
    if trainer.phase == "vae":
        trainer.vae_loop()
    if trainer.phase == "unet":
        trainer.unet_loop()
    trainer.checkpoint()
    if trainer.phase != "unet" or trainer.step == 0:
        log("stopped before the UNet phase; resume with a larger --minutes")
        return out
    entry = trainer.quick_eval() if cfg.final_eval else None
    info = {"trained_minutes": round(trainer.elapsed / 60, 1), "steps": trainer.step, "vae_steps": trainer.vae_step,
            "config": asdict(cfg), "last_eval": entry}
    path = save_pipeline(out / "model", trainer.vae, trainer.ema_text, trainer.tokenizer, trainer.ema_unet, info,
                         beta_end=cfg.beta_end)
    log(f"saved {path}")
    return path
