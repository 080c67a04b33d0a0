"""CLoRA benchmark: time per step and peak memory for 2 and 3 LoRAs against the base pipeline, same run.

    python benchmarks/clora.py [--model tiny-sd15] [--size 512] [--steps 4]

Variants (each in its own process, so its peak memory is its own: max RSS growth on CPU, max allocated on CUDA):

* ``base``: the plain diffusers pipeline, one UNet call (CFG batch 2) per step.
* ``clora-N-update``: CLoRA with N LoRAs (N + 1 branches: the plain prompt and one per LoRA), every step updating
  the latent (``max_iter_to_alter = steps``, no extra refinement rounds): N + 1 branch passes with autograd and one
  backward per step.
* ``clora-N-fuse``: the steps after ``max_iter_to_alter``: N + 1 branch passes under ``no_grad``, masked fusion.
* ``clora-N-graphs``: the same steps with autograd left on, as the official code runs them (it keeps the graphs of
  every pass); the difference to ``-fuse`` is the memory our ``no_grad`` saves.

The LoRAs are random (``attnctrl.models.lora.random_lora``); speed does not depend on what they learned.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from _variants import in_own_process


def _peak_mb(before: int) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def run_variant(name: str, model: str, size: int, steps: int) -> dict:
    import attnctrl
    import attnctrl.pipelines.clora as clora_module
    from attnctrl.models.lora import random_lora
    from attnctrl.pipelines import CLoRAPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = attnctrl.load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, height=size, width=size, output_type="latent")
    if name == "base":
        def call(**over):
            return pipe("a cat and a dog", generator=torch.Generator().manual_seed(0), **{**kw, **over})
    else:
        _, n, mode = name.split("-")
        n = int(n)
        folder = Path(tempfile.mkdtemp())
        words = ["sks dog", "zwx cat", "pqr bird"][:n]
        files = [str(random_lora(pipe, folder / f"l{i}.safetensors", seed=i)) for i in range(n)]
        base = "a dog and a cat and a bird"
        prompts = [base] + [base.replace(w.split()[1], w, 1) for w in words]
        concepts = [[w.split()[1] if j != i + 1 else w for j in range(n + 1)] for i, w in enumerate(words)]
        masks = [[]] + [[w] for w in words]
        cl = CLoRAPipeline.from_pipe(pipe)
        files = [cl.load_lora(f) for f in files]  # loaded before the measured call (adapter names from here on)
        options = dict(iterative_steps=(), max_iter_to_alter=steps if mode == "update" else 0)
        if mode == "graphs":  # autograd on in the steps that do not update, as the official code runs them
            clora_module.torch = _GradAlwaysOn()

        def call(**over):
            return cl(prompts, [None, *files], concepts, masks, generator=torch.Generator().manual_seed(0),
                      **options, **{**kw, **over})
    # warm-up at 64 px, one step (kernels, allocator) so that the measured call sets the process's peak
    call(num_inference_steps=1, height=64, width=64)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()  # the peak-memory run
    peak = _peak_mb(before)
    started = time.perf_counter()
    call()  # the timed run
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"per_step": seconds / steps, "peak_mb": peak}


class _GradAlwaysOn:
    """``torch`` for the CLoRA module with ``set_grad_enabled`` always enabling autograd (official behaviour)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def set_grad_enabled(mode):
        return contextlib.nullcontext() if torch.is_grad_enabled() else torch.enable_grad()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.model, a.size, a.steps)))
        return
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"CLoRA on {a.model}, {a.size}x{a.size}, {a.steps} steps, {device}; N LoRAs = N + 1 branches")
    names = ["base"] + [f"clora-{n}-{m}" for n in (2, 3) for m in ("update", "fuse", "graphs")]
    res = {}
    for name in names:
        try:
            res[name] = in_own_process(__file__, name, "--model", a.model, "--size", a.size, "--steps", a.steps)
        except RuntimeError as e:  # one failing variant does not hide the others
            print(f"  {e}")
    b = res["base"]
    for name, r in res.items():
        print(f"  {name:<16} {r['per_step'] * 1e3:9.1f} ms/step  x{r['per_step'] / b['per_step']:5.2f} of base   "
              f"peak +{r['peak_mb']:8.1f} MB")
    for n in (2, 3):
        fuse, graphs = res.get(f"clora-{n}-fuse"), res.get(f"clora-{n}-graphs")
        if fuse and graphs:
            print(f"  {n} LoRAs: no_grad after max_iter_to_alter saves {graphs['peak_mb'] - fuse['peak_mb']:.1f} MB "
                  f"of peak memory ({fuse['peak_mb'] / max(graphs['peak_mb'], 1e-9):.0%} of keeping graphs)")


if __name__ == "__main__":
    main()
