"""``MagicFacePipeline``: RSA then RBA with attention-based segmentation and region-adaptive CFG.

    mf = attnctrl.pipelines.MagicFacePipeline.from_pipe(pipe)
    image = mf("a woman wearing a hat", references=[
        attnctrl.Reference("woman.png", "woman_mask.png", "a photo of a woman"),
        attnctrl.Reference("hat.png", "hat_mask.png", "a man wearing a hat"),
    ], ref_words=["woman", "hat"], mask_weights=[3.0, 2.0]).images[0]

See :mod:`attnctrl.processors.magicface` for the algorithm. The segmentation of the last generation is kept in
``mf.last_run`` (``concept``: per-token masks, ``fg``; ``reference_masks()``: one mask per reference).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..core.errors import AttnCtrlError
from ..core.tokens import token_indices
from ..processors.magicface import STORE_DOWNSAMPLES, MagicFace, MagicFaceAttnProcessor, region_rate, segment, smooth3
from .freecustom import ReferencePipeline
from .reference import ReferenceRun

__all__ = ["MagicFacePipeline", "MagicFaceRun"]


class MagicFaceRun(ReferenceRun):
    """Reference run plus MagicFace's per-step token maps, segmentation and stage."""

    def setup(self, config: MagicFace, layers, ref_tokens: list[list[int]], steps: int, guidance: float):
        """Bind the run to a config, the denoiser's layer map, the references' token indices and the schedule."""
        self.config = config
        self.ref_tokens = ref_tokens
        self.ca_scale = config.scale_for(self.n)
        inject = config.inject_step
        self.inject = round(inject * steps) if isinstance(inject, float) else int(inject)
        self.guidance = guidance
        self.seg_grid = (self.latent_hw[0] // 2, self.latent_hw[1] // 2)
        self.reference_layers = {la.name for la in layers.select(config.layers) if la.kind == "self"}
        self.store_layers = {la.name for la in layers if la.downsample in STORE_DOWNSAMPLES}
        self.recording = True
        self.qk: dict[str, tuple] = {}
        self.concept = None  # (T, H/2, W/2) bool, from the previous UNet call
        self.fg = None
        self.step = 0
        self._reset_sums()

    def _reset_sums(self):
        self.token_sum = None
        self.fg_sum = None
        self.layers_recorded = 0

    def stage(self) -> int:
        return 2 if self.concept is not None and self.step > self.inject else 1

    @torch.no_grad()
    def record(self, grid, q_self, k_self, q_cross, k_cross) -> None:
        """Add one block's token maps ``(A C + 3 A (A C)) / 4`` (spec §6) to the running sums."""
        heads = q_self.shape[1]
        scale = q_cross.shape[-1] ** -0.5
        cross = torch.softmax(q_cross.float() @ k_cross.float().transpose(-1, -2) * scale, -1).mean(1)  # (B2, n, T)
        q, k = q_self.float(), k_self.float()

        def propagate(values):  # head-mean of softmax(q k^T / sqrt(d)) @ values, without the n x n map
            return F.scaled_dot_product_attention(q, k, values.unsqueeze(1).expand(-1, heads, -1, -1)).mean(1)

        ac = propagate(cross)
        maps = (ac + 3 * propagate(ac)) / 4  # (B2, n, T)
        b2, n, t = maps.shape
        maps = maps.transpose(1, 2).reshape(b2, t, *grid)
        if tuple(grid) != self.seg_grid:
            maps = F.interpolate(maps, size=self.seg_grid, mode="bilinear", align_corners=False)
        maps = smooth3(maps)
        cond = maps[-1]
        cond = cond / (cond.mean((-2, -1), keepdim=True) + 1e-8)
        uncond = maps[0]
        pair = torch.stack([uncond[0], uncond[1:].sum(0)])
        pair = pair / (pair.mean((-2, -1), keepdim=True) + 1e-8)
        self.token_sum = cond if self.token_sum is None else self.token_sum + cond
        self.fg_sum = pair if self.fg_sum is None else self.fg_sum + pair
        self.layers_recorded += 1

    def reference_masks(self) -> torch.Tensor:
        """``(N, H/2, W/2)`` boolean segmentation of each reference's word (union of its tokens)."""
        if self.concept is None:
            raise AttnCtrlError("no segmentation yet")
        return torch.stack([self.concept[tokens].any(0) for tokens in self.ref_tokens])

    def groups(self, grid) -> torch.Tensor:
        """``(h * w,)`` group ids on a layer grid: 0 = no concept, i = concept i (the last one wins)."""
        masks = self.reference_masks().float()[:, None]
        masks = F.interpolate(masks, size=tuple(grid), mode="nearest")[:, 0].flatten(1) > 0.5
        ids = torch.zeros(masks.shape[1], dtype=torch.long, device=masks.device)
        for i in range(self.n):
            ids[masks[i]] = i + 1
        return ids

    def after_unet(self, module, args, kwargs, output):
        """Segment from this call's maps; apply the region-adaptive CFG rate to the conditional target."""
        if self.layers_recorded:
            self.concept, self.fg = segment(self.token_sum, self.fg_sum, self.layers_recorded, self.ref_tokens,
                                            self.ca_scale)
        self._reset_sums()
        self.qk.clear()
        self.step += 1
        sample = output[0] if isinstance(output, tuple) else output.sample
        cfg = sample.shape[0] == 2 * (self.n + 1)
        if not (self.config.use_rate and cfg and self.concept is not None):
            return output
        u, c = 0, self.n + 1
        delta = sample[c] - sample[u]
        rate = region_rate(delta, self.concept, self.fg, self.guidance, self.config.upscale).to(sample)
        sample = sample.clone()
        sample[c] = sample[u] + rate * delta
        if isinstance(output, tuple):
            return (sample, *output[1:])
        output.sample = sample
        return output


class MagicFacePipeline(ReferencePipeline):
    """MagicFace (see :mod:`attnctrl.processors.magicface`). Extra call arguments: ``references``, ``ref_words``,
    ``mask_weights``, ``ca_scale``, ``inject_step``, ``use_rate``, ``layers``, ``start_step``, ``end_step``,
    ``use_null_ref_prompts``, ``upscale``, ``reference_seed``; everything else goes to the base pipeline."""

    config_class = MagicFace
    processor_class = MagicFaceAttnProcessor
    run_class = MagicFaceRun

    def shown_masks(self):
        """The segmentation of each reference's concept in the target (once the blend phase has run)."""
        run = getattr(self, "last_run", None)
        return run.reference_masks() if run is not None and run.concept is not None else None

    def _validate(self, config: MagicFace, prompt: str, references) -> list[list[int]]:
        words = list(config.ref_words)
        if len(words) != len(references):
            raise AttnCtrlError(
                f"ref_words must name one word of the prompt per reference: {len(words)} word(s) for "
                f"{len(references)} reference(s)"
            )
        self._distinct(words, "ref_words")
        tokens = []
        for i, word in enumerate(words):
            try:
                tokens.append(token_indices(self.pipe.tokenizer, prompt, word))
            except AttnCtrlError as e:
                raise type(e)(f"reference {i + 1}: {e}") from None
        return tokens

    def _prepare(self, run: MagicFaceRun, config: MagicFace, tokens, handle, kwargs) -> list:
        defaults = inspect.signature(self.pipe.__call__).parameters
        steps = int(kwargs.get("num_inference_steps") or defaults["num_inference_steps"].default)
        guidance = float(kwargs.get("guidance_scale", defaults["guidance_scale"].default))
        run.setup(config, handle.controller.layers, tokens, steps, guidance)
        return [self.pipe.unet.register_forward_hook(run.after_unet, with_kwargs=True)]
