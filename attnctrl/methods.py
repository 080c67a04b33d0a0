"""The method registry: one :class:`MethodEntry` per method, carrying everything the surfaces need.

An entry says what the method is (its config class: options with the spec's defaults, validated on construction),
what it takes besides the prompt (input kinds of :mod:`attnctrl.inputs`), how it runs (a plugin applied with
``attnctrl.apply``, or its pipeline built ``from_pipe`` and called by ``call``), which model families it supports,
whether it makes video, and examples. The command line (``attnctrl generate --method NAME --opt KEY=VALUE``), the
job-file schema, the output records and the web app's tabs are derived from the entries; nothing in ``cli/``,
``ui/``, ``io/`` or ``run/`` names a method.

Third-party methods register through the ``attnctrl.methods`` entry-point group: the entry point names a
:class:`MethodEntry` (or a callable returning one), and the method then appears in every surface::

    [project.entry-points."attnctrl.methods"]
    hot = "attnctrl_hot:ENTRY"
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from .core.controller import Method
from .core.errors import AttnCtrlError
from .processors.agent import AgentAttention
from .processors.attention_maps import AttentionMaps
from .processors.clear import CLEAR
from .processors.clora import CLoRA
from .processors.ditctrl import DiTCtrl
from .processors.freecustom import FreeCustom
from .processors.irdiffusion import IRDiffusion
from .processors.magicface import MagicFace
from .processors.primecomposer import PrimeComposer

__all__ = ["AgentAttention", "AttentionMaps", "CLEAR", "CLoRA", "DiTCtrl", "FreeCustom", "IRDiffusion", "MagicFace",
           "PrimeComposer", "Method", "MethodEntry", "Control", "REGISTRY", "get", "entry", "register", "entries"]

logger = logging.getLogger("attnctrl")


@dataclass(frozen=True)
class Control:
    """An option the web app shows as a widget on the method's tab (the others are in its JSON box).

    ``label`` says what it is in plain words, with the paper's symbol in brackets where the paper has one
    ("Reference strength [w]"); ``info`` is one line, in plain words, on what changing it does (shown under the
    widget). Neither needs the paper."""

    option: str
    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    info: str = ""


@dataclass(frozen=True)
class MethodEntry:
    """One method, as every surface sees it.

    * ``config``: the config class (its dataclass fields are the method's options).
    * ``inputs``: keys of :data:`attnctrl.inputs.KINDS` the method needs (all required), e.g. ``("references",)``.
    * ``pipeline``: ``"module:Class"`` of the method's pipeline (built with ``from_pipe``); ``None`` for a plugin
      applied with ``attnctrl.apply``.
    * ``call(pipeline, config, prompts, inputs, **kwargs)``: one generation with the pipeline (``inputs``: key ->
      list of records); required with ``pipeline``.
    * ``prepare(pipeline, config, prompts, inputs)``: checks needing the loaded model, before any generation.
    * ``mask_names(config, inputs)``: names of the masks ``pipeline.shown_masks()`` returns.
    * ``prompts``: ``"one"`` or ``"many"`` (one per video segment).
    * ``speedup``: the app offers it as a switch beside every tab instead of a tab of its own.
    * ``examples``: job-file objects (paths relative to the shipped examples folder).
    * ``command``: ``"module:click_command"`` of a training tool, mounted as ``attnctrl distill NAME``.
    * ``check(config, prompts, inputs)``: the method's own rules that need no model (words in prompts, one value
      per input), run by :func:`attnctrl.run.validate` before any model loads.
    * ``defaults``: generation settings the method documents (``num_inference_steps``, ``guidance_scale``); they
      win over the model's recommended settings and the base pipeline's defaults; ``None``: the method's pipeline
      decides (e.g. a guidance per domain).
    """

    config: type[Method]
    title: str
    summary: str
    inputs: tuple[str, ...] = ()
    pipeline: str | None = None
    call: Callable | None = None
    prepare: Callable | None = None
    mask_names: Callable | None = None
    video: bool = False
    prompts: str = "one"
    speedup: bool = False
    controls: tuple[Control, ...] = ()
    examples: tuple[dict, ...] = ()
    command: str | None = None
    check: Callable | None = None
    defaults: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.config.families)

    @property
    def options(self) -> tuple:
        """The config's dataclass fields (name, type, default, ``metadata["help"]``)."""
        return fields(self.config)

    def pipeline_class(self) -> type | None:
        if self.pipeline is None:
            return None
        import importlib

        module, _, cls = self.pipeline.partition(":")
        return getattr(importlib.import_module(module), cls)

    def __post_init__(self) -> None:
        from .inputs import KINDS

        unknown = [k for k in self.inputs if k not in KINDS]
        if unknown:
            raise AttnCtrlError(f"method {self.config.__name__}: unknown input kind {unknown[0]!r}; known: "
                                f"{', '.join(KINDS)}")
        if (self.pipeline is None) != (self.call is None):
            raise AttnCtrlError(f"method {self.config.__name__}: give both pipeline and call, or neither (a plugin)")
        if self.prompts not in ("one", "many"):
            raise AttnCtrlError(f"method {self.config.__name__}: prompts is 'one' or 'many'")


