"""Half precision: every method on the tiny models in float32, bfloat16 and float16 on the CPU, against float32.

    python benchmarks/half_precision.py [--steps 3] [--methods plain,clora,...] [--families sd15,...] [--threads 1]

Every (method, family) pair a method supports runs with the same prompt, seed and inputs on a fresh
``attnctrl.models.tiny_pipeline(family).to(dtype)`` per run (128 px images, 9 x 64 x 64 video; 256 px where the method's
tests use it). One row per dtype: method, family, dtype, whether the output (the final image or video,
``output_type="np"``, in [0, 1]) is finite, ``max|d|`` = its max absolute difference from the float32 output, the
run's seconds, and a note: the same comparison for a side output (heat map, fusion or subject masks; for a mask the
mean difference is the fraction of flipped pixels), or why the run failed: "not supported on CPU" (an op with no
CPU kernel for the dtype) or the error, with the innermost attnctrl frame and the op's caller when that is not
attnctrl (an unsupported op that attnctrl's own code calls is an attnctrl bug, not a CPU limit).
``plain`` rows are the base pipeline with no method: the model's own half-precision noise. A method far above its
family's plain row is suspect. Variants: AgentAttention with float32 softmaxes; CLEAR with the tiled (log-sum-exp)
backend; DiTCtrl mask-guided. CLoRA's LoRAs are ``random_lora(..., scale=0.1)``: at the tests' default scale 0.5 the
attention logits of the tiny UNet reach ~90 and even float32 output moves by ~0.5 for a 1e-3 change of the input.
``--threads 1`` avoids thread stalls on a busy CPU
(the whole table: about 75 s on 2 cores with one thread).
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnctrl
from attnctrl.methods import (
    CLEAR,
    AgentAttention,
    AttentionMaps,
    CLoRA,
    DiTCtrl,
    FreeCustom,
    IRDiffusion,
    MagicFace,
    PrimeComposer,
)
from attnctrl.models import TINY_FAMILIES, tiny_pipeline
from attnctrl.models.lora import random_lora
from attnctrl.pipelines import (
    CLoRAPipeline,
    DiTCtrlPipeline,
    FreeCustomPipeline,
    IRDiffusionPipeline,
    MagicFacePipeline,
    PrimeComposerPipeline,
    Reference,
    Subject,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILY = {"sd15": "sd", "sd21": "sd", "sdxl": "sdxl", "flux": "flux", "cogvideox": "cogvideox"}
STEPS = 3
LORA_SCALE = 0.1  # random LoRAs of CLoRA (see the docstring)
UNSUPPORTED = re.compile(r"not implemented for '(Half|BFloat16)'|Half.*not supported|unsupported.*(Half|BFloat16)")


def families(config_cls) -> list[str]:
    return [f for f in TINY_FAMILIES if FAMILY[f] in config_cls.families]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int, size: int = 128) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def box(x0, y0, x1, y1, size: int = 128) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


REFS = [Reference(picture(1), box(10, 10, 70, 70), "a red circle"),
        Reference(picture(2), box(50, 40, 120, 110), "a striped square")]


def plain(pipe, family, lora_dir, **kw):
    video = family == "cogvideox"
    kw = {**kw, "num_frames": 9} if video else {**kw, "max_sequence_length": 32} if family == "flux" else kw
    out = pipe("a photo of a cat", num_inference_steps=STEPS, generator=gen(), output_type="np", **kw)
    return (out.frames if video else out.images), None


def applied(config, **kw):
    def go(pipe, family, lora_dir):
        with attnctrl.apply(pipe, config) as handle:
            out, _ = plain(pipe, family, lora_dir, **kw)
            heat = handle.heat_maps()["cat"] if isinstance(config, AttentionMaps) else None
        return out, (None if heat is None else ("heat map", heat))
    return go


def freecustom(pipe, family, lora_dir):
    out = FreeCustomPipeline.from_pipe(pipe)("a circle and a square", references=REFS, mask_weights=[3.0, 2.0],
                                             num_inference_steps=STEPS, output_type="np", generator=gen())
    return out.images, None


def magicface(pipe, family, lora_dir):
    mf = MagicFacePipeline.from_pipe(pipe)
    out = mf("a woman wearing a hat", references=REFS, ref_words=["woman", "hat"], num_inference_steps=STEPS,
             inject_step=1, output_type="np", generator=gen())
    return out.images, ("reference masks", mf.last_run.reference_masks().float())


def irdiffusion(pipe, family, lora_dir):
    ir = IRDiffusionPipeline.from_pipe(pipe)
    ref = Reference(picture(1), box(8, 8, 56, 56), "a red circle")
    subjects = [Subject("cat", ref, region=(0, 0.25, 0.45, 0.75)), Subject("dog", prompt="a dog")]  # dog: rehearsal
    out = ir("a cat and a dog", subjects=subjects, num_inference_steps=STEPS, output_type="np", generator=gen(3))
    return out.images, ("subject masks", ir.last_subject_masks.float())


def clora(pipe, family, lora_dir):
    cl = CLoRAPipeline.from_pipe(pipe)
    loras = [None, str(lora_dir / f"{family}-dog.safetensors"), str(lora_dir / f"{family}-cat.safetensors")]
    size = 256 if family == "sdxl" else 128
    try:
        out = cl(["a cat and a dog", "a sks dog and a cat", "a zwx cat and a dog"], loras,
                 [["cat", "cat", "zwx cat"], ["dog", "sks dog", "dog"]], [[], ["sks dog"], ["zwx cat"]],
                 num_inference_steps=STEPS, max_iter_to_alter=2, iterative_steps=(0,), iterative_steps_steps=1,
                 height=size, width=size, output_type="np", generator=gen())
    finally:
        if pipe.get_list_adapters():
            pipe.unload_lora_weights()
    return out.images, ("fusion masks", cl.last_masks.float())


def primecomposer(pipe, family, lora_dir):
    size = 256 if family == "sdxl" else 128
    obj = np.zeros((size, size), np.uint8)
    obj[30 * size // 128 : 100 * size // 128, 20 * size // 128 : 90 * size // 128] = 255
    q = size // 4
    out = PrimeComposerPipeline.from_pipe(pipe)(
        picture(1, size), picture(2, size), obj, location=(q, q, 3 * q, 3 * q), prompt="a cat",
        domain="same" if family == "sd15" else "cross", rca_words=["cat"], num_inference_steps=STEPS, height=size,
        width=size, output_type="np", generator=gen())
    return out.images, None


def ditctrl(**options):
    def go(pipe, family, lora_dir):
        out = DiTCtrlPipeline.from_pipe(pipe)(["a cat walks", "a dog runs"], num_frames=9, num_inference_steps=STEPS,
                                              overlap=1, num_transition_blocks=1, kv_steps=(1, STEPS),
                                              output_type="np", generator=gen(), **options)
        return out.frames, None
    return go


CASES = [  # (row label, families, runner(pipe, family, lora_dir) -> (output, None or (side name, side array)))
    ("plain", list(TINY_FAMILIES), plain),
    ("attention-maps", families(AttentionMaps), applied(AttentionMaps(words=["cat"]))),
    ("agent", families(AgentAttention), applied(AgentAttention(), height=256, width=256)),
    ("agent attn_precision=fp32", families(AgentAttention),
     applied(AgentAttention(attn_precision="fp32"), height=256, width=256)),
    ("clear r=3 (auto: dense)", families(CLEAR), applied(CLEAR(radius=3))),
    ("clear r=3 tiled", families(CLEAR), applied(CLEAR(radius=3, backend="tiled"))),
    ("freecustom", families(FreeCustom), freecustom),
    ("magicface", families(MagicFace), magicface),
    ("irdiffusion", families(IRDiffusion), irdiffusion),
    ("clora", families(CLoRA), clora),
    ("primecomposer", families(PrimeComposer), primecomposer),
    ("ditctrl", families(DiTCtrl), ditctrl()),
    ("ditctrl mask-guided", families(DiTCtrl), ditctrl(mask_guided=True, subject_words=["cat", "dog"])),
]


def where(exc: BaseException) -> str:
    """The innermost attnctrl frame of a failure, and the caller of the failing op where that is not attnctrl."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/attnctrl/" in f.filename]
    caller = next((f for f in reversed(frames) if "/torch/" not in f.filename), None)
    text = f"at {ours[-1].filename.split('/attnctrl/')[-1]}:{ours[-1].lineno}" if ours else "outside attnctrl"
    if caller is not None and "/attnctrl/" not in caller.filename:
        text += f", op called from {caller.filename.split('site-packages/')[-1]}:{caller.lineno}"
    return text


