"""CLoRA's effect on the toyworld model: two concept LoRAs in one image, CLoRA vs both LoRAs simply active.

    python benchmarks/clora_toyworld.py [--seeds 8] [--steps 25] [--model M --loras DIR]

The LoRAs are the shipped examples ``assets/examples/toyworld-{sks,zwx}-lora.safetensors`` (written by
``python -m attnctrl.models.toyworld.lora``): ``sks`` = a dotted blue square, ``zwx`` = a striped green star.

* ``naive``: the base pipeline with both adapters active (``set_adapters(["sks", "zwx"], [1, 1])``), prompt
  "a sks on the left and a zwx on the right".
* ``clora``: :class:`~attnctrl.pipelines.CLoRAPipeline` with three branches: the plain prompt "a square on the left
  and a star on the right" and one prompt per LoRA in which its word replaces its object; the concepts pair
  square/sks and star/zwx, each LoRA's mask is its word.
* ``single-sks`` / ``single-zwx``: each LoRA alone on "a sks" / "a zwx" (did the LoRA learn its concept at all).

The checker (:func:`attnctrl.models.toyworld.score`, matching by colour) reports, over the seeds, how often it finds
each concept (right colour and shape) and both in the same image; ``+pattern`` also asks for the right pattern.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "attnctrl" / "assets" / "examples"
TARGET = "a dotted blue square and a striped green star"


def _rates(images, caption: str) -> dict:
    from attnctrl.models.toyworld import score

    found = [[o["colour"] and o["shape"] for o in score(im, caption)["objects"]] for im in images]
    strict = [[o["colour"] and o["shape"] and o["pattern"] for o in score(im, caption)["objects"]] for im in images]
    n = len(images)
    out = {f"concept {i + 1}": sum(f[i] for f in found) / n for i in range(len(found[0]))}
    out["all"] = sum(all(f) for f in found) / n
    out["all +pattern"] = sum(all(f) for f in strict) / n
    return out


def main() -> None:
    import attnctrl
    from attnctrl.pipelines import CLoRAPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--loras", default=str(EXAMPLES), help="folder of toyworld-{sks,zwx}-lora.safetensors")
    args = parser.parse_args()
    pipe = attnctrl.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    for word in ("sks", "zwx"):
        pipe.load_lora_weights(str(Path(args.loras) / f"toyworld-{word}-lora.safetensors"), adapter_name=word)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    seeds = range(args.seeds)
    results = {}

    for word, caption in (("sks", "a dotted blue square"), ("zwx", "a striped green star")):
        pipe.set_adapters([word])
        images = [pipe(f"a {word}", generator=torch.Generator().manual_seed(s), **kw).images[0] for s in seeds]
        results[f"single-{word}"] = _rates(images, caption)

    started = time.perf_counter()
    pipe.set_adapters(["sks", "zwx"], adapter_weights=[1.0, 1.0])
    naive = [pipe("a sks on the left and a zwx on the right", generator=torch.Generator().manual_seed(s), **kw).images[0]
             for s in seeds]
    results["naive"] = {**_rates(naive, TARGET), "s/image": (time.perf_counter() - started) / len(naive)}

    clora = CLoRAPipeline.from_pipe(pipe)
    started = time.perf_counter()
    composed = [clora(
        prompts=["a square on the left and a star on the right", "a sks on the left and a star on the right",
                 "a square on the left and a zwx on the right"],
        loras=[None, "sks", "zwx"], concepts=[["square", "sks", "square"], ["star", "star", "zwx"]],
        mask_words=[[], ["sks"], ["zwx"]], generator=torch.Generator().manual_seed(s), **kw,
    ).images[0] for s in seeds]
    results["clora"] = {**_rates(composed, TARGET), "s/image": (time.perf_counter() - started) / len(composed)}

    print(f"toyworld, {args.seeds} seeds, {args.steps} steps, guidance {args.guidance}")
    for name, r in results.items():
        print(f"  {name:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
