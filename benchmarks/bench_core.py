"""Benchmark of the shared machinery: prints times and ratios against the plain diffusers path, same run.

    python benchmarks/bench_core.py [--repeat 5] [--size 512]

1. Attention primitives at SD 1.5 shapes (first UNet level at ``--size`` px: 8 heads x 40 dims, CFG batch 2):
   key-bias SDPA vs the same bias as a dense (Sq x Sk) tensor, grouped attention vs a dense query-dependent bias,
   SDPA + log-sum-exp vs plain SDPA, probability columns via the log-sum-exp vs a full softmax map.
2. End to end on the tiny SD 1.5 pipeline: plain diffusers processors vs attnctrl processors that do nothing vs
   AttentionMaps recording every cross-attention layer.
Timings are best-of-``repeat`` wall-clock on whatever device is available; on a shared CPU treat ratios within
+-15 % as noise.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

import attnctrl
from attnctrl.core import AttnCtrlProcessor, Plugin
from attnctrl.kernels.attention import attention_probs, attention_with_lse, grouped_attention, sdpa
from attnctrl.methods import AttentionMaps


def best(fn, repeat: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def row(label: str, t: float, ref: float) -> None:
    print(f"  {label:<52} {t * 1e3:9.2f} ms   x{ref / t:5.2f} vs baseline")


@dataclass(frozen=True)
class Passthrough(Plugin):
    name = "passthrough"

    def make_processor(self, layer, ctl, state):
        return AttnCtrlProcessor(layer, ctl)


@torch.no_grad()
def primitives(size: int, repeat: int, device: torch.device) -> None:
    n = (size // 8) ** 2
    b, h, d = 2, 8, 40
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device) for _ in range(3))
    key_bias = torch.where(torch.rand(b, 1, 1, n, generator=g) > 0.5, 2.0, float("-inf")).to(device)
    key_bias[..., 0] = 0
    dense_bias = key_bias.expand(b, h, n, n).contiguous()
    print(f"attention primitives, {n} tokens x {n} keys, batch {b}, {h} heads x {d} ({device}):")
    base = best(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeat)
    row("plain SDPA (baseline)", base, base)
    dense_t = best(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_bias), repeat)
    row("SDPA + dense (Sq x Sk) bias", dense_t, base)
    row("sdpa() + key-only bias (broadcast)", best(lambda: sdpa(q, k, v, key_bias), repeat), base)
    groups = torch.randint(0, 3, (n,), generator=g).to(device)
    group_bias = torch.where(torch.rand(3, n, generator=g) > 0.3, 0.0, float("-inf")).to(device)
    group_bias[:, 0] = 0
    row("grouped_attention, 3 query groups", best(lambda: grouped_attention(q, k, v, groups, group_bias), repeat),
        base)
    dense_group = group_bias[groups].expand(b, h, n, n).contiguous()
    row("SDPA + the same bias as a dense tensor",
        best(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_group), repeat), base)
    row("attention_with_lse (output + log-sum-exp)", best(lambda: attention_with_lse(q, k, v), repeat), base)
    _, lse = attention_with_lse(q, k, v)
    cols = torch.arange(0, n, max(1, n // 16), device=device)
    row(f"attention_probs, {len(cols)} key columns from the LSE",
        best(lambda: attention_probs(q, k, cols=cols, lse=lse), repeat), base)
    row("full softmax map (what the columns replace)",
        best(lambda: torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, -1), repeat), base)
    print(f"  memory: dense bias {dense_bias.numel() * 4 / 2**20:.1f} MiB, key bias {key_bias.numel() * 4 / 2**10:.1f}"
          f" KiB; full map {b * h * n * n * 4 / 2**20:.1f} MiB, columns {b * h * n * len(cols) * 4 / 2**20:.1f} MiB")


@torch.no_grad()
def end_to_end(size: int, repeat: int, device: torch.device) -> None:
    pipe = attnctrl.tiny_pipeline("sd15").to(device)
    steps = 4

    def gen():
        return pipe("a photo of a cat", num_inference_steps=steps, height=size, width=size, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(0))

    print(f"\ntiny SD 1.5 pipeline, {size}x{size}, {steps} steps ({device}):")
    base = best(gen, repeat)
    row("plain diffusers processors (baseline)", base, base)
    with attnctrl.apply(pipe, Passthrough()):
        row("attnctrl processors doing nothing (32 layers)", best(gen, repeat), base)
    with attnctrl.apply(pipe, AttentionMaps(words=["cat"])):
        row("AttentionMaps on all 16 cross-attention layers", best(gen, repeat), base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=512, help="image size whose first UNet level is benchmarked")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    primitives(args.size, args.repeat, device)
    end_to_end(min(args.size, 256), args.repeat, device)


if __name__ == "__main__":
    main()
