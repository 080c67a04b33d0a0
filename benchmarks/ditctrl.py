"""DiTCtrl cost: transformer passes and time per step (naive pair loop vs de-duplicated) and the memory of the
mask-guided attention (ours vs the official dense-mask form).

    python benchmarks/ditctrl.py [--steps 6] [--video-tokens 4096] [--heads 8]

1. The tiny CogVideoX pipeline, 2, 3 and 5 prompts (1 transition each), 6 steps with KV-sharing in steps 2..4 (half
   of the steps inside the window, as the official 23 of 50 are): passes and seconds per step, naive vs dedupe.
2. One mask-guided target attention (4 rows [uc_s, uc_t, c_s, c_t], 226 text + N video tokens): ours = row
   log-sum-exp + subject columns + three key groups merged by log-sum-exp; dense = the official form, full
   softmax maps of all rows plus two SDPA calls with dense (L x L) additive masks. Each in its own process; peak
   memory is the growth of its max RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from _variants import in_own_process, rss_growth_gib


def pipeline_benchmark(steps: int) -> None:
    import attnctrl
    from attnctrl.pipelines import DiTCtrlPipeline

    pipe = attnctrl.load_pipeline("tiny-cogvideox")
    pipe.set_progress_bar_config(disable=True)
    dc = DiTCtrlPipeline.from_pipe(pipe)
    prompts = ["a cat walks", "a dog runs", "a bird flies", "a fish swims", "a horse jumps"]
    print(f"tiny CogVideoX, 9 frames per segment, overlap 1, {steps} steps, KV-sharing in steps 2..{steps - 2}")
    for n in (2, 3, 5):
        row = []
        for dedupe in (False, True):
            started = time.perf_counter()
            dc(prompts[:n], num_frames=9, num_inference_steps=steps, overlap=1, num_transition_blocks=1,
               kv_steps=(2, steps - 1), dedupe=dedupe, output_type="latent", generator=torch.Generator().manual_seed(0))
            seconds = (time.perf_counter() - started) / steps
            row.append((sum(dc.passes_per_step) / steps, seconds))
        (p0, s0), (p1, s1) = row
        print(f"  {n} prompts ({dc.last_plan['segments']} segments): naive {p0:.1f} passes {s0:.3f} s/step | "
              f"dedupe {p1:.1f} passes {s1:.3f} s/step | x{s0 / s1:.2f}")


def mask_inputs(video: int, heads: int):
    g = torch.Generator().manual_seed(0)
    L = 226 + video
    return tuple(torch.randn(4, heads, L, 64, generator=g) for _ in range(3))


@torch.no_grad()
def ours(q, k, v):
    from attnctrl.kernels.attention import attention_with_lse, merge_attention

    t = 226
    out, lse = attention_with_lse(q, k, v)
    p = torch.exp(q[2:, :, t:].float() @ k[2:, :, 1:3].float().transpose(-1, -2) / 8 - lse[2:, :, t:, None])
    fg = p.sum(-1).mean(1)[0] > p.sum(-1).mean(1)[0].median()
    fg_idx, bg_idx = torch.nonzero(fg).flatten() + t, torch.nonzero(~fg).flatten() + t
    qt, ks, vs = q[[1, 3]], k[[0, 2]], v[[0, 2]]
    txt = attention_with_lse(qt, ks[:, :, :t], vs[:, :, :t])
    o_fg = merge_attention([txt, attention_with_lse(qt, ks.index_select(2, fg_idx), vs.index_select(2, fg_idx))])[0]
    o_bg = merge_attention([txt, attention_with_lse(qt, ks.index_select(2, bg_idx), vs.index_select(2, bg_idx))])[0]
    return o_fg + o_bg


@torch.no_grad()
def dense(q, k, v):
    t = 226
    maps = torch.softmax(q @ k.transpose(-1, -2) / 8, -1)  # the official controller keeps full maps
    a = maps[2:, :, t:, 1:3].sum(-1).mean(1)[0]
    fg = a > a.median()
    L = q.shape[2]
    m_fg = torch.zeros(L, L)
    m_fg[t:, t:][:, ~fg] = torch.finfo(torch.float32).min
    m_bg = torch.zeros(L, L)
    m_bg[t:, t:][:, fg] = torch.finfo(torch.float32).min
    qt, ks, vs = q[[1, 3]], k[[0, 2]], v[[0, 2]]
    o_fg = torch.nn.functional.scaled_dot_product_attention(qt, ks, vs, attn_mask=m_fg)
    o_bg = torch.nn.functional.scaled_dot_product_attention(qt, ks, vs, attn_mask=m_bg)
    return o_fg + o_bg


def run_variant(name: str, video: int, heads: int) -> dict:
    args = mask_inputs(video, heads)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    (ours if name == "ours" else dense)(*args)
    return {"seconds": time.perf_counter() - t,
            "peak_gib": rss_growth_gib(before)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--video-tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.video_tokens, a.heads)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    pipeline_benchmark(a.steps)
    print(f"\nmask-guided target attention, 226 text + {a.video_tokens} video tokens, 4 rows, {a.heads} heads x 64, fp32")
    res = {}
    for name in ("dense", "ours"):
        res[name] = in_own_process(__file__, name, "--video-tokens", a.video_tokens, "--heads", a.heads)
    for name, label in (("dense", "dense masks + full maps (official)"), ("ours", "ours: LSE columns + LSE merges")):
        r = res[name]
        print(f"  {label:<36} {r['seconds']:7.2f} s   peak +{r['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
