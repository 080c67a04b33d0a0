"""CLEAR on toyworld-flux: what local attention keeps, what it costs, and whether it carries the model to larger images.

    python benchmarks/clear_toyworld.py [--model toyworld-flux] [--limit N] [--distill-steps 300]
                                        [--work DIR] [--skip-distill] [--hires 256:8,512:2]

All on the same held-out captions and seeds (:func:`attnctrl.models.toyworld.bench.benchmark_captions`, caption i
with seed i), at the model's 25 steps and true CFG 5, scored by the toyworld checker (images box-filtered to 64 px):

1. **Training-free** CLEAR at radii covering 1/8, 1/4 and 1/2 of the trained token grid (16 x 16 at 128 px: r = 2, 4,
   8) against full attention: checker scores (single object colour / shape / side, two objects colour / shape), the
   time of the attention op alone (CLEAR's ``auto`` kernel vs full SDPA over the same tokens, the model's 4 heads x 32)
   and of one whole generation.
2. **Distilled**: ``attnctrl distill clear`` on the model at each radius (the paper's recipe at toy scale: teacher =
   the model with full attention, student = the model with CLEAR, only the attention projections train; data =
   teacher images of training-distribution captions), then the same table with the distilled weights.
3. **Larger than trained** (256 px = 32 x 32 tokens on 8 captions, 512 px = 64 x 64 on 2: a 512-px image takes
   about a minute here): full attention vs CLEAR r = 8 (half the trained grid: each query sees about what it saw at
   128 px), training-free and distilled. Objects are counted:
   ``count`` is the fraction of images in which the checker finds exactly as many objects as the caption names,
   ``more`` the fraction in which it finds more (duplicates, the usual failure beyond the trained size).

Nothing here asserts: it prints what it measured. Distilled weights are kept in ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FRACTIONS = (8, 4, 2)  # radius = grid side / fraction


def timed(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def token_grid(pipe, size: int) -> int:
    return size // (pipe.vae_scale_factor * 2)


@torch.no_grad()
def op_ratio(pipe, size: int, radius: float, text: int) -> tuple[float, float, str]:
    """(full SDPA seconds, CLEAR seconds, CLEAR's backend) for one attention call of the model at ``size`` px."""
    from attnctrl.kernels.local_attention import LocalSpec, choose_backend, local_attention

    cfg = pipe.transformer.config
    side = token_grid(pipe, size)
    spec = LocalSpec(side, side, text, radius)
    g = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(1, cfg.num_attention_heads, text + side * side, cfg.attention_head_dim, generator=g)
               for _ in range(3))
    full = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    local = timed(lambda: local_attention(q, k, v, spec))
    return full, local, choose_backend(spec, q.device)


