"""DiTCtrl on toyworld-video: several prompts in one video, against the two baselines the paper compares with in spirit.

    python benchmarks/ditctrl_toyworld.py [--model toyworld-video] [--seeds 2] [--steps 25] [--limit N]
                                          [--overlap 2] [--transitions 1] [--save DIR]

The prompt sequences are :func:`attnctrl.models.toyworld.motion.segment_prompts` (held-out colour-shape pairs only):
``direction`` (the motion changes), ``colour`` (the colour changes), ``enter`` (a second object appears). Each is
made three ways on the same seeds, 17 frames per segment, ``guidance_scale`` 6 without dynamic CFG (the model's
recommended settings):

* **DiTCtrl**: ``DiTCtrlPipeline`` (KV-sharing in the last sixth of the blocks over the first half of the steps,
  ``--overlap`` latent frames between segments, ``--transitions`` interpolated segments between two prompts);
* **independent**: each prompt's clip made alone (the base ``CogVideoXPipeline``, the same seed) and the clips
  concatenated;
* **one prompt**: one video as long as DiTCtrl's from the prompts joined with ", " (the model's RoPE runs past the
  17 frames it was trained on).

Scored by the video checker (:mod:`attnctrl.models.toyworld.video_score`): per prompt, its segment's frames against
that prompt (colour and shape per frame, motion direction); per boundary between two prompts, the 8 frames around
it: ``found`` (frames in which the later prompt's first object is found at all, whatever its colour) and ``jump``
(the largest move of its centre between consecutive frames, px at 64). Nothing here asserts: it prints what it
measured, and with ``--save`` writes each video as an MP4.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

WINDOW = 4  # frames on each side of a boundary


def prompt_ranges(plan: dict, n_prompts: int, transitions: int, vt: int = 4) -> list[tuple[int, int]]:
    """Pixel frame range ``[first, last]`` of each prompt's segment in a DiTCtrl video (plan: ``last_plan``)."""
    seg, stride = plan["segment_frames"], plan["stride"]
    ranges = []
    for i in range(n_prompts):
        k = i * (transitions + 1)  # the prompt's segment: one per prompt, ``transitions`` between two
        first_latent, last_latent = k * stride, k * stride + seg - 1
        ranges.append((0 if first_latent == 0 else (first_latent - 1) * vt + 1, last_latent * vt))
    return ranges


def score(frames: np.ndarray, prompts: list[str], ranges: list[tuple[int, int]]) -> dict:
    from attnctrl.models.toyworld.video_score import score_clip

    adherence = [score_clip(frames[a : b + 1], p) for p, (a, b) in zip(prompts, ranges)]
    boundaries = []
    for i in range(len(prompts) - 1):
        middle = (ranges[i][1] + ranges[i + 1][0] + 1) // 2
        window = frames[max(0, middle - WINDOW) : middle + WINDOW]
        subject = score_clip(window, prompts[i + 1])["objects"][0]
        boundaries.append((subject["found"], subject["max_jump"]))
    return {"colour": np.mean([s["colour"] for s in adherence]), "shape": np.mean([s["shape"] for s in adherence]),
            "direction": np.mean([s["direction"] for s in adherence]),
            "found": np.mean([f for f, _ in boundaries]), "jump": np.mean([j for _, j in boundaries]),
            "worst_jump": max(j for _, j in boundaries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toyworld-video")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--limit", type=int, default=None, help="sequences per group")
    parser.add_argument("--overlap", type=int, default=2, help="latent frames shared by adjacent segments (of 5)")
    parser.add_argument("--transitions", type=int, default=1)
    parser.add_argument("--save", type=Path, default=None, help="write every video as an MP4 here")
    args = parser.parse_args()

    import attnctrl
    from attnctrl.models.toyworld.motion import segment_prompts
    from attnctrl.models.toyworld.video import clip_uint8 as frames_of
    from attnctrl.pipelines import DiTCtrlPipeline

    pipe = attnctrl.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    ditctrl = DiTCtrlPipeline.from_pipe(pipe)
    frames = pipe.attnctrl_defaults["num_frames"]
    common = dict(height=64, width=64, num_inference_steps=args.steps, guidance_scale=6.0, use_dynamic_cfg=False,
                  max_sequence_length=32, output_type="np")
    kv_steps = (1, max(2, args.steps // 2))
    print(f"{args.model}: {frames} frames a segment, {args.steps} steps, overlap {args.overlap}, "
          f"{args.transitions} transition segment(s), KV-sharing steps {kv_steps}, {args.seeds} seed(s)")
    rows: dict[tuple[str, str], list[dict]] = {}
    seconds: dict[str, float] = {}
    for group, sequences in segment_prompts().items():
        for prompts in sequences[: args.limit]:
            for seed in range(args.seeds):
                def gen():
                    return torch.Generator().manual_seed(seed)

                started = time.perf_counter()
                video = frames_of(ditctrl(prompts, num_frames=frames, overlap=args.overlap,
                                          num_transition_blocks=args.transitions, kv_steps=kv_steps,
                                          generator=gen(), **common).frames[0])
                seconds["DiTCtrl"] = seconds.get("DiTCtrl", 0.0) + time.perf_counter() - started
                ranges = prompt_ranges(ditctrl.last_plan, len(prompts), args.transitions)
                made = {"DiTCtrl": (video, ranges)}
                started = time.perf_counter()
                clips = [frames_of(pipe(p, num_frames=frames, generator=gen(), **common).frames[0]) for p in prompts]
                seconds["independent"] = seconds.get("independent", 0.0) + time.perf_counter() - started
                made["independent"] = (np.concatenate(clips), [(i * frames, (i + 1) * frames - 1)
                                                               for i in range(len(prompts))])
                started = time.perf_counter()
                long = frames_of(pipe(", ".join(prompts), num_frames=len(video), generator=gen(),
                                      **common).frames[0])
                seconds["one prompt"] = seconds.get("one prompt", 0.0) + time.perf_counter() - started
                made["one prompt"] = (long, ranges)
                for way, (video_frames, way_ranges) in made.items():
                    rows.setdefault((group, way), []).append(score(video_frames, prompts, way_ranges))
                    if args.save:
                        from attnctrl.io import save_video

                        args.save.mkdir(parents=True, exist_ok=True)
                        name = f"{group}-{sequences.index(prompts)}-seed{seed}-{way.replace(' ', '-')}.mp4"
                        save_video(args.save / name, list(video_frames), fps=8)
    print("\n| sequences | way | colour | shape | direction | boundary: found | mean jump (px) | worst jump (px) |")
    print("|---|---|---|---|---|---|---|---|")
    for (group, way), scores in rows.items():
        mean = {k: np.mean([s[k] for s in scores]) for k in scores[0]}
        print(f"| {group} ({len(scores)}) | {way} | {mean['colour']:.0%} | {mean['shape']:.0%} | "
              f"{mean['direction']:.0%} | {mean['found']:.0%} | {mean['jump']:.1f} | "
              f"{max(s['worst_jump'] for s in scores):.1f} |")
    made_count = {w: sum(len(v) for (_, ww), v in rows.items() if ww == w) for w in seconds}
    print("\nseconds a video (mean): " + ", ".join(f"{w} {s / made_count[w]:.1f}" for w, s in seconds.items()))

if __name__ == "__main__":
    main()