def attempt(runner, pipe, family, lora_dir):
    """``(output, side, seconds, failure note or None)`` of one run."""
    t = time.perf_counter()
    try:
        with torch.no_grad():
            out, side = runner(pipe, family, lora_dir)
        return np.asarray(out, np.float32), side, time.perf_counter() - t, None
    except Exception as e:  # every failure becomes a row of the table
        what = "not supported on CPU" if UNSUPPORTED.search(str(e)) else f"error: {type(e).__name__}"
        return None, None, time.perf_counter() - t, f"{what} ({str(e).splitlines()[0][:90]}; {where(e)})"


def max_mean_diff(a, b) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(d.max()), float(d.mean())


def print_rows(label, family, rows) -> None:
    ref, ref_side = rows["fp32"][:2]
    for name, (out, side, seconds, failure) in rows.items():
        if failure or ref is None:
            print(f"{label:<28} {family:<10} {name:<5} {'-':<6} {'-':>8} {seconds:6.1f}  {failure or 'no fp32 output'}",
                  flush=True)
            continue
        note = ""
        if side is not None:
            dmax, dmean = max_mean_diff(side[1], ref_side[1])
            bad = "" if np.isfinite(np.asarray(side[1], np.float32)).all() else ", NON-FINITE"
            note = f"{side[0]}: max|d| {dmax:.3g}, mean|d| {dmean:.3g}{bad}"
        print(f"{label:<28} {family:<10} {name:<5} {str(bool(np.isfinite(out).all())):<6} "
              f"{max_mean_diff(out, ref)[0]:8.4f} {seconds:6.1f}  {note}", flush=True)


