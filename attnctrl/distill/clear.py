"""Distil CLEAR local-attention weights from a FLUX model (CLEAR spec §4; ``attnctrl distill clear``).

Teacher: the model with full attention (frozen). Student: a copy with CLEAR processors in every attention layer;
only ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (weights and biases) and, with ``down_factor > 1``,
``spatial_weight`` are trained. Data: images with captions (a folder of ``name.png`` + ``name.txt``), or images the
teacher generates from prompts. Each step draws a flow-matching time ``sigma`` uniformly from the scheduler's
training grid, ``x_t = (1 - sigma) x_0 + sigma * eps``, and minimises::

    L = |v_student - (eps - x_0)|^2 + 0.5 |v_student - v_teacher|^2 + 0.5 * mean_l |attn_student_l - attn_teacher_l|^2

where ``l`` runs over the single-stream blocks whose global attention index is a multiple of 4 (the official
choice; the last single-stream block when there is none, as in small models). The weights are saved in the official
key layout (``transformer_blocks.{i}.attn.to_q.weight``, ..., ``...attn.processor.spatial_weight``), which
``CLEAR(weights=...)`` loads.

Deviations from the official recipe, all documented choices: AdamW instead of Prodigy (no extra dependency; set
``lr`` accordingly, 1e-5 is a reasonable start on FLUX.1), no DeepSpeed, gradient accumulation in-process. The
official run used 10K 1024-px images, 4 x 80 GB GPUs and 10K+ iterations; on a CPU this only runs on tiny models.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.controller import apply
from ..core.errors import AttnCtrlError, UnsupportedModelError
from ..models import recommended_settings
from ..processors.clear import CLEAR, clear_weight_keys

__all__ = ["distill_clear", "read_caption_folder", "DEFAULT_PROMPTS"]

DEFAULT_PROMPTS = (
    "a photo of a red fox in a snowy forest",
    "a watercolor painting of a lighthouse at dusk",
    "a bowl of ramen on a wooden table, studio lighting",
    "a city street at night with neon signs and rain",
    "a portrait of an old sailor with a white beard",
    "a cozy living room with plants and a large window",
    "a mountain lake at sunrise with mist",
    "a close-up of a blue butterfly on a flower",
)


def read_caption_folder(folder: str | os.PathLike) -> list[tuple[str, object]]:
    """``[(caption, PIL image)]`` from ``name.png|jpg|webp`` files with a ``name.txt`` caption beside each."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise AttnCtrlError(f"data folder {folder} does not exist")
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            continue
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise AttnCtrlError(f"{path.name} has no caption file {caption.name} beside it")
        items.append((caption.read_text(encoding="utf-8").strip(), Image.open(path).convert("RGB")))
    if not items:
        raise AttnCtrlError(f"no images with captions in {folder}")
    return items


def _attention_blocks(transformer) -> list[str]:
    n_double = len(transformer.transformer_blocks)
    singles = [f"single_transformer_blocks.{j}.attn" for j in range(len(transformer.single_transformer_blocks))
               if (n_double + j) % 4 == 0]
    return singles or [f"single_transformer_blocks.{len(transformer.single_transformer_blocks) - 1}.attn"]


def _record(module_names, model, store: dict):
    def hook(name):
        def fn(module, args, output):
            store[name] = output[0] if isinstance(output, tuple) else output
        return fn

    return [model.get_submodule(n).register_forward_hook(hook(n)) for n in module_names]


