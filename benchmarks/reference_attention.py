"""Multi-reference self-attention (FreeCustom's MRSA): ours vs the official explicit-softmax form, same inputs.

    python benchmarks/reference_attention.py [--latent 64] [--refs 3] [--repeat 3]

One SD 1.5-sized attention layer (320 channels, 8 heads x 40) at a 64 x 64 latent (4096 tokens) with 3 references,
CFG batch (2 target rows): ours = one SDPA call per target row over [own; ref_1..ref_N] keys with a key-only bias;
explicit = ``softmax(Q K'^T * s + bias) V'`` materialised in the working dtype, as the official code does. Each
variant runs in its own process; its peak memory is the growth of the process's max RSS during the computation.
"""

from __future__ import annotations

import argparse
import json

import torch
from _variants import in_own_process, measure


def inputs(latent: int, refs: int, dtype):
    g = torch.Generator().manual_seed(0)
    n = latent * latent
    q = torch.randn(2, 8, n, 40, generator=g, dtype=dtype)  # the target's rows (uncond, cond)
    k = torch.randn(2, 8, n * (refs + 1), 40, generator=g, dtype=dtype)  # [own; ref_1..ref_N] keys
    v = torch.randn(2, 8, n * (refs + 1), 40, generator=g, dtype=dtype)
    masks = torch.rand(refs, n, generator=g) > 0.5
    bias = torch.cat([torch.zeros(n)] + [torch.where(m, torch.tensor(3.0), torch.tensor(float("-inf")))
                                         for m in masks]).to(dtype)
    return q, k, v, bias


@torch.no_grad()
def ours(q, k, v, bias):
    from attnctrl.kernels.attention import sdpa

    return sdpa(q, k, v, bias.view(1, 1, 1, -1))


@torch.no_grad()
def explicit(q, k, v, bias):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    return scores.softmax(-1) @ v


def run_variant(name: str, latent: int, refs: int, repeat: int) -> dict:
    q, k, v, bias = inputs(latent, refs, torch.float32)
    return {"name": name, **measure(ours if name == "ours" else explicit, q, k, v, bias, repeat=repeat)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--refs", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.latent, args.refs, args.repeat)))
        return
    n = args.latent**2
    print(f"MRSA: {n} target tokens x {n * (args.refs + 1)} keys ({args.refs} references), 2 target rows, "
          f"8 heads x 40, fp32, {torch.get_num_threads()} CPU threads")
    results = {}
    for name in ("explicit", "ours"):
        results[name] = in_own_process(__file__, name, "--latent", args.latent, "--refs", args.refs, "--repeat",
                                       args.repeat)
    base = results["explicit"]
    for name, label in (("explicit", "explicit softmax (official form)"), ("ours", "ours: SDPA + key-only bias")):
        r = results[name]
        print(f"  {label:<36} {r['seconds'] * 1e3:9.1f} ms  x{base['seconds'] / r['seconds']:5.2f}   "
              f"peak +{r['peak_gib']:.2f} GiB  ({r['peak_gib'] / max(base['peak_gib'], 1e-9):.1%} of explicit)")
    rel = abs(results["ours"]["checksum"] - base["checksum"]) / max(1.0, abs(base["checksum"]))
    print(f"  outputs agree: relative checksum difference {rel:.1e}")


if __name__ == "__main__":
    main()
