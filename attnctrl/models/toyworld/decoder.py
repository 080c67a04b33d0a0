"""Fine-tune a toyworld model's VAE *decoder* so that it draws patterns (stripes, dots) its pixel loss averaged away.

    python -m attnctrl.models.toyworld.decoder MODEL OUT [--minutes 14] [--pool POOL.pt] [--pool-size 8192]

Why: the VAE (L1 + MSE + tiny KL) keeps only the mean shade of a striped or dotted object in its latent, not the
stripes' phase, so the MSE-optimal decoder draws that object plain and darker. The UNet, trained on those latents,
does produce the darker shade for "a striped green star" -- it was the decoder that threw the pattern away. Here the
encoder, the UNet and the text encoder stay frozen (the latent space every other part was trained on is unchanged)
and the decoder is trained with a *phase-invariant* texture term: the local energy of the image's derivatives along
the two diagonals, x and y (8x8 windows, stride 4), matched to the scene's, next to the pixel loss on 4x4-pooled
images (colour) and a light full-resolution L1 (edges). Any stripe phase then satisfies the loss, so the decoder is
free to draw stripes where the latent says "striped". The result is a copy of ``MODEL`` with the new VAE.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..loading import model_folder
from .train import cosine_factor

__all__ = ["texture_energies", "decoder_loss", "finetune_decoder"]


def texture_energies(x: torch.Tensor) -> list[torch.Tensor]:
    """Local energy of ``x``'s derivatives along (1, 1), (1, -1), x and y: mean absolute difference over 8x8 windows
    (stride 4), channels summed; insensitive to where a pattern's stripes or dots fall (their phase)."""
    h, w = x.shape[-2:]
    diffs = [x[..., 1:, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, 1:],
             x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]]
    return [F.avg_pool2d(F.pad(d.abs().sum(1, keepdim=True), (0, w - d.shape[-1], 0, h - d.shape[-2])), 8, 4)
            for d in diffs]


def decoder_loss(rec: torch.Tensor, x: torch.Tensor, texture_weight: float = 4.0) -> tuple[torch.Tensor, dict]:
    """2 x (L1 + MSE) of 4x4-pooled images + 0.5 x L1 + ``texture_weight`` x L1 of :func:`texture_energies`."""
    a, b = F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4)
    low = F.l1_loss(a, b) + F.mse_loss(a, b)
    pix = F.l1_loss(rec, x)
    tex = sum(F.l1_loss(p, q) for p, q in zip(texture_energies(rec), texture_energies(x)))
    return 2 * low + 0.5 * pix + texture_weight * tex, {"low": low.item(), "pixel": pix.item(), "texture": tex.item()}


def _pool_images(pool: str | Path | None, pool_size: int) -> torch.Tensor:
    """uint8 (N, 64, 64, 3): a training run's ``pool.pt`` or ``pool_size`` freshly drawn scenes."""
    if pool:
        return torch.load(pool)["images"]
    from .world import make_scene, render

    return torch.stack([torch.from_numpy(np.asarray(render(make_scene(s)))) for s in range(pool_size)])


def finetune_decoder(model: str, out: str | Path, minutes: float = 14.0, pool: str | Path | None = None,
                     pool_size: int = 8192, batch: int = 48, lr: float = 3e-4, texture_weight: float = 4.0,
                     seed: int = 0, max_steps: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Copy the model folder ``model`` to ``out`` with its VAE decoder fine-tuned for ``minutes`` (or ``max_steps``)
    on :func:`decoder_loss`; the encoder (so every latent), UNet and text encoder are untouched."""
    from diffusers import AutoencoderKL

    src, out = model_folder(model), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another output folder")
    images = _pool_images(pool, pool_size)
    vae = AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    started, step = time.perf_counter(), 0
    vae.train()
    while time.perf_counter() - started < minutes * 60 and (max_steps is None or step < max_steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)].permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss, parts = decoder_loss(vae.decode(z).sample, x, texture_weight)
        for g in opt.param_groups:
            g["lr"] = lr * cosine_factor((time.perf_counter() - started) / (minutes * 60))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"decoder step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items())
                + f", {(time.perf_counter() - started) / 60:.1f} min")
    vae.eval()
    shutil.copytree(src, out)
    shutil.rmtree(out / "vae")
    vae.half().save_pretrained(out / "vae", safe_serialization=True)
    info_path = out / "attnctrl.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.setdefault("decoder_finetunes", []).append(
        {"minutes": round((time.perf_counter() - started) / 60, 1), "steps": step, "batch": batch, "lr": lr,
         "texture_weight": texture_weight, "seed": seed, "pool": str(pool) if pool else f"{pool_size} scenes"})
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out} ({step} decoder steps)")
    return out


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a command
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a toyworld model folder, or 'toyworld' (the shipped one)")
    parser.add_argument("out", help="the new model folder (must not exist)")
    parser.add_argument("--minutes", type=float, default=14.0)
    parser.add_argument("--pool", help="a training run's pool.pt (default: freshly drawn scenes)")
    parser.add_argument("--pool-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    finetune_decoder(args.model, args.out, args.minutes, args.pool, args.pool_size, seed=args.seed)


if __name__ == "__main__":  # pragma: no cover
    main()