# -- how each pipeline method is called -------------------------------------------------------------------------------
def _with_references(pipeline, config, prompts, inputs, **kwargs):
    return pipeline(prompts[0], references=inputs["references"], config=config, **kwargs)


def _with_subjects(pipeline, config, prompts, inputs, **kwargs):
    return pipeline(prompts[0], subjects=inputs["subjects"], config=config, **kwargs)


def _clora(pipeline, config, prompts, inputs, **kwargs):
    from .pipelines.clora import branches

    kwargs.pop("num_images_per_prompt", None)
    return pipeline(*branches(prompts[0], inputs["loras"]), config=config, **kwargs)


def _clora_prepare(pipeline, config, prompts, inputs) -> None:
    from .pipelines.base import keeping_shared_state

    with keeping_shared_state(pipeline):  # loaded to check, then unloaded: each call loads and unloads its LoRAs
        for lora in inputs["loras"]:
            pipeline.load_lora(lora.path)  # a missing or mismatched file fails now, before any generation


def _primecomposer(pipeline, config, prompts, inputs, **kwargs):
    comp = inputs["composition"][0]
    return pipeline(comp.background, comp.object, comp.mask, location=comp.fractions(), prompt=prompts[0],
                    config=config, **kwargs)


def _ditctrl(pipeline, config, prompts, inputs, **kwargs):
    kwargs.pop("num_images_per_prompt", None)
    return pipeline(list(prompts), config=config, **kwargs)


# -- the rules each method checks before any model loads ----------------------------------------------------------------
def words_in(prompt: str, words, label: str) -> None:
    """Each of ``words`` occurs in ``prompt`` (case-insensitive text; the tokens are checked once the model is
    loaded), else one error naming the word and the prompt."""
    for word in words:
        if word.strip().lower() not in prompt.lower():
            raise AttnCtrlError(f"{label} {word!r}: not in the prompt {prompt!r}; use words of the prompt")


def _check_maps(config, prompts, inputs) -> None:
    if not config.words:
        raise AttnCtrlError("attention-maps makes heat maps of words of the prompt: give the words (its option "
                            "words), e.g. cat, hat")
    words_in(prompts[0], config.words, "the heat-map word")


def _check_freecustom(config, prompts, inputs) -> None:
    config.weights(len(inputs["references"]))  # one mask weight, or one per reference


def _check_magicface(config, prompts, inputs) -> None:
    refs = inputs["references"]
    words_in(prompts[0], config.words_for(len(refs)), "ref_words: the word")
    config.weights(len(refs))


def _check_irdiffusion(config, prompts, inputs) -> None:
    for i, subject in enumerate(inputs["subjects"]):
        words_in(prompts[0], [subject.word], f"subject {i + 1}: the word")
        if subject.reference is None:
            words_in(subject.prompt, [subject.word], f"subject {i + 1}: the word")


def _check_clora(config, prompts, inputs) -> None:
    for i, branch in enumerate(inputs["loras"]):
        words_in(branch.prompt, [branch.words], f"LoRA {i + 1}: the trigger words")


def _check_primecomposer(config, prompts, inputs) -> None:
    words_in(prompts[0], config.rca_words or (), "rca_words: the word")


def _check_ditctrl(config, prompts, inputs) -> None:
    for i, (prompt, word) in enumerate(zip(prompts, config.words_for(len(prompts)))):
        words_in(prompt, [word], f"prompt {i + 1}: the subject word")


_REFERENCE_STRENGTH = ("how closely the picture copies the painted part of each reference: higher copies more; "
                       "one number, or one per reference")

_EXAMPLE_REF = {"image": "striped-red-circle.png", "mask": "striped-red-circle-mask.png",
                "prompt": "a striped red circle in the middle and a yellow circle on the right"}
_EXAMPLE_SQUARE = {"image": "striped-green-square.png", "mask": "striped-green-square-mask.png",
                   "prompt": "a striped green square in the middle and a yellow circle on the right"}

