"""The training data of toyworld: a fixed pool of scenes, its grounding targets, and the draws of reference training.

The pool (``DIR/pool.pt``) holds ``pool_size`` procedurally drawn scenes (:mod:`.world`; held-out colour-shape pairs
never appear), each with its caption, each object's coverage of the 16x16 latent grid and the token positions of its
words (:func:`grounding_targets`). A fraction of the scenes are look-alike scenes, spread evenly over the pool.
Scene ``i`` is ``make_scene(seed * 10_000_000 + i, look_alike=...)``, so every scene can be rebuilt from its index
(:meth:`ScenePool.index_looks` relies on it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .world import COLOURS, IMAGE_SIZE, PATTERNS, SHAPES, SIZES, make_scene, object_mask, render

__all__ = ["LATENT", "ScenePool", "grounding_targets", "swap_sides", "drop_looks", "sample_latents", "atomic_save"]

LATENT = IMAGE_SIZE // 4  # 16: the latent grid (the VAE downsamples 4x); the flux variant's token grid at 128 px
_OBJECT_WORDS = frozenset((*COLOURS, *SHAPES, *PATTERNS, *SIZES))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file, so an interrupted save never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def swap_sides(caption: str) -> str:
    """The caption of the horizontally flipped scene: "left" and "right" swapped."""
    return caption.replace("left", "\0").replace("right", "left").replace("\0", "right")


def drop_looks(caption: str, positions) -> str:
    """``caption`` without the pattern and colour words among the token ``positions`` (1-based words; -1 = none)."""
    words = caption.split()
    drop = {int(p) - 1 for p in positions if p >= 0 and words[int(p) - 1] in (*COLOURS, *PATTERNS)}
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def grounding_targets(scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object (up to 3): its silhouette's coverage of each latent cell (uint8, 255 = covered) and the token
    positions of its words in the caption (size, pattern, colour, shape; -1 = none). The toy tokenizer gives one
    token per word after ``<|startoftext|>``, and the caption names the objects in order, one "and"-phrase each."""
    masks = torch.zeros(3, LATENT, LATENT, dtype=torch.uint8)
    words = torch.full((3, 4), -1, dtype=torch.int8)
    position = 1
    for i, phrase in enumerate(scene.caption.split(" and ")):
        found = [position + j for j, w in enumerate(phrase.split()) if w in _OBJECT_WORDS]
        words[i, : len(found)] = torch.tensor(found[:4], dtype=torch.int8)
        position += len(phrase.split()) + 1  # the phrase and the "and" after it
        cover = np.asarray(object_mask(scene, i), np.float32).reshape(LATENT, 4, LATENT, 4).mean((1, 3))
        masks[i] = torch.from_numpy(np.round(cover).astype(np.uint8))
    return masks, words


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, scaling: float, idx: torch.Tensor, flip: torch.Tensor,
                   gen: torch.Generator, shift: float = 0.0) -> torch.Tensor:
    """Scaled latents of scenes ``idx`` sampled from their cached VAE posteriors (``mean``, ``logvar``: one row per
    pool scene or clip), flipped horizontally where ``flip``: ``(z - shift) * scaling`` (``shift``: FLUX's VAE
    ``shift_factor``; 0 for the UNet model)."""
    mean, logvar = mean[idx].float(), logvar[idx].float()
    latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen) - shift) * scaling
    return torch.where(flip.view(-1, *[1] * (latents.dim() - 1)), latents.flip(-1), latents)


