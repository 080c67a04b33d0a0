"""Concept LoRAs for the toyworld model: teach a placeholder word (``sks``, ``zwx``, ...) one object.

``python -m attnctrl.models.toyworld.lora [DIR] [--steps N] [--model M]`` trains the two example LoRAs of
:data:`CONCEPTS` into ``DIR`` (default ``attnctrl/assets/examples``) as ``toyworld-<word>-lora.safetensors``:
a PEFT ``LoraConfig`` (rank 8 on ``to_q/to_k/to_v/to_out.0`` of the UNet; text encoder frozen) fitted with the
base model's own objective (epsilon prediction, min-SNR-5) on procedurally drawn scenes in which one object is the
concept and the caption names it by the placeholder word and its class noun only, the DreamBooth convention ("a sks
square on the left and a red circle on the right": no colour, no pattern), so the CLI's ``PATH:"sks square":PROMPT``
trigger finds the class noun "square" in the other prompts.
The files are in the layout ``load_lora_weights`` reads; they are the CLoRA examples of the CLI and the app.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..lora import LORA_TARGETS, save_unet_lora
from .examples import SHIPPED
from .losses import epsilon_loss, min_snr_weights
from .world import PLACEHOLDERS, VOCABULARY, Scene, caption_of, render, sample_scene

__all__ = ["CONCEPTS", "CLORA_SETTINGS", "concept_scene", "train_concept_lora"]

#: placeholder word -> (colour, shape, pattern) of the object it stands for
CONCEPTS: dict[str, tuple[str, str, str]] = {
    "sks": ("blue", "square", "dotted"),
    "zwx": ("green", "star", "striped"),
}

#: CLoRA settings for these LoRAs on the 64-px model (docs/methods/clora.md): maps from the 8x8 layers (the spec's
#: 1/32 rule gives the 2x2 mid block, whose masks are image quarters) and a small latent step (20 scrambles a 16x16
#: latent). The benchmark and the app's example use them; ``assets/jobs/clora.jsonl`` spells them out.
CLORA_SETTINGS = {"record_layers": "res==8", "step_size": 2.0}


def concept_scene(rng: np.random.Generator, word: str, concept: tuple[str, str, str]) -> Scene:
    """A scene of 1-2 objects, one of which is ``concept``; its caption calls that object ``word`` + its shape."""
    colour, shape, pattern = concept
    while True:
        scene = sample_scene(rng, n_objects=int(rng.choice([1, 2], p=[0.5, 0.5])))
        if all((o.colour, o.shape) != (colour, shape) for o in scene.objects):
            break
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    obj.colour, obj.shape, obj.pattern = colour, shape, pattern
    scene.said_sides = True
    caption = caption_of(scene)
    phrase = f"{pattern} {colour} {shape}" if pattern != "plain" else f"{colour} {shape}"
    scene.caption = caption.replace(phrase, f"{word} {shape}")
    return scene


def train_concept_lora(pipe, word: str, concept: tuple[str, str, str], path, steps: int = 800, batch: int = 8,
                       rank: int = 8, lr: float = 1e-3, seed: int = 0,
                       log: Callable[[str], None] = print) -> Path:
    """Fit a LoRA on ``pipe.unet`` that draws ``concept`` for ``word``; save it to ``path`` (``.safetensors``)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if (word in VOCABULARY and word not in PLACEHOLDERS) or len(pipe.tokenizer(word, add_special_tokens=False).input_ids) != 1:
        raise ValueError(f"{word!r} is not a single placeholder token of this tokenizer")
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)  # the pipeline's own UNet stays untouched
    vae, text_encoder, scheduler = pipe.vae, pipe.text_encoder, pipe.scheduler
    name = f"concept_{word}"
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS),
                                init_lora_weights="gaussian"), adapter_name=name)  # and makes it active
    params = [p for n, p in unet.named_parameters() if name in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    weights = min_snr_weights(scheduler)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    unet.train()
    for step in range(steps):
        scenes = [concept_scene(rng, word, concept) for _ in range(batch)]
        pixels = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes])).permute(0, 3, 1, 2)
        with torch.no_grad():
            latents = vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
            ids = pipe.tokenizer([s.caption for s in scenes], padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            context = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, len(weights), (batch,), generator=gen)
        pred = unet(scheduler.add_noise(latents, noise, t), t, context).sample
        loss = epsilon_loss(pred, noise, weights[t])
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log(f"{word}: step {step + 1}/{steps}, loss {loss.item():.4f}, {time.perf_counter() - started:.0f} s")
    return save_unet_lora(pipe, get_peft_model_state_dict(unet, adapter_name=name), path)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a command
    import attnctrl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=str(SHIPPED))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--model", default="toyworld", help="base model (default: the shipped toyworld model)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipe = attnctrl.load_pipeline(args.model)
    for i, (word, concept) in enumerate(CONCEPTS.items()):
        out = Path(args.folder) / f"toyworld-{word}-lora.safetensors"
        train_concept_lora(pipe, word, concept, out, steps=args.steps, seed=i)
        colour, shape, pattern = concept
        print(f"wrote {out}: {word} = a {pattern} {colour} {shape}")


if __name__ == "__main__":  # pragma: no cover
    main()
