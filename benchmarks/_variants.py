"""Shared by the benchmarks: each variant runs in a fresh process, so its peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def in_own_process(script: str, variant: str, *args) -> dict:
    """Run ``python SCRIPT --variant VARIANT ARGS...`` and return the JSON object on its last stdout line."""
    out = subprocess.run([sys.executable, script, "--variant", variant, *map(str, args)], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"variant {variant!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_growth_gib(before_kib: int) -> float:
    """Growth of this process's max RSS since ``before_kib`` (a ``ru_maxrss`` reading), in GiB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 2**20


def measure(fn, *args, repeat: int) -> dict:
    """One call of ``fn(*args)`` for its peak memory (this process's RSS growth), then the best of ``repeat`` timed
    calls; with a checksum of the output, to compare variants."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn(*args)
    peak = rss_growth_gib(before)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return {"seconds": best, "peak_gib": peak, "checksum": float(out.double().sum())}
