"""Effect of the reference methods on the toyworld model: does the generated object take the reference's looks?

    python benchmarks/reference_toyworld.py [--seeds 8] [--steps 25] [--model M]
                                            [--only freecustom,magicface,irdiffusion,primecomposer]

References are the shipped examples (``assets/examples``): a striped green star, a dotted blue square, a hollow pink
circle, a striped purple cross, a striped green square and a striped red circle, each drawn in a scene, with its
mask. Prompts name shapes and places (and, for IR-Diffusion's leakage rows, one subject's look). Every figure is a
fraction over the seeds, with and without the method, same seeds (:func:`~attnctrl.models.toyworld.examples.took_look`,
:func:`~attnctrl.models.toyworld.examples.pair_rates`):

* ``freecustom``: each shipped reference, prompt "a <its shape> in the middle", at the default mask weight (3) and
  at 2; how often the largest object drawn is that shape in the reference's colour, and with its colour and pattern;
* ``magicface``: two references, prompt "a star on the left and a square on the right" with
  ``ref_words=["star", "square"]``, and the striped green square and striped red circle on "a square on the left
  and a circle on the right", each at the default mask weight and at 2;
* ``irdiffusion``: two subjects with references and target boxes (star left half, square right half), 2x the seeds
  (as the issue asks), on the look-free prompt, on the prompt that names both looks (where plain generation can
  swap them) and on the two prompts that name one subject's look (where plain generation carries that look onto the
  other subject: the attribute leakage IR-Diffusion exists to remove). Their reference prompts describe the subject
  where it goes ("a striped green star on the left"): mutual cross-attention applies a reference's prompt inside its
  target region, so the examples' scene captions ("... in the middle") would pull the subject back to where it was,
  and a prompt with no place (rare in toyworld's captions) often loses the star. Each row with both mask rules
  (``mask_rule="official"``, the default, and ``"coverage"``), plus the look-free prompt with the regions from the
  layout rehearsal instead of boxes.

* ``primecomposer``: each shipped reference put into the shipped composition background (a yellow triangle
  on the left) at the example's box, same-domain defaults, 20 steps (its default), ``rca_words`` = the shape; the
  largest object centred in the box judged as for ``freecustom``; plain = the same prompt without the method. Two
  prompts: one naming the object's looks, as a composite's description does ("a yellow triangle on the left and a
  hollow pink circle on the right"), and one naming only its shape (on this model a shape named without a look
  takes the other objects' looks, docs/toyworld.md).

For the two-subject cases: ``each`` = subjects in their own reference's colour (``each+pattern``: and pattern);
``bound`` = both subjects in their own colour; ``leak`` = some subject's shape drawn in the other's colour
(attributes swapped).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch


def main() -> None:
    import attnctrl
    from attnctrl.models.toyworld.examples import (
        SHIPPED,
        look_words,
        pair_rates,
        reference_of,
        shipped_composition,
        shipped_references,
        took_look,
    )
    from attnctrl.pipelines import (
        FreeCustomPipeline,
        IRDiffusionPipeline,
        MagicFacePipeline,
        PrimeComposerPipeline,
        Subject,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--only", default="freecustom,magicface,irdiffusion,primecomposer")
    args = parser.parse_args()
    only = set(args.only.split(","))
    pipe = attnctrl.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    ex = shipped_references()
    star, square = ex["striped-green-star"], ex["dotted-blue-square"]
    kw = dict(num_inference_steps=args.steps, guidance_scale=5.0)

    def run(make, seeds):
        started = time.perf_counter()
        images = [make(torch.Generator().manual_seed(s)) for s in seeds]
        return images, (time.perf_counter() - started) / len(images)

    def report(label, plain, ours, rates):
        (a, t0), (b, t1) = plain, ours
        print(f"  {label}\n    plain {rates(a)} ({t0:.1f} s/image)\n    ours  {rates(b)} ({t1:.1f} s/image)",
              flush=True)

    print(f"toyworld reference methods: {args.seeds} seeds, {args.steps} steps, model {args.model}")
    seeds = range(args.seeds)
    if "freecustom" in only:
        fc = FreeCustomPipeline.from_pipe(pipe)
        for example in ex.values():
            prompt = f"a {example['shape']} in the middle"
            plain = run(lambda g, p=prompt: pipe(p, generator=g, **kw).images[0], seeds)
            for weight in (3.0, 2.0):
                report(f"freecustom {example['name']}, weight {weight:g}", plain,
                       run(lambda g, p=prompt, e=example, w=weight: fc(p, references=[reference_of(e)], mask_weights=w,
                                                                        generator=g, **kw).images[0], seeds),
                       lambda images, e=example: took_look(images, e))
    if "magicface" in only:
        mf = MagicFacePipeline.from_pipe(pipe)
        for a, b in ((star, square), (ex["striped-green-square"], ex["striped-red-circle"])):
            prompt = f"a {a['shape']} on the left and a {b['shape']} on the right"
            plain = run(lambda g, p=prompt: pipe(p, generator=g, **kw).images[0], seeds)
            for weight in (3.0, 2.0):
                report(f"magicface {a['name']} + {b['name']}, weight {weight:g}", plain,
                       run(lambda g, p=prompt, a=a, b=b, w=weight: mf(
                           p, references=[reference_of(a), reference_of(b)], ref_words=[a["shape"], b["shape"]],
                           mask_weights=w, generator=g, **kw).images[0], seeds),
                       functools.partial(pair_rates, a=a, b=b))
    if "irdiffusion" in only:
        ir = IRDiffusionPipeline.from_pipe(pipe)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        subjects = [Subject("star", reference=reference_of(star, "on the left"),
                            region=(0, size // 8, size // 2, size * 7 // 8)),
                    Subject("square", reference=reference_of(square, "on the right"),
                            region=(size // 2, size // 8, size, size * 7 // 8))]
        laid_out = [Subject(s.word, reference=s.reference) for s in subjects]  # regions from the layout rehearsal
        seeds2 = range(2 * args.seeds)
        for label, prompt, subj in (
                ("look-free prompt", "a star on the left and a square on the right", subjects),
                ("looks named", "a striped green star on the left and a dotted blue square on the right", subjects),
                ("star's look named", "a striped green star on the left and a square on the right", subjects),
                ("square's look named", "a star on the left and a dotted blue square on the right", subjects),
                ("look-free prompt, layout rehearsal", "a star on the left and a square on the right", laid_out)):
            plain = run(lambda g, p=prompt: pipe(p, generator=g, **kw).images[0], seeds2)
            for rule in ("official", "coverage"):
                report(f"irdiffusion, {label}, mask_rule={rule}", plain,
                       run(lambda g, p=prompt, s=subj, r=rule: ir(p, subjects=s, mask_rule=r, generator=g,
                                                                   **kw).images[0], seeds2),
                       functools.partial(pair_rates, a=star, b=square))
    if "primecomposer" in only:
        pc = PrimeComposerPipeline.from_pipe(pipe)
        comp = shipped_composition()
        box = comp["box"]
        for example in ex.values():
            for label, named in (("looks named", look_words(example)), ("shape only", example["shape"])):
                prompt = f"a yellow triangle on the left and a {named} on the right"
                report(f"primecomposer {example['name']}, {label}",
                       run(lambda g, p=prompt: pipe(p, generator=g, num_inference_steps=20).images[0], seeds),
                       run(lambda g, p=prompt, e=example: pc(
                           SHIPPED / comp["background"], SHIPPED / e["image"], SHIPPED / e["mask"], location=box,
                           prompt=p, domain="same", rca_words=[e["shape"]], generator=g).images[0], seeds),
                       lambda images, e=example: took_look(images, e, box=box))


if __name__ == "__main__":
    main()