def distill_clear(
    pipe,
    radius: float,
    out: str | os.PathLike,
    down_factor: int = 1,
    data: list[tuple[str, object]] | None = None,
    generate: int = 0,
    prompts: list[str] | None = None,
    steps: int = 1000,
    lr: float = 1e-5,
    batch: int = 1,
    grad_accum: int = 1,
    resolution: int | None = None,
    max_sequence_length: int | None = None,
    guidance: float = 3.5,
    backend: str = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Distil CLEAR weights for ``pipe`` (a ``FluxPipeline``) and save them to ``out`` (``.safetensors``).

    ``resolution`` and ``max_sequence_length`` default to the model's recommended settings (``attnctrl.json``, e.g.
    toyworld-flux's 128 px and 32 tokens), else FLUX's own (its default size, 512 tokens); teacher images are made
    with the model's recommended call (toyworld-flux: 25 steps, true CFG against the empty prompt)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    if type(getattr(pipe, "transformer", None)).__name__ != "FluxTransformer2DModel":
        raise UnsupportedModelError("CLEAR distillation needs a FLUX pipeline")
    if steps < 1 or batch < 1 or grad_accum < 1:
        raise AttnCtrlError("steps, batch and grad_accum must be >= 1")
    config = CLEAR(radius=radius, down_factor=down_factor, backend=backend)  # validates the arguments
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    gen = torch.Generator("cpu").manual_seed(seed)
    recommended = recommended_settings(pipe)
    size = resolution or recommended.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    max_sequence_length = max_sequence_length or recommended.get("max_sequence_length", 512)
    teacher_call = {k: recommended[k] for k in ("true_cfg_scale", "negative_prompt") if k in recommended}
    quantum = pipe.vae_scale_factor * 2 * down_factor
    if size % quantum:
        raise AttnCtrlError(f"resolution {size} must be a multiple of {quantum} px for down_factor {down_factor}")

    # 1. data: captions with images (given, or generated by the teacher)
    items = list(data or [])
    if generate:
        prompts = list(prompts or DEFAULT_PROMPTS)
        log(f"generating {generate} teacher images at {size}x{size}")
        for i in range(generate):
            caption = prompts[i % len(prompts)]
            image = pipe(caption, height=size, width=size, guidance_scale=guidance,
                         num_inference_steps=recommended.get("num_inference_steps", 20),
                         max_sequence_length=max_sequence_length, **teacher_call,
                         generator=torch.Generator("cpu").manual_seed(seed + i)).images[0]
            items.append((caption, image))
    if not items:
        raise AttnCtrlError("no training data: pass --data DIR or --generate N")

    # 2. cache text embeddings and packed latents
    cache = []
    with torch.no_grad():
        for caption, image in items:
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(caption, None, device=device,
                                                                 max_sequence_length=max_sequence_length)
            pixels = pipe.image_processor.preprocess(image, height=size, width=size).to(device, pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=None)
            latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            b, c, h, w = latents.shape
            packed = pipe._pack_latents(latents, b, c, h, w).to(dtype)
            image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
            cache.append((prompt_embeds.to(dtype), pooled.to(dtype), text_ids, packed, image_ids))

    # 3. teacher and student
    teacher = pipe.transformer.eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    quiet = logging.getLogger("attnctrl")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the training-free warning does not apply to the student being distilled
    try:
        handle = apply(student, config)
    finally:
        quiet.setLevel(level)
    student.requires_grad_(False)
    trainable = set(clear_weight_keys(student, down_factor))
    params = [p for name, p in student.named_parameters() if name in trainable]
    for p in params:
        p.requires_grad_(True)
    student.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sigmas = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas.to(device)
    blocks = _attention_blocks(student)
    acts_t, acts_s = {}, {}
    hooks = _record(blocks, teacher, acts_t) + _record(blocks, student, acts_s)
    use_guidance = bool(getattr(teacher.config, "guidance_embeds", False))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    log(f"distilling {len(params)} tensors ({sum(p.numel() for p in params) / 1e6:.2f} M parameters), "
        f"attention loss on {', '.join(blocks)}")
    try:
        for step in range(steps):
            total = 0.0
            for _ in range(grad_accum):
                picks = torch.randint(0, len(cache), (batch,), generator=gen).tolist()
                embeds = torch.cat([cache[i][0] for i in picks])
                pooled = torch.cat([cache[i][1] for i in picks])
                x0 = torch.cat([cache[i][3] for i in picks])
                text_ids, image_ids = cache[picks[0]][2], cache[picks[0]][4]
                sigma = sigmas[torch.randint(0, len(sigmas), (batch,), generator=gen)].to(dtype)
                noise = torch.randn(x0.shape, generator=gen).to(device, dtype)
                xt = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
                kwargs = dict(hidden_states=xt, timestep=sigma, pooled_projections=pooled,
                              encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)
                if use_guidance:
                    kwargs["guidance"] = torch.full((batch,), guidance, device=device, dtype=dtype)
                with autocast:
                    with torch.no_grad():
                        v_teacher = teacher(**kwargs)[0]
                    v_student = student(**kwargs)[0]
                    loss = F.mse_loss(v_student.float(), (noise - x0).float())
                    loss = loss + 0.5 * F.mse_loss(v_student.float(), v_teacher.float())
                    attn = sum(F.mse_loss(acts_s[n].float(), acts_t[n].float()) for n in blocks) / len(blocks)
                    loss = loss + 0.5 * attn
                (loss / grad_accum).backward()
                total += loss.item() / grad_accum
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == steps - 1:
                log(f"step {step + 1}/{steps}: loss {total:.5f}")
    finally:
        for h in hooks:
            h.remove()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items() if k in trainable}
    handle.remove()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"method": "CLEAR", "radius": str(radius), "down_factor": str(down_factor)})
    log(f"saved {len(weights)} tensors to {out}")
    return out
