"""CLEAR benchmark: local attention backends vs full SDPA, tile utilisation, and a FLUX-sized transformer.

    python benchmarks/clear.py [--sizes 64,128] [--radii 8,16,32] [--heads 24] [--repeat 2] [--skip-model]

1. The attention op alone: 512 text tokens + an S x S image grid (S = 64, 128; 256 on CUDA), FLUX heads (24 x 128),
   for each radius: time of every backend (dense only up to 64 x 64: its boolean mask is (T + S^2)^2) against full
   SDPA over the same tokens, measured in the same run; plus the fraction of computed query-key pairs inside the
   disc (tile utilisation) for row-major 128-token blocks (the official flex layout, spec §9), our tiles, and our
   flex tile order.
2. A FLUX-sized transformer (hidden 3072, 24 heads, one double- and one single-stream block, random weights):
   a full forward with the stock processors vs CLEAR (``attnctrl.apply``), same inputs.
flex runs only on CUDA (on CPU it is unfused, or compiles for tens of seconds per shape).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import attnctrl
from attnctrl.kernels.local_attention import LocalSpec, local_attention, tile_utilisation
from attnctrl.methods import CLEAR


def timed(fn, repeat: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def op_benchmark(sizes, radii, heads, repeat, device, dtype) -> None:
    text = 512
    print(f"attention op: {text} text tokens, {heads} heads x 128, {dtype}, {device}")
    for size in sizes:
        spec0 = LocalSpec(size, size, text, 1)
        g = torch.Generator("cpu").manual_seed(0)
        q, k, v = (torch.randn(1, heads, spec0.n_query, 128, generator=g).to(device, dtype) for _ in range(3))
        full = timed(lambda: F.scaled_dot_product_attention(q, k, v), repeat)
        print(f"  {size}x{size} image tokens ({spec0.n_query} total): full SDPA {full * 1e3:9.1f} ms")
        for r in radii:
            spec = LocalSpec(size, size, text, r)
            util = {b: tile_utilisation(spec, b) for b in ("rowmajor", "tiled", "flex")}
            backends = ["tiled"] + (["flex"] if device.type == "cuda" else []) + (["dense"] if size <= 64 else [])
            cells = []
            for backend in backends:
                t = timed(lambda b=backend: local_attention(q, k, v, spec, b), repeat)
                cells.append(f"{backend} {t * 1e3:8.1f} ms (x{full / t:5.2f})")
            print(f"    r={r:<3} " + "  ".join(cells) +
                  f"   utilisation: row-major blocks {util['rowmajor']:.1%}, tiles {util['tiled']:.1%}, "
                  f"flex order {util['flex']:.1%}")


@torch.no_grad()
def model_benchmark(sizes, radii, repeat, device, dtype) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ).to(device, dtype).eval()
    print(f"\nFLUX-sized transformer (hidden 3072, 24 heads, 1 double + 1 single block), {dtype}, {device}")
    for size in sizes:
        n = size * size
        ids = torch.zeros(n, 3)
        ids[:, 1] = torch.arange(n) // size
        ids[:, 2] = torch.arange(n) % size
        inputs = dict(
            hidden_states=torch.randn(1, n, 64), encoder_hidden_states=torch.randn(1, 512, 4096),
            pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]), img_ids=ids,
            txt_ids=torch.zeros(512, 3), return_dict=False,
        )
        inputs = {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in
                      ("img_ids", "txt_ids") else v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        base = timed(lambda: model(**inputs), repeat)
        cells = []
        for r in radii:
            with attnctrl.apply(model, CLEAR(radius=r)):
                t = timed(lambda: model(**inputs), repeat)
            cells.append(f"r={r}: {t:7.2f} s (x{base / t:4.2f})")
        print(f"  {size}x{size} tokens ({size * 16} px): full {base:7.2f} s   " + "   ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help="image grid sides, e.g. 64,128 (CUDA default adds 256)")
    p.add_argument("--radii", default="8,16,32")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--model-sizes", default="64", help="grid sides for the transformer benchmark")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = [int(s) for s in (args.sizes or ("64,128,256" if cuda else "64,128")).split(",")]
    radii = [int(r) for r in args.radii.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    op_benchmark(sizes, radii, args.heads, args.repeat, device, dtype)
    if not args.skip_model:
        model_benchmark([int(s) for s in args.model_sizes.split(",")], radii, args.repeat, device, dtype)


if __name__ == "__main__":
    main()