def main() -> None:
    global STEPS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--methods", default=None, help="comma-separated row-label prefixes (default: every row)")
    p.add_argument("--families", default=",".join(TINY_FAMILIES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 avoids stalls on a loaded machine)")
    args = p.parse_args()
    STEPS = args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("attnctrl").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    wanted = args.methods.split(",") if args.methods else None
    cases = [c for c in CASES if wanted is None or any(c[0].startswith(w) for w in wanted)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {STEPS} steps, seed 0")
    header = f"{'method':<28} {'family':<10} {'dtype':<5} {'finite':<6} {'max|d|':>8} {'s':>6}  note"
    print(header + "\n" + "-" * len(header))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        lora_dir = Path(tmp)
        for family in args.families.split(","):
            if FAMILY[family] in CLoRA.families and any(label == "clora" for label, _, _ in cases):
                for seed, name in ((1, "dog"), (2, "cat")):
                    random_lora(tiny_pipeline(family), lora_dir / f"{family}-{name}.safetensors", seed=seed,
                                scale=LORA_SCALE)
            for label, fams, runner in cases:
                if family in fams:  # a fresh pipeline per run: a failed run must not change the next one
                    print_rows(label, family, {name: attempt(runner, tiny_pipeline(family).to(dtype), family, lora_dir)
                                               for name, dtype in DTYPES.items()})
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
