"""The toyworld model: its three networks, its noise schedule and the diffusers folder it is saved as.

Only standard diffusers/transformers classes:

* ``AutoencoderKL`` (0.95 M parameters, block_out_channels (32, 64, 64): 64x64 RGB <-> 16x16x4 latents);
* ``CLIPTextModel`` (hidden 128, 3 layers) with the word-level tokenizer of :mod:`.tokenizer` (32 tokens max);
* ``UNet2DConditionModel`` (block_out_channels :data:`UNET_CHANNELS`: self- and cross-attention at 16x16, 8x8 and
  4x4 and in the 2x2 mid block, 4 heads, cross_attention_dim 128);
* a ``DDIMScheduler`` on the scaled-linear schedule with betas ending at :data:`BETA_END`, sampling from t = 999.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .world import IMAGE_SIZE

__all__ = ["RECOMMENDED", "UNET_CHANNELS", "BETA_END", "build_vae", "build_text_encoder", "build_models", "noise_scheduler",
           "save_pipeline"]

#: generation settings stored with the model (``attnctrl.json``) and used by attnctrl's surfaces by default
RECOMMENDED = {"num_inference_steps": 25, "guidance_scale": 5.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
#: UNet widths per level; every level but the last has self- and cross-attention (latent 16, 8, 4 tokens a side)
UNET_CHANNELS = (64, 128, 128, 128)
# Scaled-linear betas end at 0.02, not SD's 0.012: at SD's end a 16x16x4 latent keeps enough signal at t = 999
# (sqrt(alpha_bar) = 0.068) for the model to read the layout from x_t and all but ignore the caption at the
# highest noise levels (measured in docs/toyworld.md).
BETA_END = 0.02


def build_vae(seed: int = 0):
    """A fresh (random) toyworld ``AutoencoderKL``: RGB <-> 4-channel latents downsampled 4x."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(tokenizer, seed: int = 1):
    """A fresh (random) toyworld ``CLIPTextModel`` (hidden 128, 3 layers) for ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    ))


def build_models(tokenizer, seed: int = 0, unet_channels: tuple[int, ...] = UNET_CHANNELS):
    """Fresh (random) VAE, text encoder and UNet of the toyworld architecture."""
    from diffusers import UNet2DConditionModel

    vae = build_vae(seed)
    text_encoder = build_text_encoder(tokenizer, seed + 1)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (len(unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(unet_channels) - 1), cross_attention_dim=128,
        attention_head_dim=4, norm_num_groups=32,
    )
    return vae, text_encoder, unet


def noise_scheduler(beta_end: float = BETA_END):
    """The training schedule; sampling starts at t = 999 ("trailing" spacing) where the training noise is purest."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=beta_end, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing", num_train_timesteps=1000)


def save_pipeline(path: Path, vae, text_encoder, tokenizer, unet, info: dict | None = None,
                  beta_end: float = BETA_END) -> Path:
    """Save a standard diffusers ``StableDiffusionPipeline`` folder with fp16 weights and ``attnctrl.json``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text_encoder).half(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(), scheduler=noise_scheduler(beta_end), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "attnctrl.json").write_text(json.dumps({"recommended": RECOMMENDED, **(info or {})}, indent=2) + "\n")
    return path
