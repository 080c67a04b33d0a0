"""The toyworld yardstick: how often the model draws what the held-out captions say, and how fast.

    python benchmarks/toyworld.py [--model toyworld] [--steps 25] [--guidance 5] [--limit N]

Over the fixed sets of :func:`attnctrl.models.toyworld.bench.benchmark_captions` (32 single-object and 64
two-object captions, every object a colour-shape combination never drawn in training), one image per caption
(seed = its index), scored by the pixel-rule checker: the fraction of objects with the right colour, shape, side
and pattern (also over the striped, dotted and hollow objects alone: a plain object drawn plain counts as a right
pattern), and of images with everything right; on 32 look-alike captions (2-3 objects, no look named:
:func:`~attnctrl.models.toyworld.bench.evaluate_look_alike`), how often all are drawn in one colour. Then the time of one 25-step generation at the model's native
size (best of 3), as a newcomer's first ``attnctrl generate`` runs it.

A FLUX-variant folder (``attnctrl train-toy --arch flux``) is run as its ``attnctrl.json`` says (guidance as
``true_cfg_scale`` against the empty prompt, 128 px, 32 text tokens) through
:class:`~attnctrl.models.toyworld.flux.CheckerView`, its images box-filtered to the 64 px the checker reads.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toyworld")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--limit", type=int, default=None, help="only the first N captions of each set (a quick look)")
    a = p.parse_args()

    import attnctrl
    from attnctrl.models.toyworld.bench import benchmark_captions, evaluate, evaluate_look_alike

    pipe = attnctrl.load_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    if type(pipe).__name__ == "FluxPipeline":  # the flux variant: true CFG at 128 px, scored at 64 px
        from attnctrl.models.toyworld.flux import CheckerView

        pipe = CheckerView(pipe)
    print(f"toyworld benchmark: {a.model}, {a.steps} steps, guidance {a.guidance}, "
          f"{torch.get_num_threads()} CPU threads")

    def patterned(r):
        n = r["patterned_objects"]
        return f"striped/dotted/hollow ones {r['patterned']:.0%} of {n}" if n else "no striped/dotted/hollow ones"

    for name, captions in benchmark_captions().items():
        captions = captions[: a.limit] if a.limit else captions
        r = evaluate(pipe, captions, steps=a.steps, guidance=a.guidance)
        print(f"  {name:<6} {r['images']:3d} images, {r['objects']:3d} objects: colour {r['colour']:.0%}  "
              f"shape {r['shape']:.0%}  side {r['side']:.0%}  pattern {r['pattern']:.0%} ({patterned(r)})  "
              f"found {r['found']:.0%}  "
              f"all right {r['all']:.0%}   ({r['seconds_per_image']:.2f} s/image in batches of 8)")
    r = evaluate_look_alike(pipe, n=a.limit or 32, steps=a.steps, guidance=a.guidance)
    print(f"  look-alike {r['images']:3d} images (2-3 objects, no look named): all in one colour {r['same']:.0%}  "
          f"all found {r['found']:.0%}")
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        pipe("a red circle on the left", num_inference_steps=25, guidance_scale=a.guidance,
             generator=torch.Generator().manual_seed(0))
        best = min(best, time.perf_counter() - started)
    size = pipe.size if hasattr(pipe, "size") else pipe.unet.config.sample_size * pipe.vae_scale_factor
    print(f"  one 25-step generation at {size}x{size}: {best:.2f} s (best of 3, incl. text encoding and decoding)")


if __name__ == "__main__":
    main()
