"""AgentAttention benchmark: SD 1.5-sized UNet forward, one attention layer, and the effect on toyworld.

    python benchmarks/agent.py [--sizes 512,1024] [--repeat 2] [--skip-unet] [--skip-layer] [--skip-toyworld] [--toyworld-model M]

1. A full UNet forward (the real SD 1.5 config with random weights, CFG batch 2; fp32 on CPU, fp16 on CUDA) at
   512x512 and 1024x1024 latents-equivalent with (a) the plain diffusers processor, (b) tomesd ratio 0.4,
   (c) AgentAttention in the agent phase, (d) AgentAttention in the ToMe phase. Each variant runs in its own
   process so its peak memory (max RSS on CPU, max allocated on CUDA) is its own.
2. One attention layer alone (SD 1.5 first level: 320 channels, 8 heads) at N = 4096 and 16384 tokens: SDPA vs
   merge + agent attention + unmerge (our processor's path), same inputs.
3. The toyworld model's held-out benchmark (96 captions) with and without AgentAttention at the default settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from _variants import in_own_process

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeat):
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def patch(unet, variant: str) -> None:
    """Install ``variant`` on ``unet``: ``plain`` (nothing), ``tomesd`` (ratio 0.4), ``agent`` (AgentAttention in its
    agent phase) or ``tome`` (AgentAttention in its ToMe phase)."""
    import attnctrl
    from attnctrl.methods import AgentAttention

    if variant == "tomesd":
        import tomesd

        tomesd.apply_patch(unet, ratio=0.4)
    elif variant == "agent":
        attnctrl.apply(unet, AgentAttention(ratio=0.4, switch_step=10**6))
    elif variant == "tome":
        attnctrl.apply(unet, AgentAttention(ratio=0.4, switch_step=0))


@torch.no_grad()
def run_variant(variant: str, size: int, repeat: int) -> dict:
    """One UNet variant in this process; returns seconds and peak memory."""
    from diffusers import UNet2DConditionModel


    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).to(device, dtype).eval()
    latent = size // 8
    sample = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(2, 77, 768, device=device, dtype=dtype)
    t = torch.tensor([500] * 2, device=device)
    patch(unet, variant)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(lambda: unet(sample, t, context), repeat)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": variant, "size": size, "seconds": seconds, "peak_gib": peak}


def unet_benchmark(sizes, repeat) -> None:
    names = {"plain": "plain diffusers (SDPA)", "tomesd": "tomesd ratio 0.4", "agent": "AgentAttention, agent phase",
             "tome": "AgentAttention, ToMe phase"}
    device = "CUDA fp16" if torch.cuda.is_available() else "CPU fp32"
    print(f"SD 1.5-sized UNet forward (random weights, CFG batch 2, {device}); each variant in its own process")
    for size in sizes:
        results = {}
        for variant in names:
            results[variant] = in_own_process(__file__, variant, "--size", size, "--repeat", repeat)
        base = results["plain"]["seconds"]
        print(f"  {size}x{size} ({(size // 8) ** 2} tokens at level 0):")
        for variant, label in names.items():
            r = results[variant]
            print(f"    {label:<32} {r['seconds']:8.2f} s  x{base / r['seconds']:5.2f}   peak {r['peak_gib']:.2f} GiB")


@torch.no_grad()
def layer_benchmark(repeat) -> None:
    from attnctrl.kernels.token_merge import bipartite_plan, random_picks
    from attnctrl.processors.agent import agent_attention

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    print("\none attention layer (320 channels, 8 heads x 40, CFG batch 2): SDPA vs merge + agent attention + unmerge")
    for n, side in ((4096, 64), (16384, 128)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, n, 320, generator=g).to(device, dtype)
        proj = [torch.nn.Linear(320, 320, bias=False).to(device, dtype) for _ in range(4)]

        def heads(t):
            return t.view(2, -1, 8, 40).transpose(1, 2)

        def plain():
            q, k, v = (heads(p(x)) for p in proj[:3])
            return proj[3](torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, n,
                                                                                                            320))

        gen = torch.Generator().manual_seed(0)

        def agent():
            plan = bipartite_plan(x, side, side, 4, 4, random_picks(side, side, 4, 4, gen))
            r = int(n * 0.4)
            merged = plan.merge(x, r)
            agents = plan.merge(x, min(plan.n_src, int(n * 0.95)))
            q, k, v = (heads(p(merged)) for p in proj[:3])
            a = heads(proj[0](agents))
            out = agent_attention(q, k, v, a).transpose(1, 2).reshape(2, merged.shape[1], 320)
            return plan.unmerge(proj[3](out), r)

        base = _time(plain, repeat)
        ours = _time(agent, repeat)
        print(f"  N = {n:5d}: SDPA {base * 1e3:8.1f} ms   agent phase {ours * 1e3:8.1f} ms   x{base / ours:5.2f}")


def toyworld_benchmark(model: str = "toyworld") -> None:
    import attnctrl
    from attnctrl.methods import AgentAttention
    from attnctrl.models.toyworld.bench import benchmark_captions, evaluate

    try:
        pipe = attnctrl.load_pipeline(model)
    except attnctrl.ModelNotAvailableError as e:
        print(f"\ntoyworld: skipped ({e})")
        return
    pipe.set_progress_bar_config(disable=True)
    sets = benchmark_captions()
    print("\ntoyworld held-out captions, 25 steps, guidance 5 (fraction right; 'all' = images with every object right)")
    for label, config in (("plain", None), ("AgentAttention (defaults)", AgentAttention())):
        handle = attnctrl.apply(pipe, config) if config is not None else None
        try:
            single = evaluate(pipe, sets["single"])
            two = evaluate(pipe, sets["two"])
        finally:
            if handle is not None:
                handle.remove()
        print(f"  {label:<28} single: colour {single['colour']:.3f} shape {single['shape']:.3f} side "
              f"{single['side']:.3f} all {single['all']:.3f} | two: colour {two['colour']:.3f} shape "
              f"{two['shape']:.3f} side {two['side']:.3f} all {two['all']:.3f} | {single['seconds_per_image']:.2f} s/img")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-toyworld", action="store_true")
    p.add_argument("--toyworld-model", default="toyworld", help="model of the toyworld part (a folder or name)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.size, args.repeat)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, pid {os.getpid()}")
    if not args.skip_unet:
        unet_benchmark([int(s) for s in args.sizes.split(",")], args.repeat)
    if not args.skip_layer:
        layer_benchmark(args.repeat)
    if not args.skip_toyworld:
        toyworld_benchmark(args.toyworld_model)


if __name__ == "__main__":
    main()