class _Keep:
    """A pipeline that keeps the images it returns (so they are scored and counted from one generation)."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, []

    def __call__(self, *args, **kwargs):
        out = self.pipe(*args, **kwargs)
        self.images += out.images
        return out


def evaluate_variant(pipe, plugin, captions: dict, size: int, steps: int, guidance: float) -> dict:
    """Checker scores of ``captions`` (``{"single": [...], "two": [...]}``) with ``plugin`` applied (None: full),
    plus object counts: ``count``, the fraction of images in which the checker finds exactly as many objects as the
    caption names, ``more`` the fraction in which it finds more."""
    import attnctrl
    from attnctrl.models.toyworld.bench import evaluate
    from attnctrl.models.toyworld.flux import CheckerView
    from attnctrl.models.toyworld.score import detect, parse_caption

    out = {}
    handle = attnctrl.apply(pipe, plugin) if plugin is not None else None
    try:
        for name, caps in captions.items():
            kept = _Keep(CheckerView(pipe, size=size))
            out[name] = evaluate(kept, caps, steps=steps, guidance=guidance)
            named = [len(parse_caption(c)) for c in caps]
            found = [len(detect(image)) for image in kept.images]
            out[name]["count"] = sum(f == n for f, n in zip(found, named)) / len(caps)
            out[name]["more"] = sum(f > n for f, n in zip(found, named)) / len(caps)
    finally:
        if handle is not None:
            handle.remove()
    return out


def teacher_data(pipe, folder: Path, n: int) -> Path:
    """``n`` teacher images (full attention, the model's recommended call) of training-distribution captions, saved
    as ``i.png`` + ``i.txt``: the data ``attnctrl distill clear --data`` reads (the paper distils on images its
    teacher generated)."""
    from attnctrl.models import recommended_settings
    from attnctrl.models.toyworld.world import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) >= n:
        return folder
    call = recommended_settings(pipe)
    call.pop("guidance_scale", None)
    for i in range(n):
        caption = make_scene(700_000_000 + i).caption
        image = pipe(caption, generator=torch.Generator("cpu").manual_seed(i), **call).images[0]
        image.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption + "\n")
    return folder


def distill(model: str, radius: float, data: Path, out: Path, steps: int) -> tuple[Path, float]:
    """Run ``attnctrl distill clear`` (the command line a user runs); returns the weights and the minutes it took."""
    if out.is_file():
        return out, float("nan")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnctrl", "distill", "clear", "-m", model, "--radius", str(radius),
                    "--data", str(data), "--steps", str(steps), "--batch", "8", "--lr", "1e-4", "-o", str(out)],
                   check=True)
    return out, (time.perf_counter() - started) / 60


def row(label: str, r: dict, extra: str = "") -> str:
    s, t = r["single"], r.get("two")
    cells = f"| {label} | {s['colour']:.0%} | {s['shape']:.0%} | {s['side']:.0%} | {s['count']:.0%} / {s['more']:.0%}"
    if t is not None:
        cells += f" | {t['colour']:.0%} | {t['shape']:.0%} | {t['count']:.0%} / {t['more']:.0%}"
    return cells + f" |{extra}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toyworld-flux")
    p.add_argument("--limit", type=int, default=16, help="captions of each set (single, two objects)")
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--teacher-images", type=int, default=64)
    p.add_argument("--work", default="clear-toyworld-work", help="folder for teacher images and distilled weights")
    p.add_argument("--skip-distill", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--hires", default="256:8,512:2",
                   help="sizes above the trained one, each with its number of single-object captions ('' for none)")
    a = p.parse_args()

    import attnctrl
    from attnctrl.methods import CLEAR
    from attnctrl.models import recommended_settings
    from attnctrl.models.toyworld.bench import benchmark_captions

    pipe = attnctrl.load_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    rec = recommended_settings(pipe)
    size, cfg = rec.get("height", 128), rec.get("true_cfg_scale", 5.0)
    steps = rec["num_inference_steps"] = a.steps or rec.get("num_inference_steps", 25)
    text = rec.get("max_sequence_length", 32)
    side = token_grid(pipe, size)
    radii = [side // f for f in FRACTIONS]
    every = benchmark_captions()
    captions = {"single": every["single"][: a.limit], "two": every["two"][: a.limit]}
    work = Path(a.work)
    print(f"CLEAR on {a.model}: {size} px = {side}x{side} tokens, {steps} steps, true CFG {cfg}, "
          f"{len(captions['single'])} + {len(captions['two'])} held-out captions, {torch.get_num_threads()} threads")

    weights: dict[float, Path] = {}
    if not a.skip_distill:
        data = teacher_data(pipe, work / "teacher", a.teacher_images)
        for r in radii:
            weights[r], minutes = distill(a.model, r, data, work / f"clear_r{r}.safetensors", a.distill_steps)
            print(f"  distilled r = {r}: {a.distill_steps} steps"
                  + (f", {minutes:.1f} min" if minutes == minutes else " (reused)"))

    header = ("| attention | single colour | shape | side | count / more | two colour | shape | count / more |"
              " op time vs full | image time |")
    print("\nTable 1-2, at the trained size (op: one attention call, CLEAR's kernel vs full SDPA, best of 3)")
    print(header)
    print("|" + "---|" * 10)

    def image_seconds(plugin) -> float:
        handle = attnctrl.apply(pipe, plugin) if plugin is not None else None
        try:
            return timed(lambda: pipe("a red circle on the left", generator=torch.Generator("cpu").manual_seed(0),
                                      **{k: v for k, v in rec.items() if k != "guidance_scale"}), repeat=2)
        finally:
            if handle is not None:
                handle.remove()

    results = {"full": evaluate_variant(pipe, None, captions, size, steps, cfg)}
    full_image = image_seconds(None)
    print(row("full", results["full"], f" 1 | {full_image:.2f} s |"), flush=True)
    variants = [(f"CLEAR r = {r} ({1 / f:.3g} of the grid)", r, None) for r, f in zip(radii, FRACTIONS)]
    variants += [(f"CLEAR r = {r}, distilled", r, weights[r]) for r in radii if r in weights]
    for label, r, w in variants:
        plugin = CLEAR(radius=r, weights=str(w) if w else None)
        results[label] = evaluate_variant(pipe, plugin, captions, size, steps, cfg)
        full_op, local_op, backend = op_ratio(pipe, size, r, text)
        seconds = image_seconds(CLEAR(radius=r, weights=str(w) if w else None))
        print(row(label, results[label], f" x{full_op / local_op:.2f} ({backend}) | {seconds:.2f} s "
                                         f"(x{full_image / seconds:.2f}) |"), flush=True)

    sizes = [tuple(int(v) for v in item.split(":")) for item in a.hires.split(",") if item.strip()]
    if sizes:
        r = side // 2
        print(f"\nTable 3, larger than trained (single-object captions; r = {r} tokens)")
        print("| size | attention | images | colour | shape | side | count / more | op time vs full |")
        print("|" + "---|" * 8)
        for hsize, n in sizes:
            hires = {"single": every["single"][:n]}
            full_op, local_op, backend = op_ratio(pipe, hsize, r, text)
            for label, plugin in [("full", None), ("CLEAR training-free", CLEAR(radius=r))] + (
                    [("CLEAR distilled", CLEAR(radius=r, weights=str(weights[r])))] if r in weights else []):
                res = evaluate_variant(pipe, plugin, hires, hsize, steps, cfg)["single"]
                ratio = "1" if plugin is None else f"x{full_op / local_op:.2f} ({backend})"
                results[f"{hsize} {label}"] = {"single": res}
                print(f"| {hsize} px ({token_grid(pipe, hsize)}^2 tokens) | {label} | {n} | {res['colour']:.0%} | "
                      f"{res['shape']:.0%} | {res['side']:.0%} | {res['count']:.0%} / {res['more']:.0%} | {ratio} |",
                      flush=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