BUILTIN: tuple[MethodEntry, ...] = (
    MethodEntry(
        AttentionMaps, "Attention maps", "Heat maps of where each named word went (DAAM-style cross-attention).",
        controls=(Control("words", "Heat maps of words (comma-separated)",
                          info="words of the prompt to show where each one went in the picture"),),
        check=_check_maps,
        examples=({"prompt": "a red circle on the left and a blue square on the right",
                   "options": {"words": ["circle", "square"]}},),
    ),
    MethodEntry(
        AgentAttention, "Agent attention", "Token merging + agent tokens in self-attention: faster, training-free.",
        speedup=True, controls=(Control("ratio", "Share of tokens merged [r]", 0, 0.9, 0.05,
                                        info="similar image tokens are merged before attention: more is faster "
                                        "but loses detail; 0 turns it off"),
                                Control("agent_ratio", "Share merged into agent tokens (early steps)", 0.05, 1, 0.05,
                                        info="in the early steps most tokens are merged into a few stand-ins that "
                                        "carry the attention: more is faster")),
        examples=({"model": "tiny-sd15", "prompt": "a photo of a cat", "steps": 2,
                   "options": {"ratio": 0.4, "switch_step": 1}},),
    ),
    MethodEntry(
        CLEAR, "CLEAR local attention", "Convolution-like local window attention for FLUX: linear cost.",
        speedup=True, controls=(Control("radius", "Attention window radius in tokens [r]", 1, 64, 1,
                                        info="each image token looks only at tokens this close (a token is 16 "
                                        "pixels): smaller is faster, larger keeps more of the whole picture"),),
        command="attnctrl.distill.command:command",
        examples=({"model": "toyworld-flux", "prompt": "a red circle on the left and a blue square on the right",
                   "options": {"radius": 8}},),
    ),
    MethodEntry(
        FreeCustom, "FreeCustom", "One reference image per concept, composed by multi-reference self-attention.",
        inputs=("references",), pipeline="attnctrl.pipelines:FreeCustomPipeline", call=_with_references,
        mask_names=lambda config, inputs: [r.name for r in inputs["references"]], check=_check_freecustom,
        controls=(Control("mask_weights", "Reference strength [w]", 0, 6, 0.1, info=_REFERENCE_STRENGTH),),
        examples=({"prompt": "a circle in the middle", "references": [_EXAMPLE_REF],
                   "options": {"mask_weights": 2.0}},),
    ),
    MethodEntry(
        MagicFace, "MagicFace", "References bound to words of the prompt: reference-aware, then region-grouped "
        "blend attention.",
        inputs=("references",), pipeline="attnctrl.pipelines:MagicFacePipeline", call=_with_references,
        mask_names=lambda config, inputs: list(config.ref_words or [r.name for r in inputs["references"]]),
        check=_check_magicface,
        controls=(Control("ref_words", "Word of each reference in the prompt (comma-separated)",
                          info="for each reference, in order, the word of the prompt it stands for"),
                  Control("mask_weights", "Reference strength [w]", 0, 6, 0.1, info=_REFERENCE_STRENGTH),
                  Control("inject_step", "Share of steps that copy the references", 0, 1, 0.05,
                          info="the first steps copy the references' looks, the rest blend each region; more "
                          "copies more closely")),
        examples=({"prompt": "a square on the left and a circle on the right",
                   "references": [_EXAMPLE_SQUARE, _EXAMPLE_REF],
                   "options": {"ref_words": ["square", "circle"], "mask_weights": 2.0}},),
    ),
    MethodEntry(
        IRDiffusion, "IR-Diffusion", "Consistent subjects: isolation and reposition attention.",
        inputs=("subjects",), pipeline="attnctrl.pipelines:IRDiffusionPipeline", call=_with_subjects,
        mask_names=lambda config, inputs: [s.word for s in inputs["subjects"]], check=_check_irdiffusion,
        controls=(Control("mutual_lambda", "Subject consistency [λ]", 0, 1, 0.05,
                          info="inside each subject's region, how much it follows its reference's prompt: higher "
                          "keeps it closer to its reference; 0 turns it off"),),
        examples=({"prompt": "a star on the left and a square on the right", "subjects": [
            {"word": "star", "reference": {"image": "striped-green-star.png", "mask": "striped-green-star-mask.png",
                                           "prompt": "a striped green star on the left"},
             "region": [0, 0.2, 0.45, 0.8]},
            {"word": "square", "prompt": "a dotted blue square on the right", "region": [0.55, 0.2, 1, 0.8]}]},),
    ),
    MethodEntry(
        CLoRA, "CLoRA", "Several LoRAs, one concept each, by contrastive attention steering and masked fusion.",
        inputs=("loras",), pipeline="attnctrl.pipelines:CLoRAPipeline", call=_clora, prepare=_clora_prepare,
        mask_names=lambda config, inputs: [b.words for b in inputs["loras"]], check=_check_clora,
        controls=(Control("step_size", "Steering strength [η]", 0, 50, 1,
                          info="how hard the first steps push each LoRA's words to their own part of the picture, "
                          "apart from the other LoRAs'; 0 turns it off"),
                  Control("mask_threshold", "Region threshold [α]", 0, 1, 0.05,
                          info="a pixel goes to a LoRA where its words' attention is above this share of their "
                          "strongest: higher gives smaller regions")),
        examples=({"prompt": "a square on the left and a star on the right", "loras": [
            {"path": "toyworld-sks-lora.safetensors", "words": "sks square",
             "prompt": "a sks square on the left and a star on the right"},
            {"path": "toyworld-zwx-lora.safetensors", "words": "zwx star",
             "prompt": "a square on the left and a zwx star on the right"}],
            "options": {"record_layers": "res==8", "step_size": 2.0}},),
    ),
    MethodEntry(
        PrimeComposer, "PrimeComposer", "Put an object into a background: correlation diffuser, attention steering, "
        "background blending.",
        inputs=("composition",), pipeline="attnctrl.pipelines:PrimeComposerPipeline", call=_primecomposer,
        check=_check_primecomposer, defaults={"num_inference_steps": 20, "guidance_scale": None},
        controls=(Control("domain", "Background style",
                          info="same: object and background look alike (a photo into a photo); cross: a photo "
                          "object into a painting, sketch or cartoon"),),
        examples=({"model": "tiny-sd21", "steps": 3,
                   "prompt": "a yellow triangle on the left and a hollow pink circle on the right",
                   "composition": {"background": "composition-background.png", "object": "hollow-pink-circle.png",
                                   "mask": "hollow-pink-circle-mask.png", "box": [36, 16, 24, 28]},
                   "options": {"domain": "same", "rca_words": ["circle"]}},),
    ),
    MethodEntry(
        DiTCtrl, "DiTCtrl (video)", "A long video from several prompts on CogVideoX: KV-sharing, mask-guided "
        "attention, latent blending.",
        pipeline="attnctrl.pipelines:DiTCtrlPipeline", call=_ditctrl, video=True, prompts="many",
        check=_check_ditctrl, defaults={"guidance_scale": 6.0},
        controls=(Control("num_transition_blocks", "Transition segments between prompts", 0, 4, 1,
                          info="extra video segments that blend one prompt's scene into the next; 0: none"),),
        examples=({"model": "tiny-cogvideox", "prompt": ["a cat walks", "a dog runs"], "num_frames": 9, "steps": 3,
                   "options": {"overlap": 1, "num_transition_blocks": 1, "kv_steps": [1, 2]}},),
    ),
)

