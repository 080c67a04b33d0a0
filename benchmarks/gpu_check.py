"""The prepared GPU check: one command, one JSON report (under 8 minutes on one H100).

    python benchmarks/gpu_check.py [--out report.json] [--sections methods,clear,...]
    python benchmarks/gpu_check.py --smoke     # tiny sizes, any device (the CPU too): a test runs this mode

Sections (each one a key of the report; a failing section records its error and the others still run):

* ``env``: versions, the device, its memory.
* ``backends``: each diffusers attention backend (``dispatch_attention_fn``) on one 4-D problem: available or the
  reason, its time and its difference from the native one.
* ``methods``: every method on the tiny model of each family it supports, in fp32, fp16 and bf16 on the device: the
  output finite, ``max|d|`` from fp32, seconds, peak memory (the runners of ``half_precision.py``).
* ``offload``: plain, AgentAttention and FreeCustom on tiny SD 1.5 with diffusers' model and sequential offload:
  ``max|d|`` from the same run without offload, peak memory.
* ``clear``: CLEAR's local attention (``tiled``; ``flex`` compiled on CUDA) against full SDPA at 4096, 16384 and
  65536 image tokens (24 heads x 128, 512 text tokens, radius 16): time, speed-up, peak memory, ``max|d|`` from the
  dense masked reference where it fits.
* ``agent``: an SD 1.5-sized UNet forward (CFG batch 2) at 1024 px: SDPA vs tomesd (ratio 0.4) vs AgentAttention in
  its agent and ToMe phases: time and peak memory.
* ``reference_layers``: FreeCustom's MRSA and IR-Diffusion's isolation layer against their official explicit-softmax
  forms: time, peak memory, ``max|d|``.

``--smoke`` shrinks every size (a small UNet instead of SD 1.5, 8 x 8 and 16 x 16 token grids), runs fp32 and bf16
only and, of the methods, plain, AgentAttention and FreeCustom, so that the whole script is known to work before any
GPU time is spent (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("env", "backends", "methods", "offload", "clear", "agent", "reference_layers")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SMOKE_CASES = ("plain", "agent", "freecustom")  # --smoke: a plugin and a pipeline method (all of them on a GPU)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def timed(fn, device, repeat: int = 2):
    """``(best seconds, last result, peak GiB)`` of ``fn()`` after one warm-up call."""
    out = fn()
    sync(device)
    reset_peak(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return round(best, 5), out, peak_gib(device)


def max_diff(a, b) -> float:
    return float((torch.as_tensor(np.asarray(a, np.float32)) - torch.as_tensor(np.asarray(b, np.float32))).abs().max())


# -- sections ----------------------------------------------------------------------------------------------------------
def env(device, smoke) -> dict:
    import diffusers

    import attnctrl

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "attnctrl": attnctrl.__version__, "device": str(device), "smoke": smoke}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return out


@torch.no_grad()
def backends(device, smoke) -> dict:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    n = 256 if smoke else 4096
    g = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, 64, generator=g).to(device, dtype) for _ in range(3))  # (B, S, H, D)
    names = ["native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn", "flash", "flash_hub",
             "_flash_3", "sage", "xformers", "flex"]
    ref = dispatch_attention_fn(q, k, v, backend="native")
    out = {}
    for name in names:
        try:
            seconds, result, peak = timed(lambda b=name: dispatch_attention_fn(q, k, v, backend=b), device)
            out[name] = {"ok": True, "seconds": seconds, "max_d": max_diff(result.float().cpu(), ref.float().cpu()),
                         "peak_gib": peak}
        except Exception as e:  # a backend missing here (package, GPU generation, CPU) is a row, not a failure
            out[name] = {"ok": False, "why": str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}
    return out


def methods(device, smoke) -> dict:
    hp = importlib.import_module("half_precision")
    from attnctrl.models import tiny_pipeline
    from attnctrl.models.lora import random_lora

    hp.STEPS = 2 if smoke else 3
    dtypes = ["fp32", "bf16"] if smoke else list(DTYPES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lora_dir = Path(tmp)
        cases = [c for c in hp.CASES if not smoke or c[0] in SMOKE_CASES]
        for label, fams, runner in cases:
            for family in fams[:1] if smoke else fams:
                if label == "clora":
                    for seed, name in ((1, "dog"), (2, "cat")):
                        path = lora_dir / f"{family}-{name}.safetensors"
                        if not path.exists():
                            random_lora(tiny_pipeline(family), path, seed=seed, scale=hp.LORA_SCALE)
                ref = None
                for name in dtypes:
                    reset_peak(device)
                    pipe = tiny_pipeline(family).to(device, DTYPES[name])
                    pipe.set_progress_bar_config(disable=True)
                    out, _, seconds, failure = hp.attempt(runner, pipe, family, lora_dir)
                    row = {"method": label, "family": family, "dtype": name, "seconds": round(seconds, 3),
                           "peak_gib": peak_gib(device)}
                    if failure:
                        row["failure"] = failure
                    else:
                        ref = out if name == "fp32" else ref
                        row.update(finite=bool(np.isfinite(out).all()),
                                   max_d=None if ref is None else round(max_diff(out, ref), 5))
                    rows.append(row)
                    del pipe
    failed = [r for r in rows if r.get("failure") or r.get("finite") is False]
    return {"rows": rows, "all_finite": not failed, "failed": [f"{r['method']}/{r['family']}/{r['dtype']}"
                                                                for r in failed]}


@torch.no_grad()
def offload(device, smoke) -> dict:
    from PIL import Image

    import attnctrl
    from attnctrl.methods import AgentAttention
    from attnctrl.models import enable_offload, tiny_pipeline
    from attnctrl.pipelines import FreeCustomPipeline, Reference

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    ref_image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    refs = [Reference(ref_image, None, "a red photo")]
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")

    def runs(pipe):
        gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        out = {"plain": pipe("a photo of a cat", generator=gen(), **kw).images}
        with attnctrl.apply(pipe, AgentAttention(ratio=0.4)):
            out["agent"] = pipe("a photo of a cat", generator=gen(), **kw).images
        out["freecustom"] = FreeCustomPipeline.from_pipe(pipe)("a photo of a cat", references=refs, generator=gen(),
                                                               **kw).images
        return out

    base = tiny_pipeline("sd15").to(device, dtype)
    base.set_progress_bar_config(disable=True)
    reference = runs(base)
    del base
    result = {}
    for mode in ("model", "sequential") if device.type != "cpu" else ("model",):  # accelerate: sequential is GPU-only
        try:
            reset_peak(device)
            pipe = tiny_pipeline("sd15").to(dtype)
            pipe.set_progress_bar_config(disable=True)
            enable_offload(pipe, mode, device)
            got = runs(pipe)
            result[mode] = {name: {"max_d": max_diff(got[name], reference[name]),
                                   "finite": bool(np.isfinite(got[name]).all())} for name in got}
            result[mode]["peak_gib"] = peak_gib(device)
        except Exception as e:
            result[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return result


@torch.no_grad()
def clear(device, smoke) -> dict:
    from attnctrl.kernels.local_attention import LocalSpec, local_attention

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    heads, dim, text, radius = (2, 16, 8, 3) if smoke else (24, 128, 512, 16)
    sides = (8, 16) if smoke else (64, 128, 256)
    rows = []
    for side in sides:
        spec = LocalSpec(side, side, text, radius)
        g = torch.Generator("cpu").manual_seed(0)
        q, k, v = (torch.randn(1, heads, spec.n_query, dim, generator=g).to(device, dtype) for _ in range(3))
        full, _, full_peak = timed(lambda: F.scaled_dot_product_attention(q, k, v), device)
        row = {"image_tokens": side * side, "sdpa_seconds": full, "sdpa_peak_gib": full_peak}
        dense = local_attention(q, k, v, spec, "dense").float() if side <= 64 else None
        backends_ = ["tiled"] + (["flex"] if device.type == "cuda" or side <= 8 else [])
        for backend in backends_:
            try:
                seconds, out, peak = timed(lambda b=backend: local_attention(q, k, v, spec, b), device)
                row[backend] = {"seconds": seconds, "speedup": round(full / seconds, 3), "peak_gib": peak,
                                "max_d": None if dense is None else float((out.float() - dense).abs().max())}
            except Exception as e:
                row[backend] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        rows.append(row)
    return {"radius": radius, "heads": heads, "head_dim": dim, "text_tokens": text, "dtype": str(dtype), "rows": rows}


@torch.no_grad()
def agent(device, smoke) -> dict:
    from diffusers import UNet2DConditionModel


    agent_bench = importlib.import_module("agent")
    config = agent_bench.SD15 if not smoke else dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    size = 128 if smoke else 1024
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    torch.manual_seed(0)
    latent = size // 8
    g = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500] * 2, device=device)
    rows = {}
    warm = UNet2DConditionModel(**config).to(device, dtype).eval()
    timed(lambda u=warm: u(sample, t, context), device, repeat=1)  # the first forward of the process pays start-up costs
    del warm
    for variant in ("plain", "tomesd", "agent", "tome"):
        unet = UNet2DConditionModel(**config).to(device, dtype).eval()
        try:
            agent_bench.patch(unet, variant)
            seconds, _, peak = timed(lambda u=unet: u(sample, t, context), device)
            rows[variant] = {"seconds": seconds, "peak_gib": peak}
        except Exception as e:  # tomesd may be missing
            rows[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        del unet
    base = rows["plain"].get("seconds")
    for r in rows.values():
        if base and "seconds" in r:
            r["speedup"] = round(base / r["seconds"], 3)
    return {"size_px": size, "dtype": str(dtype), "sd15_sized": not smoke, "rows": rows}


@torch.no_grad()
def reference_layers(device, smoke) -> dict:
    mrsa = importlib.import_module("reference_attention")
    ir = importlib.import_module("irdiffusion")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    out = {}
    q, k, v, bias = (x.to(device, dtype) for x in mrsa.inputs(16 if smoke else 64, 3, torch.float32))
    a = timed(lambda: mrsa.ours(q, k, v, bias), device)
    b = timed(lambda: mrsa.explicit(q, k, v, bias), device)
    out["mrsa"] = {"ours_seconds": a[0], "official_seconds": b[0], "ours_peak_gib": a[2], "official_peak_gib": b[2],
                   "max_d": float((a[1].float() - b[1].float()).abs().max())}
    q, k, v, owner, bias = ir.inputs(16 if smoke else 64, 2)
    q, k, v, bias = (x.to(device, dtype) for x in (q, k, v, bias))
    owner = owner.to(device)
    a = timed(lambda: ir.ours(q, k, v, owner, bias), device)
    b = timed(lambda: ir.dense(q, k, v, owner, bias), device)
    out["irdiffusion"] = {"ours_seconds": a[0], "official_seconds": b[0], "ours_peak_gib": a[2],
                          "official_peak_gib": b[2], "max_d": float((a[1].float() - b[1].float()).abs().max())}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU too")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warnings.filterwarnings("ignore")
    logging.getLogger("attnctrl").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    report, started = {}, time.perf_counter()
    for name in args.sections.split(","):
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")
        t = time.perf_counter()
        try:
            report[name] = globals()[name](device, args.smoke)
        except Exception as e:  # one broken section must not cost the others' figures
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
        print(f"[gpu_check] {name}: {report['seconds'][name]} s", file=sys.stderr, flush=True)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
