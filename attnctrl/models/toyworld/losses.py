"""The losses of toyworld training: the VAE's, the weighted epsilon loss and TokenCompose's grounding terms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["vae_loss", "min_snr_weights", "epsilon_loss", "grounding_terms", "grounding_loss"]


def vae_loss(reconstruction: torch.Tensor, pixels: torch.Tensor, posterior) -> torch.Tensor:
    """L1 + MSE + 1e-6 KL of a VAE reconstruction of ``pixels`` (in [-1, 1]) from ``posterior``."""
    return ((reconstruction - pixels).abs().mean() + F.mse_loss(reconstruction, pixels)
            + 1e-6 * posterior.kl().mean())


def min_snr_weights(scheduler, gamma: float = 5.0, floor: float = 0.0) -> torch.Tensor:
    """Per-timestep epsilon-loss weights ``clamp(SNR_t, floor, gamma) / SNR_t``: min-SNR-gamma (Hang et al. 2023),
    whose clean-image weight ``min(SNR_t, gamma)`` is also kept >= ``floor`` (truncated-SNR style) at high noise.
    ``SNR_t`` is diffusers' ``compute_snr`` over every training timestep."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, torch.arange(len(scheduler.alphas_cumprod)))
    return torch.clamp(snr, min=floor, max=gamma) / snr


def epsilon_loss(prediction: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of each item's noise-prediction MSE times its weight (``min_snr_weights()[t]``)."""
    return (F.mse_loss(prediction, noise, reduction="none").mean((1, 2, 3)) * weights).mean()


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


def grounding_loss(inside: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """L_token + L_pixel from :func:`grounding_terms`."""
    return ((1 - inside) ** 2).mean() + pixel.mean()
