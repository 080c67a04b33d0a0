"""Effect of the reference methods on the toyworld model: does the generated object take the reference's looks?

    python benchmarks/reference_toyworld.py [--seeds 8] [--steps 25] [--model M] [--only freecustom,magicface,irdiffusion]

References are the shipped examples (``assets/examples``): a striped green star and a dotted blue square, each
drawn in a scene, with its mask. Every figure is a fraction over the seeds, with and without the method, same seeds:

* ``freecustom``: prompt names the shape only ("a star"); how often the largest object drawn is a star with the
  reference's colour, and with its colour and pattern;
* ``magicface``: two references, prompt "a star and a square" with ``ref_words=["star", "square"]``;
* ``irdiffusion``: two subjects with references and target boxes (star left half, square right half) on
  "a star on the left and a square on the right" (2x the seeds, as the issue asks). Their reference prompts name the
  subject only ("a striped green star"): mutual cross-attention applies a reference's prompt inside its target
  region, so the examples' scene captions ("... in the middle") would pull the subject back to where it was.

For the two-subject cases: ``bound`` = a star in the star's reference colour and a square in the square's, both
present; ``leak`` = some star drawn in the square's colour or some square in the star's (attributes swapped).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "attnctrl" / "assets" / "examples"


def _examples() -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((EXAMPLES / "examples.json").read_text()) if "image" in e}


def _reference(example: dict, subject_only: bool = False):
    import attnctrl

    prompt = f"a {example['pattern']} {example['colour']} {example['shape']}" if subject_only else example["prompt"]
    return attnctrl.Reference(EXAMPLES / example["image"], EXAMPLES / example["mask"], prompt=prompt)


def _single(images, example: dict) -> dict:
    from attnctrl.models.toyworld.score import detect

    hits = {"shape+colour": 0, "shape+colour+pattern": 0}
    for im in images:
        objs = detect(im)
        if objs and objs[0].shape == example["shape"] and objs[0].colour == example["colour"]:
            hits["shape+colour"] += 1
            hits["shape+colour+pattern"] += objs[0].pattern == example["pattern"]
    return {k: v / len(images) for k, v in hits.items()}


def _pair(images, a: dict, b: dict) -> dict:
    from attnctrl.models.toyworld.score import detect

    bound = leak = 0
    for im in images:
        seen = {(o.shape, o.colour) for o in detect(im)}
        bound += (a["shape"], a["colour"]) in seen and (b["shape"], b["colour"]) in seen
        leak += (a["shape"], b["colour"]) in seen or (b["shape"], a["colour"]) in seen
    return {"bound": bound / len(images), "leak": leak / len(images)}


def main() -> None:
    import attnctrl
    from attnctrl.pipelines import FreeCustomPipeline, IRDiffusionPipeline, MagicFacePipeline, Subject

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--only", default="freecustom,magicface,irdiffusion")
    args = parser.parse_args()
    only = set(args.only.split(","))
    pipe = attnctrl.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    ex = _examples()
    star, square = ex["striped-green-star"], ex["dotted-blue-square"]
    kw = dict(num_inference_steps=args.steps, guidance_scale=5.0)

    def run(make, seeds):
        started = time.perf_counter()
        images = [make(torch.Generator().manual_seed(s)) for s in seeds]
        return images, (time.perf_counter() - started) / len(images)

    print(f"toyworld reference methods: {args.seeds} seeds, {args.steps} steps, model {args.model}")
    seeds = range(args.seeds)
    if "freecustom" in only:
        fc = FreeCustomPipeline.from_pipe(pipe)
        for example in (star, square):
            prompt = f"a {example['shape']}"
            plain, t0 = run(lambda g, p=prompt: pipe(p, generator=g, **kw).images[0], seeds)
            ours, t1 = run(lambda g, p=prompt, e=example: fc(p, references=[_reference(e)], generator=g,
                                                              **kw).images[0], seeds)
            print(f"  freecustom {example['name']:20s} plain {_single(plain, example)} ({t0:.1f} s/image)\n"
                  f"  {'':32s} ours  {_single(ours, example)} ({t1:.1f} s/image)")
    if "magicface" in only:
        mf = MagicFacePipeline.from_pipe(pipe)
        prompt = "a star and a square"
        plain, t0 = run(lambda g: pipe(prompt, generator=g, **kw).images[0], seeds)
        ours, t1 = run(lambda g: mf(prompt, references=[_reference(star), _reference(square)],
                                    ref_words=["star", "square"], generator=g, **kw).images[0], seeds)
        print(f"  magicface  two references        plain {_pair(plain, star, square)} ({t0:.1f} s/image)\n"
              f"  {'':32s} ours  {_pair(ours, star, square)} ({t1:.1f} s/image)")
    if "irdiffusion" in only:
        ir = IRDiffusionPipeline.from_pipe(pipe)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        prompt = "a star on the left and a square on the right"
        subjects = [Subject("star", reference=_reference(star, subject_only=True),
                            region=(0, size // 8, size // 2, size * 7 // 8)),
                    Subject("square", reference=_reference(square, subject_only=True),
                            region=(size // 2, size // 8, size, size * 7 // 8))]
        seeds2 = range(2 * args.seeds)
        plain, t0 = run(lambda g: pipe(prompt, generator=g, **kw).images[0], seeds2)
        ours, t1 = run(lambda g: ir(prompt, subjects=subjects, generator=g, **kw).images[0], seeds2)
        print(f"  irdiffusion two subjects         plain {_pair(plain, star, square)} ({t0:.1f} s/image)\n"
              f"  {'':32s} ours  {_pair(ours, star, square)} ({t1:.1f} s/image)")


if __name__ == "__main__":
    main()