#: name -> entry (built-in; the ``attnctrl.methods`` entry points join on first use of :func:`entries` / :func:`entry`)
REGISTRY: dict[str, MethodEntry] = {}


def register(item: MethodEntry, replace: bool = False) -> MethodEntry:
    """Add a method to the registry (what an ``attnctrl.methods`` entry point does); its name must be new."""
    if not isinstance(item, MethodEntry):
        raise AttnCtrlError(f"register() takes an attnctrl.methods.MethodEntry, not {type(item).__name__}")
    if item.name in REGISTRY and not replace:
        raise AttnCtrlError(f"a method named {item.name!r} is already registered")
    REGISTRY[item.name] = item
    return item


def _load_entry_points() -> None:
    """Register the methods of the ``attnctrl.methods`` entry points not registered yet (called on first use of
    the registry, not at import: a plug-in imports attnctrl itself)."""
    from importlib.metadata import entry_points

    global _LOADED
    _LOADED = True
    for ep in entry_points(group="attnctrl.methods"):
        if ep.name in REGISTRY:
            continue
        try:
            item = ep.load()
            register(item() if callable(item) and not isinstance(item, MethodEntry) else item)
        except Exception as e:  # a broken plug-in must not take the built-in methods down
            logger.warning("attnctrl: cannot load the method entry point %s (%s): %s", ep.name, ep.value, e)


_LOADED = False
for _item in BUILTIN:
    register(_item)


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def entry(name: str) -> MethodEntry:
    """The registry entry of method ``name`` (e.g. ``"attention-maps"``); a clear error naming the methods."""
    key = _key(name)
    if key not in REGISTRY and not _LOADED:
        _load_entry_points()
    if key not in REGISTRY:
        raise AttnCtrlError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


def get(name: str) -> type[Method]:
    """The config class of method ``name``."""
    return entry(name).config


def entries() -> list[MethodEntry]:
    """Every registered method: the built-in ones, then those of the ``attnctrl.methods`` entry points."""
    if not _LOADED:
        _load_entry_points()
    return list(REGISTRY.values())
