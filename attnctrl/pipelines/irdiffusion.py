"""``IRDiffusionPipeline``: several consistent subjects with isolation, reposition and mutual attention.

    ir = attnctrl.pipelines.IRDiffusionPipeline.from_pipe(pipe)
    image = ir("a cat on the left and a dog on the right", subjects=[
        Subject("cat", reference=attnctrl.Reference("cat.png", "cat_mask.png", "a photo of a cat"), region=(0, 0.2, 0.5, 1)),
        Subject("dog", prompt="a photo of a dog"),          # reference rehearsed by the pipeline, region from layout
    ]).images[0]

Each :class:`Subject` names its word in the scene prompt and has a reference (a user image + mask, or a prompt that
the pipeline first generates, the official "rehearsal", with its mask from the cross-attention of the subject word)
and a target region (a mask, a box in pixels or fractions, or ``None``: a layout rehearsal of the scene prompt with
the same noise gives the regions from the cross-attention of the subject words; when the words' regions overlap so
that one keeps less than half of its area, the layout is rehearsed again with the next seed, up to 20 times, as
the official code retries an undetected subject, and the final run uses that noise). Overlapping regions are
resolved in favour of the larger one (the official post-processing); a region left empty is an error. See :mod:`attnctrl.processors.irdiffusion`.

**The seed actually used.** After a call, ``ir.seed_used`` is the seed of the noise the image was made from: the
requested one (``generator.initial_seed()``; 0 without a generator), or ``requested + k`` when the layout rehearsal
moved on k seeds. A move is announced once with an :class:`~attnctrl.errors.AttnCtrlWarning` ("layout rehearsal:
seed S gave overlapping subjects ...; used seed S+k"); so is a layout for which all 20 seeds failed. Re-running with
``seed_used`` as the requested seed gives the same image. Without subjects (the base pipeline) it is the
generator's initial seed, or None without a generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.controller import bind
from ..core.errors import AttnCtrlError, notice
from ..core.masks import binarize, box_mask, is_box, load_mask, resize_mask
from ..core.tokens import token_indices
from ..processors.attention_maps import AttentionMaps
from ..processors.irdiffusion import IRAttnProcessor, IRDiffusion, IRState
from .freecustom import ReferencePipeline
from .reference import Reference, ReferenceRun

__all__ = ["IRDiffusionPipeline", "IRRun", "Subject"]

#: layout rehearsals before giving up on one where every subject keeps half its attention region (official: 20)
LAYOUT_TRIES = 20


@dataclass
class Subject:
    """One subject: its ``word`` in the scene prompt, a ``reference`` or a reference ``prompt``, and a ``region``."""

    word: str
    reference: Reference | None = None
    prompt: str = ""
    region: object = None  # mask (path / array / PIL / tensor) or box (x0, y0, x1, y1); None = layout rehearsal


class IRRun(IRState, ReferenceRun):
    """A reference run with IR-Diffusion's state (:class:`~attnctrl.processors.irdiffusion.IRState`: target
    regions, per-grid masks, reposition maps, dropout); the dropout's generator is seeded from the run's seed."""

    def setup(self, config: IRDiffusion, layers, target_masks: torch.Tensor, msa_layers: set[str]):
        super().setup(config, layers, target_masks, msa_layers, dropout_seed=int(self.generator.initial_seed()) + 7)


def _region_mask(region, height: int, width: int, index: int) -> torch.Tensor:
    label = f"subject {index + 1}"
    if is_box(region):
        try:
            mask = box_mask(region, (height, width))
        except AttnCtrlError as e:
            raise AttnCtrlError(f"{label}: {e}") from None
        if not torch.any(mask > 0):
            raise AttnCtrlError(f"{label}: box {tuple(region)} lies outside the {width}x{height} image")
        return mask
    try:
        mask = load_mask(region)
    except AttnCtrlError as e:
        raise AttnCtrlError(f"{label}: {e}") from None
    if mask.sum() == 0:
        raise AttnCtrlError(f"{label}: the region mask is empty")
    return (resize_mask(mask, (height, width)) > 0.5).float()


def disjoint(masks: torch.Tensor) -> torch.Tensor:
    """Remove overlaps, giving each shared pixel to the larger region (the official post-processing)."""
    order = masks.flatten(1).sum(1).argsort(descending=True)
    out = torch.zeros_like(masks)
    taken = torch.zeros(masks.shape[1:], dtype=torch.bool)
    for i in order.tolist():
        out[i] = (masks[i] > 0.5) & ~taken
        taken |= out[i] > 0.5
    return out


def _layout_message(requested: int, used: int, failed: dict, advice: str) -> str:
    """The one warning of a layout rehearsal that moved on from the requested seed (``failed``: seed -> words)."""
    words = ", ".join(dict.fromkeys(w for ws in failed.values() for w in ws))
    if used not in failed:
        tried = f"seed {requested}" if len(failed) == 1 else f"seeds {requested}-{used - 1}"
        return (f"IR-Diffusion layout rehearsal: {tried} gave overlapping subjects ({words}); used seed {used} "
                f"(the pipeline's seed_used), so this image is the one seed {used} gives")
    return (f"IR-Diffusion layout rehearsal: all {len(failed)} seeds {requested}-{used} gave overlapping subjects "
            f"({words}), so the image uses seed {used}'s layout, where they keep less than half of their regions; "
            f"{advice}")


class IRDiffusionPipeline(ReferencePipeline):
    """IR-Diffusion. Extra call arguments: ``subjects``, ``mutual_lambda``, ``dropout``, ``mask_rule``,
    ``mask_threshold``, ``msa_layers``, ``start_step``, ``end_step``, ``ref_sa_lambda``, ``rehearsal_layers``,
    ``reference_seed``; everything else goes to the base pipeline. After a call, ``seed_used`` is the seed the image
    was made from (see the module docstring)."""

    config_class = IRDiffusion
    processor_class = IRAttnProcessor
    run_class = IRRun

    def shown_masks(self):
        """The subjects' target regions of the last call."""
        return getattr(self, "last_subject_masks", None)

    def _attention_mask(self, prompts: list[str], words: list[str], generators, kwargs,
                        layers=None) -> torch.Tensor:
        """Generate ``prompts`` plainly and return, per word, the Otsu-binarised cross-attention map of the word in
        its prompt (one prompt per word, or one prompt for all the words: the layout is generated once), recorded
        at ``layers`` (a selector; None: every layer with text keys)."""
        height, width = kwargs["height"], kwargs["width"]
        plain = {k: v for k, v in kwargs.items() if k in ("num_inference_steps", "guidance_scale", "negative_prompt",
                                                          "height", "width")}
        images, masks = [], []
        maps_config = AttentionMaps(words=tuple(dict.fromkeys(words)), **({} if layers is None else {"layers": layers}))
        with bind(self, maps_config) as maps:
            out = self._base_call(prompts, generator=generators, **plain)
            for i, word in enumerate(words):
                k = i if len(prompts) > 1 else 0
                heat = torch.as_tensor(maps.heat_maps([word], index=k, size=(height, width))[word])
                masks.append(binarize(heat, "otsu"))
                images.append(out.images[k])
        return images, torch.stack(masks)

    def __call__(self, prompt: str, subjects=(), reference_seed: int | None = None, **kwargs):
        """Generate ``prompt`` with its ``subjects`` (see the module docstring); ``self.seed_used`` afterwards."""
        self.seed_used = None
        config = self._config(kwargs)
        kwargs["config"] = config
        subjects = list(subjects or ())
        if not subjects:
            generator = kwargs.get("generator")
            generator = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
            if isinstance(generator, torch.Generator):
                self.seed_used = int(generator.initial_seed())
            return super().__call__(prompt, references=(), **kwargs)
        if not isinstance(prompt, str):
            raise AttnCtrlError("IR-Diffusion takes one scene prompt (a string) per call")
        if kwargs.get("num_images_per_prompt", 1) != 1:  # before any rehearsal
            raise AttnCtrlError("reference pipelines make one image per call; loop over seeds for more")
        for i, s in enumerate(subjects):
            if not isinstance(s, Subject):
                raise AttnCtrlError(f"subject {i + 1}: subjects must be attnctrl.pipelines.Subject objects")
            token_indices(self.tokenizer, prompt, s.word)  # the word must be in the scene prompt
            if s.reference is None and not s.prompt:
                raise AttnCtrlError(f"subject {i + 1} ({s.word}): give a reference image or a reference prompt")
        self._distinct([s.word for s in subjects], "subject words")
        height, width = self._size(kwargs)
        kwargs.update(height=height, width=width)
        generator = kwargs.get("generator")
        generator = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
        seed = requested = int(generator.initial_seed()) if isinstance(generator, torch.Generator) else 0
        # target regions: given, or from a layout rehearsal of the scene with the same noise as the final run
        regions = [None if s.region is None else _region_mask(s.region, height, width, i)
                   for i, s in enumerate(subjects)]
        laid_out = [i for i, r in enumerate(regions) if r is None]
        failed = {}  # seed -> the words whose layout regions overlapped
        for attempt in range(LAYOUT_TRIES if laid_out else 1):
            seed += attempt > 0
            trial = list(regions)
            if laid_out:
                _, layout = self._attention_mask([prompt], [s.word for s in subjects],
                                                 [torch.Generator().manual_seed(seed)], kwargs, config.rehearsal_layers)
                trial = [r if r is not None else layout[i] for i, r in enumerate(regions)]
            target = disjoint(torch.stack(trial))
            kept = [float(target[i].sum() / max(float((trial[i] > 0.5).sum()), 1.0)) for i in range(len(subjects))]
            lost = [i for i in laid_out if kept[i] < 0.5]  # a subject the layout did not draw apart: try new noise
            if not lost:
                break
            failed[seed] = [subjects[i].word for i in lost]
        advice = ("give the subjects regions (boxes or masks), or pick other layers for the rehearsal's maps with "
                  "rehearsal_layers (a layer selector such as 'up.1')")
        for i in range(len(subjects)):
            if not torch.any(target[i]):
                raise AttnCtrlError(f"subject {i + 1} ({subjects[i].word}): its region is empty once overlaps go to "
                                    f"the larger region" + (f" (layout: {LAYOUT_TRIES} tries); {advice}"
                                                            if i in laid_out else ""))
        if failed:
            notice(_layout_message(requested, seed, failed, advice))
        self.seed_used = seed
        kwargs["generator"] = torch.Generator().manual_seed(seed)  # the final run replays the layout's noise
        # references: given, or rehearsed from their prompts (one shared noise, as the official portraits)
        references = []
        rehearse = [i for i, s in enumerate(subjects) if s.reference is None]
        if rehearse:
            images, masks = self._attention_mask([subjects[i].prompt for i in rehearse],
                                                 [subjects[i].word for i in rehearse],
                                                 [torch.Generator().manual_seed(seed + 1) for _ in rehearse], kwargs,
                                                 config.rehearsal_layers)
            rehearsed = {i: (images[k], masks[k]) for k, i in enumerate(rehearse)}
        for i, s in enumerate(subjects):
            if s.reference is not None:
                references.append(s.reference if s.reference.prompt or not s.prompt else Reference(
                    s.reference.image, s.reference.mask, s.prompt, s.reference.mask_threshold, s.reference.fit))
            else:
                image, mask = rehearsed[i]
                references.append(Reference(image, (mask.numpy() * 255).astype("uint8"), s.prompt, name=s.word))
        self._target = target
        self.last_subject_masks = target
        return super().__call__(prompt, references=references, reference_seed=reference_seed, **kwargs)

    def _prepare(self, run: IRRun, config: IRDiffusion, context, handle, kwargs) -> list:
        msa = {la.name for la in config.msa_selection(handle.controller)}
        run.setup(config, handle.controller.layers, self._target, msa)
        return []

