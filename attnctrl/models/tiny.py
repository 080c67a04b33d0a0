"""Tiny, random, offline pipelines with the topology of the real models, for tests, demos and benchmarks.

Every family is built in code in well under a second, deterministically from ``seed``, in ``eval()`` mode, with
the real CLIP tokenizer (so token indices match real checkpoints). They draw noise: they exist to exercise the
attention machinery, not to make pictures (the embedded default model does that).

| family      | pipeline                   | denoiser                         | attention processors        | default size |
|-------------|----------------------------|----------------------------------|-----------------------------|--------------|
| ``sd15``    | StableDiffusionPipeline    | UNet, 4 levels, SD 1.5 layout    | 32 (16 self + 16 cross)     | 128 x 128    |
| ``sd21``    | StableDiffusionPipeline    | UNet, linear proj., v-prediction | 32                          | 128 x 128    |
| ``sdxl``    | StableDiffusionXLPipeline  | UNet, 3 levels, 1/2/2 layers     | 28 (14 self + 14 cross)     | 128 x 128    |
| ``flux``    | FluxPipeline               | 2 double- + 2 single-stream      | 4                           | 128 x 128    |
| ``cogvideox``| CogVideoXPipeline         | 2 blocks, RoPE (5B-style)        | 2                           | 9 x 64 x 64  |
"""

from __future__ import annotations

import torch

from .tokenizers import clip_tokenizer, t5_tokenizer

__all__ = ["TINY_FAMILIES", "tiny_pipeline"]

TINY_FAMILIES = ("sd15", "sd21", "sdxl", "flux", "cogvideox")


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


def _clip_text_encoder(seed: int, vocab_size: int, with_projection: bool = False, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
        projection_dim=32, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act=hidden_act, attention_dropout=0.0,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def _t5_encoder(seed: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: T5EncoderModel(config))


def _vae(seed: int, **extra):
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 8, 8),
        norm_num_groups=4, sample_size=128, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, **extra,
    ))


def _sd(seed: int, v2: bool):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
        # diffusers' ``attention_head_dim`` is the number of heads for these UNets (a naming quirk)
        attention_head_dim=(1, 1, 2, 2) if v2 else 2, use_linear_projection=v2, upcast_attention=v2,
    ))
    tokenizer = clip_tokenizer(pad_token="!" if v2 else "<|endoftext|>")
    text_encoder = _clip_text_encoder(seed + 1, len(tokenizer), hidden_act="gelu" if v2 else "quick_gelu")
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="v_prediction" if v2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(32, 64, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    ))
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 2), text_encoder=_clip_text_encoder(seed + 1, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(seed + 3, len(tokenizer_2), with_projection=True, hidden_act="gelu"),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=False,
    ))
    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(
            seed + 2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_encoder(seed + 1, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(seed + 3, len(tokenizer_2)), tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.default_sample_size = 16  # 128 px by default instead of FLUX's 1024 px
    return pipe


def _cogvideox(seed: int):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = _seeded(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
    ))
    vae = _seeded(seed + 2, lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ))
    tokenizer = t5_tokenizer(model_max_length=226)
    scheduler = CogVideoXDDIMScheduler(
        timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction",
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(seed + 1, len(tokenizer)), vae=vae, transformer=transformer,
        scheduler=scheduler,
    )


_BUILDERS = {
    "sd15": lambda seed: _sd(seed, v2=False),
    "sd21": lambda seed: _sd(seed, v2=True),
    "sdxl": _sdxl,
    "flux": _flux,
    "cogvideox": _cogvideox,
}


def tiny_pipeline(family: str, seed: int = 0):
    """Build the tiny offline pipeline of ``family`` (one of :data:`TINY_FAMILIES`), deterministically from ``seed``."""
    try:
        build = _BUILDERS[family]
    except KeyError:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}") from None
    pipe = build(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe
