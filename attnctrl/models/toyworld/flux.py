"""The FLUX-architecture variant of toyworld (``attnctrl train-toy --arch flux``): networks, tokenizer, flow schedule,
the rectified-flow loss and the saved ``FluxPipeline`` folder. The loop that trains it is :mod:`.train`'s, shared
with the UNet model.

Only standard diffusers/transformers classes, as a real FLUX.1 checkpoint has them:

* ``AutoencoderKL``: the shipped toyworld VAE, unchanged (4x downsampling, 4 latent channels), with FLUX's
  ``shift_factor`` / ``scaling_factor`` latent normalisation measured on the scene pool;
* ``CLIPTextModel`` (hidden 128) with the toyworld ``CLIPTokenizer``, started from the shipped model's trained text
  encoder: FLUX reads its pooled output only (``pooled_projection_dim`` 128);
* ``T5EncoderModel`` (d_model 128, 3 layers, gated-GELU as T5 v1.1) with :func:`t5_tokenizer`, a SentencePiece-style
  ``T5Tokenizer`` whose pieces are the toyworld words (one token per word); its sequence output is FLUX's text
  stream (``joint_attention_dim`` 128);
* ``FluxTransformer2DModel``: :data:`FLUX_BLOCKS` double-stream and single-stream blocks (FLUX.1's 19 : 38 ratio),
  :data:`FLUX_HEADS` heads of :data:`FLUX_HEAD_DIM`, no guidance embedding (``guidance_embeds=False``: classifier-free
  guidance is FluxPipeline's ``true_cfg_scale`` against the empty ``negative_prompt``), adaLN-Zero initialisation
  (DiT: every block starts as the identity, the output as zero);
* ``FlowMatchEulerDiscreteScheduler`` with FLUX.1's resolution-dependent shift (``use_dynamic_shifting``).

Geometry. World scenes are 64 px; at 64 px the 4x VAE gives a 16x16 latent that FLUX's 2x2 packing turns into 8x8 =
64 tokens, coarser than the UNet's attention (16x16 at its top level) and too coarse for side and shape: a small
object would be 1-2 tokens wide. So the scenes are drawn at :data:`FLUX_IMAGE_SIZE` = 128 px by the procedural
renderer itself (``render(scene, size=128)``: the same scenes, geometry scaled, not an upsampled 64 px image): a
32x32x4 latent, packed into 16x16 = 256 tokens of 16 channels (``in_channels`` 16). 256 tokens is FLUX's
``base_image_seq_len`` (shift e^0.5 at the native size), the token grid is the UNet's 16x16 top level (the pool's
16x16 object masks index the tokens directly), and the sequence with 32 text tokens is 288. The shipped VAE is
convolutional and reconstructs 128 px scenes nearly as well as 64 px ones (measured on 64 scenes: 28.5 dB, colour
right on 97 % of the objects the checker reads; 64 px: 29.2 dB, 98 %), so it is kept as it is; its only cost is 4x
the pixels when the pool is encoded once.

Objective: rectified flow as FLUX / SD3 train it. ``x_t = (1 - s) x_0 + s noise``, the transformer predicts
``noise - x_0`` (the Euler scheduler's velocity) from the packed ``x_t``, the timestep ``s`` (diffusers' FLUX takes
sigma in [0, 1]), the pooled CLIP vector, the T5 sequence, text ids of zeros and FLUX's latent image ids. Sigmas are
logit-normal (SD3's best), unshifted: pushed toward noise by the sampler's shift at 256 tokens (e^0.5) they left 3 %
of the steps below sigma 0.2, where shapes' edges are drawn, and shape stayed near chance (docs/toyworld.md). Text is encoded by
FluxPipeline's own ``encode_prompt`` (no attention mask, padded to :data:`~.tokenizer.MAX_TOKENS`), exactly as at
generation time; generate with ``max_sequence_length=32`` (the recommended settings record it): FluxPipeline's
default of 512 would add 480 padding tokens the model never saw.
"""

from __future__ import annotations

import copy
import json
import math
import string
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .tokenizer import MAX_TOKENS
from .world import IMAGE_SIZE, VOCABULARY

__all__ = [
    "FLUX_IMAGE_SIZE", "FLUX_BLOCKS", "FLUX_HEADS", "FLUX_HEAD_DIM", "FLUX_CFG", "FLUX_RECOMMENDED", "t5_tokenizer", "t5_encoder",
    "build_flux_models", "flow_scheduler", "flow_shift", "sample_sigmas", "flux_pipeline", "flow_loss",
    "save_flux_pipeline", "CheckerView",
]

#: the side of the flux variant's images (its latent is 32x32, its token grid 16x16)
FLUX_IMAGE_SIZE = 128
#: double-stream and single-stream blocks (FLUX.1-dev has 19 and 38)
FLUX_BLOCKS = (3, 6)
FLUX_HEADS = 4
FLUX_HEAD_DIM = 32
#: FluxPipeline's ``true_cfg_scale`` recommended with ``negative_prompt=""`` (25 steps)
FLUX_CFG = 5.0
#: generation settings stored with the model (``attnctrl.json``). FluxPipeline's ``guidance_scale`` feeds a guidance
#: embedding this model does not have; its classifier-free guidance is ``true_cfg_scale`` with a negative prompt.
FLUX_RECOMMENDED = {"num_inference_steps": 25, "guidance_scale": FLUX_CFG, "true_cfg_scale": FLUX_CFG,
                    "negative_prompt": "", "max_sequence_length": MAX_TOKENS, "height": FLUX_IMAGE_SIZE,
                    "width": FLUX_IMAGE_SIZE}
_T5_WIDTH = 128  # = the CLIP text encoder's width and the transformer's joint_attention_dim


def t5_tokenizer(model_max_length: int = MAX_TOKENS, vocabulary: tuple[str, ...] = VOCABULARY):
    """A ``T5Tokenizer`` (SentencePiece Unigram, T5's ``<pad>`` 0 / ``</s>`` 1 / ``<unk>`` 2) whose pieces are the
    ``vocabulary`` words (``"▁red"``: one token per word) and single characters (other words fall back to them)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(c, -18.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -1.0) for w in vocabulary]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    for word in vocabulary:
        if len(tok(word, add_special_tokens=False).input_ids) != 1:  # pragma: no cover - guarded by the tests
            raise RuntimeError(f"toy T5 tokenizer splits {word!r}")
    return tok


def _adaln_zero(transformer) -> None:
    """DiT's adaLN-Zero: zero every modulation (so each block's gates are 0 and the block is the identity) and the
    output projection, the usual start for a diffusion transformer trained from scratch."""
    layers = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        layers += [block.norm1.linear, block.norm1_context.linear]
    layers += [block.norm.linear for block in transformer.single_transformer_blocks]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()


def t5_encoder(tokenizer, seed: int):
    """A fresh tiny ``T5EncoderModel`` for ``tokenizer`` (:func:`t5_tokenizer`): d_model 128, 3 layers of 4 heads,
    gated-GELU as T5 v1.1."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=_T5_WIDTH, d_kv=32, d_ff=512, num_layers=3, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def build_flux_models(tokenizer, tokenizer_2, seed: int = 0, blocks: tuple[int, int] = FLUX_BLOCKS,
                      heads: int = FLUX_HEADS, head_dim: int = FLUX_HEAD_DIM):
    """Fresh (random) VAE, CLIP and T5 text encoders and transformer of the flux variant (the trainer then loads the
    VAE and CLIP text encoder of a saved toyworld model into them)."""
    from diffusers import FluxTransformer2DModel

    from .architecture import build_text_encoder, build_vae

    vae = build_vae(seed)
    text_encoder = build_text_encoder(tokenizer, seed + 1)
    text_encoder_2 = t5_encoder(tokenizer_2, seed + 3)
    if head_dim % 4 or head_dim < 8:
        raise ValueError(f"flux head_dim must be a multiple of 4, at least 8 (RoPE axes), not {head_dim}")
    rope = (4, (head_dim - 4) // 2, (head_dim - 4) // 2)  # axis 0 (zeros in FLUX's ids), rows, columns
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=blocks[0], num_single_layers=blocks[1], attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=_T5_WIDTH, pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=False, axes_dims_rope=rope,
    )
    _adaln_zero(transformer)
    return vae, text_encoder, text_encoder_2, transformer


def flow_scheduler():
    """FLUX.1's sampler: Euler on the rectified flow, shifted by the image's token count (e^0.5 at 256 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096, time_shift_type="exponential")


def flow_shift(scheduler, tokens: int) -> float:
    """The sampler's sigma shift for an image of ``tokens`` packed tokens (FluxPipeline's ``calculate_shift``)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    return math.exp(calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))


def sample_sigmas(n: int, gen: torch.Generator, shift: float, std: float = 1.0) -> torch.Tensor:
    """``n`` training sigmas: logit-normal (mean 0, ``std``), then shifted as the sampler shifts its sigmas
    (``shift * s / (1 + (shift - 1) * s)``, FLUX's exponential time shift with ``e^mu = shift``)."""
    s = torch.sigmoid(std * torch.randn(n, generator=gen))
    return shift * s / (1 + (shift - 1) * s)


def flux_pipeline(vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer):
    """A ``FluxPipeline`` around the given modules (no copies) with the toyworld sampler."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_loss(pipe, latents: torch.Tensor, captions: list[str], gen: torch.Generator, shift: float) -> torch.Tensor:
    """Rectified-flow loss of ``pipe.transformer`` on scaled latents ``(B, 4, H, W)`` and their captions: the MSE
    between the predicted and the true velocity ``noise - x_0`` at logit-normal sigmas (:func:`sample_sigmas`), on
    FLUX's packed tokens. The text goes through ``pipe.encode_prompt`` with gradients (the text encoders train)."""
    b, c, h, w = latents.shape
    sigmas = sample_sigmas(b, gen, shift)
    noise = torch.randn(latents.shape, generator=gen)
    s = sigmas[:, None, None, None]
    noisy = (1 - s) * latents + s * noise
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, device=latents.device,
                                                         max_sequence_length=MAX_TOKENS)
    image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    pred = pipe.transformer(hidden_states=pipe._pack_latents(noisy, b, c, h, w), timestep=sigmas,
                            pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                            img_ids=image_ids, return_dict=False)[0]
    return F.mse_loss(pred, pipe._pack_latents(noise - latents, b, c, h, w))


class CheckerView:
    """A ``FluxPipeline`` called as :mod:`.bench`'s evaluators call a pipeline (``pipe(prompts,
    num_inference_steps=, guidance_scale=, generator=).images``): ``guidance_scale`` becomes true CFG against the
    empty prompt, images are made at the model's size and box-filtered to the 64 px the checker is calibrated at."""

    def __init__(self, pipe, size: int = FLUX_IMAGE_SIZE):
        self.pipe, self.size = pipe, size

    def __call__(self, prompt, num_inference_steps: int = 25, guidance_scale: float = FLUX_CFG, generator=None,
                 **kwargs):
        from PIL import Image

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = self.pipe(prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=guidance_scale,
                        num_inference_steps=num_inference_steps, height=self.size, width=self.size,
                        max_sequence_length=MAX_TOKENS, generator=generator, **kwargs)
        return SimpleNamespace(images=[im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX) for im in out.images])


def save_flux_pipeline(path: Path, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                       info: dict | None = None) -> Path:
    """Save a standard diffusers ``FluxPipeline`` folder with fp16 weights and ``attnctrl.json``
    (:data:`FLUX_RECOMMENDED`). ``vae.config`` must hold the run's ``shift_factor`` and ``scaling_factor``."""
    half = [copy.deepcopy(m).half() for m in (vae, text_encoder, text_encoder_2, transformer)]
    pipe = flux_pipeline(half[0], half[1], tokenizer, half[2], tokenizer_2, half[3])
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "attnctrl.json").write_text(json.dumps({"recommended": FLUX_RECOMMENDED, **(info or {})}, indent=2) + "\n")
    return path
