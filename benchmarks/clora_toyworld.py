"""CLoRA's effect on the toyworld model: two concept LoRAs in one image, CLoRA vs both LoRAs simply active.

    python benchmarks/clora_toyworld.py [--seeds 8] [--steps 25] [--model M --loras DIR]

The LoRAs are the shipped examples ``assets/examples/toyworld-{sks,zwx}-lora.safetensors`` (written by
``python -m attnctrl.models.toyworld.lora``): "sks square" = a dotted blue square, "zwx star" = a striped green star.

* ``naive``: the base pipeline with both adapters active (``set_adapters(["sks", "zwx"], [1, 1])``), prompt
  "a sks square on the left and a zwx star on the right".
* ``clora``: :class:`~attnctrl.pipelines.CLoRAPipeline` with the inputs the CLI builds from
  ``--lora toyworld-sks-lora.safetensors:"sks square":"a sks square on the left and a star on the right"`` (and the
  same for zwx) on the prompt "a square on the left and a star on the right".
* ``clora-8x8``: the same with :data:`~attnctrl.models.toyworld.lora.CLORA_SETTINGS` (``record_layers="res==8"``,
  ``step_size=2``).
* ``single-sks`` / ``single-zwx``: each LoRA alone on "a sks square" / "a zwx star" (did the LoRA learn its concept).

The checker (:func:`attnctrl.models.toyworld.score.detect`) reports, over the seeds, how often each concept (its
shape in its colour) is drawn, how often both are in the same image, and both with their patterns too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def _rates(images, words) -> dict:
    """Fractions of images with each word's concept (its shape in its colour), with both, and both with patterns."""
    from attnctrl.models.toyworld.lora import CONCEPTS
    from attnctrl.models.toyworld.score import detect

    found = [{(o.colour, o.shape): o.pattern for o in detect(im)} for im in images]
    n = len(images)
    out = {w: sum(CONCEPTS[w][:2] in f for f in found) / n for w in words}
    out["both"] = sum(all(CONCEPTS[w][:2] in f for w in words) for f in found) / n
    out["both +pattern"] = sum(all(f.get(CONCEPTS[w][:2]) == CONCEPTS[w][2] for w in words) for f in found) / n
    return out


def main() -> None:
    import attnctrl
    from attnctrl.inputs import parse_lora
    from attnctrl.models.toyworld.examples import SHIPPED
    from attnctrl.models.toyworld.lora import CLORA_SETTINGS, CONCEPTS
    from attnctrl.pipelines import CLoRAPipeline
    from attnctrl.pipelines.clora import branches

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--loras", default=str(SHIPPED), help="folder of toyworld-{sks,zwx}-lora.safetensors")
    args = parser.parse_args()
    pipe = attnctrl.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(args.loras)
    for word in CONCEPTS:
        pipe.load_lora_weights(str(folder / f"toyworld-{word}-lora.safetensors"), adapter_name=word)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    seeds = range(args.seeds)
    results = {}

    for word in CONCEPTS:
        pipe.set_adapters([word])
        prompt = f"a {word} {CONCEPTS[word][1]}"
        images = [pipe(prompt, generator=torch.Generator().manual_seed(s), **kw).images[0] for s in seeds]
        results[f"single-{word}"] = _rates(images, [word])

    started = time.perf_counter()
    pipe.set_adapters(["sks", "zwx"], adapter_weights=[1.0, 1.0])
    naive = [pipe("a sks square on the left and a zwx star on the right", generator=torch.Generator().manual_seed(s),
                  **kw).images[0] for s in seeds]
    results["naive"] = {**_rates(naive, CONCEPTS), "s/image": (time.perf_counter() - started) / len(naive)}

    prompts, _, concepts, mask_words = branches("a square on the left and a star on the right", [parse_lora(s, i) for i, s in enumerate([
        f"{folder / 'toyworld-sks-lora.safetensors'}:sks square:a sks square on the left and a star on the right",
        f"{folder / 'toyworld-zwx-lora.safetensors'}:zwx star:a square on the left and a zwx star on the right",
    ])])
    clora = CLoRAPipeline.from_pipe(pipe)
    for name, settings in (("clora", {}), ("clora-8x8", CLORA_SETTINGS)):
        started = time.perf_counter()
        composed = [clora(prompts=prompts, loras=[None, "sks", "zwx"], concepts=concepts, mask_words=mask_words,
                          generator=torch.Generator().manual_seed(s), **kw, **settings).images[0] for s in seeds]
        results[name] = {**_rates(composed, CONCEPTS), "s/image": (time.perf_counter() - started) / len(composed)}

    print(f"toyworld, {args.seeds} seeds, {args.steps} steps, guidance {args.guidance}")
    for name, r in results.items():
        print(f"  {name:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
