"""IR-Diffusion attention: query groups vs a dense-mask explicit softmax, one layer, 3 subjects at 64 x 64 tokens.

    python benchmarks/irdiffusion.py [--side 64] [--subjects 3] [--repeat 3]

The target row (CFG: 2 rows) of an SD 1.5-sized layer (320 channels, 8 heads x 40) attends to its own 4096 keys and
the repositioned keys of 3 references, with isolation between subject regions and the reference blocks open only
to their subject: ours = :func:`grouped_attention` (one key-bias row per subject region, the subject rows only);
dense = the official form, a full ``(queries x keys)`` additive mask and ``softmax(Q K^T s + M) V`` in the working
dtype. Each variant runs in its own process; peak memory is the growth of its max RSS.
"""

from __future__ import annotations

import argparse
import json

import torch
from _variants import in_own_process, measure


def inputs(side: int, subjects: int):
    g = torch.Generator().manual_seed(0)
    n = side * side
    q = torch.randn(2, 8, n, 40, generator=g)
    k = torch.randn(2, 8, n * (1 + subjects), 40, generator=g)
    v = torch.randn(2, 8, n * (1 + subjects), 40, generator=g)
    owner = torch.zeros(side, side, dtype=torch.long)
    for i in range(subjects):  # vertical bands of the image, one per subject
        owner[:, i * side // (subjects + 1) : (i + 1) * side // (subjects + 1)] = i + 1
    owner = owner.flatten()
    relocated = torch.rand(subjects, n, generator=g) > 0.5
    bias = torch.zeros(subjects, n * (1 + subjects))
    bias[:, n:] = float("-inf")
    for i in range(subjects):
        bias[i, :n][(owner > 0) & (owner != i + 1)] = float("-inf")
        bias[i, n * (i + 1) : n * (i + 2)][relocated[i]] = 0.0
    return q, k, v, owner, bias


@torch.no_grad()
def ours(q, k, v, owner, bias):
    from attnctrl.kernels.attention import grouped_attention, sdpa

    out = sdpa(q, k[:, :, : q.shape[2]], v[:, :, : q.shape[2]])  # background rows: plain self-attention
    rows = torch.nonzero(owner > 0).flatten()
    for t in range(q.shape[0]):
        out[t : t + 1, :, rows] = grouped_attention(q[t : t + 1].index_select(2, rows), k[t : t + 1], v[t : t + 1],
                                                    owner[rows] - 1, bias)
    return out


@torch.no_grad()
def dense(q, k, v, owner, bias):
    n = q.shape[2]
    mask = torch.zeros(n, k.shape[2])
    mask[:, n:] = float("-inf")
    sub = owner > 0
    mask[sub] = bias[owner[sub] - 1]
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask
    return scores.softmax(-1) @ v


def run_variant(name, side, subjects, repeat):
    args = inputs(side, subjects)
    return measure(ours if name == "ours" else dense, *args, repeat=repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.side, a.subjects, a.repeat)))
        return
    n = a.side**2
    print(f"IR-Diffusion layer: {n} target tokens, {a.subjects} subjects (+{a.subjects} repositioned reference "
          f"blocks), 2 target rows, 8 heads x 40, fp32, {torch.get_num_threads()} CPU threads")
    res = {}
    for name in ("dense", "ours"):
        res[name] = in_own_process(__file__, name, "--side", a.side, "--subjects", a.subjects, "--repeat", a.repeat)
    for name, label in (("dense", "dense mask + explicit softmax"), ("ours", "ours: query groups, key-only bias")):
        r = res[name]
        print(f"  {label:<36} {r['seconds'] * 1e3:9.1f} ms  x{res['dense']['seconds'] / r['seconds']:5.2f}   "
              f"peak +{r['peak_gib']:.2f} GiB  ({r['peak_gib'] / max(res['dense']['peak_gib'], 1e-9):.1%} of dense)")
    rel = abs(res["ours"]["checksum"] - res["dense"]["checksum"]) / max(1.0, abs(res["dense"]["checksum"]))
    print(f"  outputs agree: relative checksum difference {rel:.1e}")


if __name__ == "__main__":
    main()
