"""attnctrl batch: example job files, expansion order, validation errors, resume after a kill, multi-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attnctrl.cli.main import cli
from attnctrl.io import parse_infotext, read_png_metadata
from attnctrl.run.batch import run_batch, split_tasks
from attnctrl.run.jobs import JobFileError, expand, load_jobs

JOBS = Path(__file__).resolve().parents[1] / "attnctrl" / "assets" / "jobs"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("name", sorted(p.stem for p in JOBS.glob("*.jsonl")))
def test_every_example_job_file_runs(name, tmp_path):
    counts = run_batch(JOBS / f"{name}.jsonl", tmp_path, progress=False, echo=lambda m: None)
    assert counts["error"] == 0 and counts["ok"] >= 1
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert all(m["status"] == "ok" and (tmp_path / m["output"]).is_file() for m in manifest)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["tasks"] == len(manifest) and run["torch"]


def test_dry_run_expansion_order(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat", "seeds": [5, 1], "sweep": {"ratio": [0.3, 0.5], "agent_ratio": [0.9]}, '
                    '"method": "agent"}\n\n# a comment\n{"prompt": "a dog"}\n')
    result = CliRunner().invoke(cli, ["batch", str(jobs), "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split("->")[1].strip() for line in lines] == [
        "00000-5-a-cat-v0.png", "00000-5-a-cat-v1.png", "00000-1-a-cat-v0.png", "00000-1-a-cat-v1.png",
        "00001-0-a-dog.png",
    ]
    assert '{"agent_ratio": 0.9, "ratio": 0.3}' in lines[0] and "jobs.jsonl:4" in lines[4]
    tasks = expand(load_jobs(jobs), seeds=[7])
    assert [(t.job_index, t.seed, t.variant_index) for t in tasks] == [(0, 7, 0), (0, 7, 1), (1, 7, 0)]
    assert not (tmp_path / "out").exists()


def test_invalid_files_list_every_error_before_anything_runs(tmp_path):
    jobs = tmp_path / "bad.jsonl"
    jobs.write_text("\n".join([
        '{"prompt": "ok"}',
        '{"prompt": "x", "stepz": 3}',
        '{"prompt": "x", "method": "agent", "options": {"ratio": 2}}',
        '{not json',
        '{"prompt": "x", "method": "freecustom", "references": ["missing.png"]}',
        '{"prompt": "", "width": 100}',
        '{"prompt": "x", "method": "nope"}',
        '{"prompt": "x", "method": "agent", "options": {"speed": 1}}',
    ]) + "\n")
    with pytest.raises(JobFileError) as e:
        load_jobs(jobs)
    text = str(e.value)
    assert f"{jobs}:4: invalid JSON" in text
    jobs.write_text("\n".join(line for i, line in enumerate(jobs.read_text().splitlines()) if i != 3) + "\n")
    with pytest.raises(JobFileError) as e:
        load_jobs(jobs)
    text = str(e.value)
    for expected in (":2: stepz: Extra inputs", ":3: agent ratio must lie in [0, 1)", ":4: reference 1: image: file missing.png does not exist",
                     ":5: prompt: Value error", ":5: width: Input should be a multiple of 8", ":6: unknown method",
                     ":7: agent has no option 'speed'"):
        assert expected in text, (expected, text)
    result = CliRunner().invoke(cli, ["batch", str(jobs), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and not (tmp_path / "o").exists()


def test_no_overwrite_resume_and_sidecar_rerun(tmp_path):
    out = tmp_path / "out"
    run_batch(JOBS / "plain.jsonl", out, progress=False, echo=lambda m: None)
    with pytest.raises(Exception, match="already exist"):
        run_batch(JOBS / "plain.jsonl", out, progress=False, echo=lambda m: None)
    counts = run_batch(JOBS / "plain.jsonl", out, resume=True, progress=False, echo=lambda m: None)
    assert counts == {"ok": 0, "skipped": 3, "error": 0}
    png = out / "00000-1-a-photo-of-a-cat.png"
    meta = read_png_metadata(png)
    assert meta["attnctrl"]["seed"] == 1 and parse_infotext(meta["parameters"])["Seed"] == "1"
    again = tmp_path / "again"
    run_batch(out / "00000-1-a-photo-of-a-cat.json", again, progress=False, echo=lambda m: None)
    assert (again / png.name).read_bytes() == png.read_bytes()  # the sidecar reproduces the output exactly


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "attnctrl", "batch", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _ok(args) -> bool:
    proc = _run(args)
    proc.communicate(timeout=600)
    return proc.returncode == 0


def test_resume_after_a_kill_gives_the_same_files(tmp_path):
    # slow enough per output (30 steps at 256 px) that the interrupt lands while outputs are still missing
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"model": "tiny-sd15", "prompt": "a photo of a cat", "seeds": list(range(8)),
                                "steps": 30, "width": 256, "height": 256}) + "\n")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _ok([str(jobs), "-o", str(full)])
    # Ctrl-C in a terminal; under `nohup` or `cmd &` SIGINT arrives ignored and would be inherited, so restore it
    proc = _run([str(jobs), "-o", str(killed)], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("*.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err
    assert len(list(killed.glob("*.png"))) < 8
    assert not [p for p in killed.iterdir() if ".tmp" in p.name]  # nothing partial
    assert _ok([str(jobs), "-o", str(killed), "--resume"])
    names = sorted(p.name for p in full.iterdir() if p.suffix in (".png", ".json") and p.name != "run.json")
    assert len(names) == 16
    assert names == sorted(p.name for p in killed.iterdir() if p.suffix in (".png", ".json") and p.name != "run.json")
    for name in names:
        if name.endswith(".png"):
            assert (full / name).read_bytes() == (killed / name).read_bytes(), name


def test_two_processes_give_the_union_of_a_single_run(tmp_path):
    assert [len(split_tasks(list(range(7)), r, 3)) for r in range(3)] == [3, 2, 2]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_batch(JOBS / "plain.jsonl", single, progress=False, echo=lambda m: None)
    # a real launcher: torchrun starts 2 processes with RANK / WORLD_SIZE (what accelerate launch does on GPUs; its
    # --cpu mode starts a single process)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "attnctrl.cli.main", "batch", str(JOBS / "plain.jsonl"), "-o", str(multi)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((multi / "run.json").read_text())["processes"] == 2
    files = sorted(p.name for p in single.glob("*.png"))
    assert files == sorted(p.name for p in multi.glob("*.png"))
    for name in files:  # same pixels up to the thread count's rounding
        a = np.asarray(Image.open(single / name), dtype=int)
        b = np.asarray(Image.open(multi / name), dtype=int)
        assert np.abs(a - b).max() <= 2
    lines = (multi / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2]
    assert not list(multi.glob("manifest.*.jsonl")) and not list(multi.glob(".done-*"))


def test_old_job_files_keep_working_and_read_as_the_structured_form(tmp_path):
    """The first format's colon strings and top-level composition keys give the same requests as objects."""
    examples = JOBS.parent / "examples"
    old = tmp_path / "old.jsonl"
    star, mask = examples / "striped-green-star.png", examples / "striped-green-star-mask.png"
    old.write_text("\n".join(json.dumps(j) for j in [
        {"method": "freecustom", "prompt": "a star", "references": [f"{star}:{mask}:a striped green star"]},
        {"method": "irdiffusion", "prompt": "a star", "subjects": [f"star={star}:{mask}:a star@0,0,0.5,1"]},
        {"method": "primecomposer", "prompt": "a star", "background": str(examples / "composition-background.png"),
         "reference": str(star), "reference_mask": str(mask), "box": [1, 2, 30, 40]},
    ]) + "\n")
    new = tmp_path / "new.jsonl"
    new.write_text("\n".join(json.dumps(j) for j in [
        {"method": "freecustom", "prompt": "a star", "references": [
            {"image": str(star), "mask": str(mask), "prompt": "a striped green star"}]},
        {"method": "irdiffusion", "prompt": "a star", "subjects": [
            {"word": "star", "reference": {"image": str(star), "mask": str(mask), "prompt": "a star"},
             "region": [0, 0, 0.5, 1]}]},
        {"method": "primecomposer", "prompt": "a star", "composition": {
            "background": str(examples / "composition-background.png"), "object": str(star), "mask": str(mask),
            "box": [1, 2, 30, 40]}},
    ]) + "\n")
    from attnctrl.run import validate

    for (_, a), (_, b) in zip(load_jobs(old), load_jobs(new)):
        pa, pb = validate(a.request(tmp_path)), validate(b.request(tmp_path))
        assert pa.inputs == pb.inputs and pa.inputs
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"method": "primecomposer", "prompt": "x", "background": "a.png",
                                "composition": {"background": "a.png"}}) + "\n")
    with pytest.raises(JobFileError, match="give the composition once"):
        load_jobs(both)
