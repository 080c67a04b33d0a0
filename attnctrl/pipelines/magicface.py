"""``MagicFacePipeline``: RSA then RBA with attention-based segmentation and region-adaptive CFG.

    mf = attnctrl.pipelines.MagicFacePipeline.from_pipe(pipe)
    image = mf("a woman wearing a hat", references=[
        attnctrl.Reference("woman.png", "woman_mask.png", "a photo of a woman"),
        attnctrl.Reference("hat.png", "hat_mask.png", "a man wearing a hat"),
    ], ref_words=["woman", "hat"], mask_weights=[3.0, 2.0]).images[0]

See :mod:`attnctrl.processors.magicface` for the algorithm. The segmentation of the last generation is kept in
``mf.last_run`` (``concept``: per-token masks, ``fg``; ``reference_masks()``: one mask per reference). A concept
mask that stays empty or covers nearly the whole image (see :meth:`MagicFaceState.mask_warning`) is reported once per
call with an :class:`~attnctrl.errors.AttnCtrlWarning`.
"""

from __future__ import annotations

from ..core.errors import AttnCtrlError, notice
from ..core.tokens import token_indices
from ..processors.magicface import MagicFace, MagicFaceAttnProcessor, MagicFaceState, region_rate
from .freecustom import ReferencePipeline
from .reference import ReferenceRun

__all__ = ["MagicFacePipeline", "MagicFaceRun"]


class MagicFaceRun(MagicFaceState, ReferenceRun):
    """A reference run with MagicFace's state (:class:`~attnctrl.processors.magicface.MagicFaceState`) and the UNet
    forward hook that ends every UNet call: segmentation, then the region-adaptive CFG rate."""

    def after_unet(self, module, args, kwargs, output):
        """Segment from this call's maps; apply the region-adaptive CFG rate to the conditional target."""
        self.end_call()
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
    ``use_null_ref_prompts``, ``upscale``, ``segment_layers``, ``reference_seed``; everything else goes to the base pipeline."""

    config_class = MagicFace
    processor_class = MagicFaceAttnProcessor
    run_class = MagicFaceRun

    def shown_masks(self):
        """The segmentation of each reference's concept in the target (once the blend phase has run)."""
        run = getattr(self, "last_run", None)
        return run.reference_masks() if run is not None and run.concept is not None else None

    def __call__(self, prompt: str, references=(), reference_seed: int | None = None, **kwargs):
        """Generate one target image of ``prompt`` with the references; warn once if a concept mask is degenerate."""
        self.last_run = None
        out = super().__call__(prompt, references=references, reference_seed=reference_seed, **kwargs)
        run = self.last_run
        if run is not None:
            message = run.mask_warning(list(run.config.ref_words))
            if message:
                notice(message)
        return out

    def _validate(self, config: MagicFace, prompt: str, references) -> list[list[int]]:
        words = config.words_for(len(references))
        self._distinct(words, "ref_words")
        tokens = []
        for i, word in enumerate(words):
            try:
                tokens.append(token_indices(self.tokenizer, prompt, word))
            except AttnCtrlError as e:
                raise type(e)(f"reference {i + 1}: {e}") from None
        return tokens

    def _prepare(self, run: MagicFaceRun, config: MagicFace, tokens, handle, kwargs) -> list:
        defaults = self._base_defaults()
        steps = int(kwargs.get("num_inference_steps") or defaults["num_inference_steps"].default)
        guidance = float(kwargs.get("guidance_scale", defaults["guidance_scale"].default))
        run.setup(config, handle.controller.layers, tokens, steps, guidance)
        return [self.unet.register_forward_hook(run.after_unet, with_kwargs=True)]