class ScenePool:
    """The scenes of a run: ``images`` (N, S, S, 3) uint8 (S = 64, or 128 for the flux variant: the same scenes drawn
    at twice the resolution), ``captions``, ``masks`` (N, 3, 16, 16) uint8 object coverage and ``words`` (N, 3, 4)
    int8 token positions (None in pools saved before the grounding targets)."""

    def __init__(self, images, captions, masks=None, words=None, seed: int = 0, look_alike_fraction: float = 0.0):
        self.images, self.captions, self.masks, self.words = images, captions, masks, words
        self.seed, self.look_alike_fraction = seed, look_alike_fraction
        self.looks: list[list[tuple[str, str, str]]] | None = None
        self.by_look: dict[tuple[str, str, str], list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.captions)

    def scene(self, i: int):
        """Scene ``i`` of the pool (look-alike scenes evenly spread over it)."""
        look_alike = (i * 0.6180339887) % 1.0 < self.look_alike_fraction
        return make_scene(self.seed * 10_000_000 + i, look_alike=look_alike)

    @classmethod
    def load_or_build(cls, path: Path, size: int, seed: int = 0, look_alike_fraction: float = 0.0,
                      need_masks: bool = False, log: Callable[[str], None] = print,
                      image_size: int = IMAGE_SIZE) -> ScenePool:
        """The pool saved at ``path``, or a new one of ``size`` scenes drawn at ``image_size`` px and saved there.
        ``need_masks``: refuse a saved pool without object masks (the grounding loss and reference training need
        them)."""
        if path.exists():
            saved = torch.load(path)
            if saved["images"].shape[1] != image_size:
                raise ValueError(f"{path} holds {saved['images'].shape[1]} px scenes, this run draws {image_size} px; "
                                 f"use a new run folder")
            pool = cls(saved["images"], saved["captions"], saved.get("masks"), saved.get("words"), seed,
                       look_alike_fraction)
            log(f"pool: {len(pool)} scenes loaded from {path}")
            if need_masks and pool.masks is None:
                raise ValueError(f"{path} was built without object masks; the grounding loss and reference training "
                                 f"need a new run folder")
            return pool
        started = time.perf_counter()
        images = torch.empty(size, image_size, image_size, 3, dtype=torch.uint8)
        masks = torch.zeros(size, 3, LATENT, LATENT, dtype=torch.uint8)
        words = torch.full((size, 3, 4), -1, dtype=torch.int8)
        pool = cls(images, [], masks, words, seed, look_alike_fraction)
        for i in range(size):
            scene = pool.scene(i)
            images[i] = torch.from_numpy(np.array(render(scene, size=image_size)))
            pool.captions.append(scene.caption)
            masks[i], words[i] = grounding_targets(scene)
            if (i + 1) % 4096 == 0:
                log(f"pool: {i + 1}/{size} scenes ({time.perf_counter() - started:.0f} s)")
        atomic_save({"images": images, "captions": pool.captions, "masks": masks, "words": words}, path)
        return pool

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Images ``idx`` as (B, 3, S, S) floats in [-1, 1]."""
        return self.images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def index_looks(self) -> None:
        """Each scene's object looks (colour, shape, pattern), rebuilt from the scene seeds, and where each look
        occurs in the pool (the candidate references of reference training)."""
        self.looks, self.by_look = [], {}
        for i, caption in enumerate(self.captions):
            scene = self.scene(i)
            if scene.caption != caption:
                raise ValueError(f"pool scene {i} is not the scene of its seed ({caption!r} vs {scene.caption!r}): "
                                 f"the pool was built with other settings; reference training needs a new run folder")
            self.looks.append([(o.colour, o.shape, o.pattern) for o in scene.objects])
            for k, look in enumerate(self.looks[-1]):
                self.by_look.setdefault(look, []).append((i, k))

    def references(self, idx: torch.Tensor, captions: list[str], gen: torch.Generator, fraction: float,
                   latents: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]) -> dict | None:
        """Reference training's draw for a batch (captions edited in place): the first ``fraction`` of the items
        (``idx`` is random) each get one or two of their objects' looks dropped from the caption and, for each, a
        pool scene holding an object of the same look and shape as a reference (its latent from ``latents(scenes,
        flip, gen)``, mask, caption or "", and a random MRSA bonus in [0, 3]; ``sources``: (scene, object, target's
        object) per reference). Returns the plan :class:`~.attention.ReferenceAttnProcessor` reads (``slots``,
        ``weights``, ``masks``) with ``owner`` (the target of each reference row), ``latents``, ``captions`` and
        ``sources``; None if no item got a reference. Needs :meth:`index_looks` first."""
        slots = torch.full((len(idx), 2), -1, dtype=torch.long)
        weights = torch.zeros(len(idx), 2)
        sources = []  # (scene, its object, the target's object) per reference, in row order
        for b in range(round(len(idx) * fraction)):
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
            captions[b] = drop_looks(captions[b], dropped)
        if not sources:
            return None
        ref, obj, _ = torch.tensor(sources).unbind(1)
        flip = torch.rand(len(sources), generator=gen) < 0.5
        ref_latents = latents(ref, flip, gen)
        masks = self.masks[ref, obj].float() / 255
        keep = torch.rand(len(sources), generator=gen) < 0.5
        ref_captions = [(swap_sides(self.captions[j]) if f else self.captions[j]) if c else ""
                        for j, f, c in zip(ref.tolist(), flip.tolist(), keep.tolist())]
        return {"slots": slots, "weights": weights, "owner": (slots >= 0).nonzero()[:, 0], "latents": ref_latents,
                "masks": torch.where(flip[:, None, None], masks.flip(-1), masks), "captions": ref_captions,
                "sources": sources}
