"""``benchmarks/gpu_check.py --smoke`` runs every section on this machine, so the GPU check is known to work before
any GPU time is spent (the figures themselves are benchmarks, not assertions)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_the_gpu_check_runs_every_section_in_smoke_mode(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        gpu_check = importlib.import_module("gpu_check")
        report = gpu_check.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "report.json")])
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(capsys.readouterr().out)
    for section in gpu_check.SECTIONS:
        assert "error" not in report[section], report[section]
    assert report["methods"]["all_finite"], report["methods"]["failed"]
    assert {r["method"] for r in report["methods"]["rows"]} == set(gpu_check.SMOKE_CASES)
    assert report["backends"]["native"]["ok"] and report["backends"]["native"]["max_d"] == 0.0
    model = report["offload"]["model"]
    assert all(model[m]["max_d"] == 0.0 for m in ("plain", "agent", "freecustom")), model
    for row in report["clear"]["rows"]:
        assert row["tiled"]["max_d"] < 1e-5
    assert all("seconds" in r for r in report["agent"]["rows"].values() if "error" not in r)
    assert report["reference_layers"]["mrsa"]["max_d"] < 1e-5
    assert report["reference_layers"]["irdiffusion"]["max_d"] < 1e-5
