"""attnctrl batch survives bad seeds and a crash at any point: inside the output write, between the output and its
sidecar, between the sidecar and its manifest line, a truncated output, SIGTERM, and a rank that dies."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny

import attnctrl.io
import attnctrl.run.batch as batch
from attnctrl.cli.main import cli
from attnctrl.core.errors import AttnCtrlError
from attnctrl.run.batch import run_batch
from attnctrl.run.jobs import JobFileError, load_jobs, load_run_config

JOB = {"model": "tiny-sd15", "prompt": "a photo of a cat", "seeds": [0, 1], "steps": 2, "width": 64, "height": 64}
STEMS = ["00000-0-a-photo-of-a-cat", "00000-1-a-photo-of-a-cat"]
PNGS = [f"{s}.png" for s in STEMS]


class Crash(BaseException):
    """A simulated kill: not an Exception, so the runner does not record it as a failed job and go on."""


@pytest.fixture(scope="module", autouse=True)
def _one_pipeline():
    """Every run of this module uses the session's tiny SD 1.5 (built once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "load", lambda plan: tiny("sd15"))
        yield


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "jobs.jsonl"
    path.write_text(json.dumps(JOB) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(jobs, tmp_path_factory) -> dict:
    """The bytes of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    assert run_batch(jobs, out, progress=False, echo=lambda m: None) == {"ok": 2, "skipped": 0, "error": 0}
    return {name: (out / name).read_bytes() for name in PNGS}


@pytest.fixture
def writes(monkeypatch) -> list:
    """The stems the runner generates (each call of ``write``)."""
    done = []
    real = batch.write

    def counting(plan, session, result, folder, stem, *args, **kwargs):
        done.append(stem)
        return real(plan, session, result, folder, stem, *args, **kwargs)

    monkeypatch.setattr(batch, "write", counting)
    return done


def _run(jobs, out, **kw) -> dict:
    return run_batch(jobs, out, progress=False, echo=lambda m: None, **kw)


def _ok_lines(out: Path) -> Counter:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return Counter(e["output"] for e in lines if e["status"] == "ok")


def _temps(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if ".tmp-" in p.name]


def _assert_finished(out: Path, reference: dict) -> None:
    assert _ok_lines(out) == Counter(PNGS)  # exactly one ok line per task
    for name in PNGS:
        assert (out / name).read_bytes() == reference[name], name
        side = json.loads((out / name.replace(".png", ".json")).read_text())
        assert side["output"] == name and side["output_bytes"] == len(reference[name])
        assert side["output_sha256"] == hashlib.sha256(reference[name]).hexdigest()
    assert not _temps(out) and not list(out.glob("manifest.*.jsonl"))


def test_crash_inside_the_output_write_leaves_a_temp_file_that_resume_removes(jobs, reference, tmp_path, monkeypatch,
                                                                               writes):
    real = attnctrl.io.save_png

    def killed_mid_write(path, image, *args, **kwargs):
        path = Path(path)
        if path.name != PNGS[1]:
            return real(path, image, *args, **kwargs)
        # what atomic_path has on disk when the process dies inside the write: a hidden, half-written temp file
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
        os.write(fd, reference[PNGS[1]][:50])
        os.close(fd)
        raise Crash

    monkeypatch.setattr(attnctrl.io, "save_png", killed_mid_write)
    with pytest.raises(Crash):
        _run(jobs, tmp_path)
    assert len(_temps(tmp_path)) == 1 and not (tmp_path / PNGS[1]).exists()
    monkeypatch.setattr(attnctrl.io, "save_png", real)
    writes.clear()
    assert _run(jobs, tmp_path, resume=True) == {"ok": 1, "skipped": 1, "error": 0}
    assert writes == [STEMS[1]]
    _assert_finished(tmp_path, reference)


def test_crash_after_the_output_before_the_sidecar_is_redone(jobs, reference, tmp_path, monkeypatch, writes):
    real = batch.save_json

    def no_second_sidecar(path, data):
        if Path(path).name == f"{STEMS[1]}.json":
            raise Crash
        return real(path, data)

    monkeypatch.setattr(batch, "save_json", no_second_sidecar)
    with pytest.raises(Crash):
        _run(jobs, tmp_path)
    assert (tmp_path / PNGS[1]).is_file() and not (tmp_path / f"{STEMS[1]}.json").exists()
    monkeypatch.setattr(batch, "save_json", real)
    writes.clear()
    assert _run(jobs, tmp_path, resume=True) == {"ok": 1, "skipped": 1, "error": 0}
    assert writes == [STEMS[1]]  # an output without a sidecar is made again
    _assert_finished(tmp_path, reference)


def test_crash_after_the_sidecar_before_the_manifest_line_is_adopted(jobs, reference, tmp_path, monkeypatch, writes):
    real = batch._append_manifest
    calls = []

    def no_second_line(path, entry):
        calls.append(entry)
        if len(calls) == 2:
            raise Crash
        return real(path, entry)

    monkeypatch.setattr(batch, "_append_manifest", no_second_line)
    with pytest.raises(Crash):
        _run(jobs, tmp_path)
    assert _ok_lines(tmp_path) == Counter(PNGS[:1])
    monkeypatch.setattr(batch, "_append_manifest", real)
    writes.clear()
    assert _run(jobs, tmp_path, resume=True) == {"ok": 0, "skipped": 2, "error": 0, "adopted": 1}
    assert writes == []  # complete outputs are not made again
    _assert_finished(tmp_path, reference)
    adopted = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()][-1]
    assert adopted["output"] == PNGS[1] and adopted["adopted"] is True and adopted["seed"] == 1
    # a resume of a finished run changes nothing
    before = (tmp_path / "manifest.jsonl").read_text()
    assert _run(jobs, tmp_path, resume=True) == {"ok": 0, "skipped": 2, "error": 0}
    assert (tmp_path / "manifest.jsonl").read_text() == before and writes == []


def test_truncated_output_with_intact_sidecar_is_redone(jobs, reference, tmp_path, writes):
    _run(jobs, tmp_path)
    sidecar = (tmp_path / f"{STEMS[0]}.json").read_text()
    png = tmp_path / PNGS[0]
    png.write_bytes(png.read_bytes()[:100])
    writes.clear()
    assert _run(jobs, tmp_path, resume=True) == {"ok": 1, "skipped": 1, "error": 0}
    assert writes == [STEMS[0]]
    _assert_finished(tmp_path, reference)  # the same bytes as an uninterrupted run, one ok line per task
    assert (tmp_path / f"{STEMS[0]}.json").read_text() == sidecar
    # same size, other bytes: the hash catches it
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF
    png.write_bytes(bytes(data))
    writes.clear()
    _run(jobs, tmp_path, resume=True)
    assert writes == [STEMS[0]]
    _assert_finished(tmp_path, reference)


def test_partial_manifest_line_is_dropped_and_resume_finishes(jobs, reference, tmp_path, writes):
    _run(jobs, tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n" + lines[1][:15])  # killed in the middle of the second line
    writes.clear()
    assert _run(jobs, tmp_path, resume=True)["adopted"] == 1
    assert writes == []
    _assert_finished(tmp_path, reference)


def test_sigterm_is_an_interrupt_exit_143_nothing_partial(jobs, reference, tmp_path, monkeypatch):
    real = attnctrl.io.save_png
    previous = signal.getsignal(signal.SIGTERM)

    def terminated_mid_write(path, image, *args, **kwargs):
        path = Path(path)
        if path.name != PNGS[1]:
            return real(path, image, *args, **kwargs)
        with attnctrl.io.atomic_path(path) as tmp:
            tmp.write_bytes(reference[PNGS[1]][:50])
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(500):  # the handler runs at the next bytecode
                time.sleep(0.01)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(attnctrl.io, "save_png", terminated_mid_write)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["batch", str(jobs), "-o", str(out)])
    assert result.exit_code == 143, result.output
    assert "interrupted: finished outputs are complete, nothing partial was left; run again with --resume" in (
        result.output)
    assert "Traceback" not in result.output
    assert not _temps(out) and not (out / PNGS[1]).exists() and (out / PNGS[0]).is_file()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the command's only while it runs
    monkeypatch.setattr(attnctrl.io, "save_png", real)
    result = CliRunner().invoke(cli, ["batch", str(jobs), "-o", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    _assert_finished(out, reference)


@pytest.fixture
def two_ranks(monkeypatch, jobs, tmp_path) -> Path:
    """Rank 0 of two, with a 2 s heartbeat timeout and one task (rank 1's share is empty)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ATTNCTRL_RANK_TIMEOUT", "2")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({**JOB, "seeds": [0]}) + "\n")
    return one


def _markers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith((".alive-", ".done-", ".failed-"))]


def test_rank_that_never_starts_fails_the_run_within_seconds(two_ranks, tmp_path):
    out = tmp_path / "out"
    started = time.time()
    with pytest.raises(AttnCtrlError, match=r"rank 1 of 2 stopped responding: no heartbeat .*never started.*"
                                            r"ATTNCTRL_RANK_TIMEOUT=2"):
        _run(two_ranks, out)
    assert time.time() - started < 30
    assert not _markers(out)
    assert _ok_lines(out) == Counter(PNGS[:1]) and not list(out.glob("manifest.*.jsonl"))  # rank 0's shard merged


def test_failed_rank_fails_the_run_naming_it(two_ranks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".failed-1").write_text("RuntimeError: CUDA out of memory")
    with pytest.raises(AttnCtrlError, match=r"rank 1 of 2 failed \(RuntimeError: CUDA out of memory\)"):
        _run(two_ranks, out)
    assert not _markers(out)


def test_rank_that_finished_lets_rank_0_finish(two_ranks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".done-1").write_text("")
    assert _run(two_ranks, out) == {"ok": 1, "skipped": 0, "error": 0}
    assert not _markers(out) and json.loads((out / "run.json").read_text())["processes"] == 2


def test_other_rank_does_not_wait_and_reports_its_end(monkeypatch, two_ranks, tmp_path):
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    assert _run(two_ranks, out) == {"ok": 0, "skipped": 0, "error": 0}
    assert _markers(out) == [".done-1"] and not (out / "run.json").exists()
    monkeypatch.setattr(batch, "_run_tasks", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        _run(two_ranks, out, resume=True)
    assert _markers(out) == [".failed-1"] and (out / ".failed-1").read_text() == "RuntimeError: disk full"


def test_bad_rank_timeout_is_an_error(two_ranks, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCTRL_RANK_TIMEOUT", "soon")
    with pytest.raises(AttnCtrlError, match="ATTNCTRL_RANK_TIMEOUT='soon'"):
        _run(two_ranks, tmp_path)


# --- seeds and numbers ------------------------------------------------------------------------------------------


BAD = [
    ('"seeds": [1, 1]', "seeds: Value error, seed 1 is given more than once"),
    ('"seeds": []', "seeds: Value error, give at least one seed or leave seeds out"),
    ('"seeds": [true]', "seeds.0: true is a boolean, not a number"),
    ('"steps": true', "steps: true is a boolean, not a number"),
    ('"width": false', "width: false is a boolean, not a number"),
    ('"num_frames": true', "num_frames: true is a boolean, not a number"),
    ('"guidance": Infinity', "guidance: Input should be a finite number"),
    ('"guidance": NaN', "guidance: Input should be a finite number"),
    ('"guidance": true', "guidance: Value error, a boolean is not a number"),
    ('"seeds": [-1]', "seeds: Value error, seed -1 is out of range: seeds are integers from 0 to 4294967295"),
    (f'"seeds": [{2**70}]', f"seeds: Value error, seed {2**70} is out of range: seeds are integers from 0 to 4294967295"),
    ('"seeds": [4294967296]', "seeds: Value error, seed 4294967296 is out of range: seeds are integers from 0 to 4294967295"),
    ('"seeds": [1.5]', "seeds.0: Input should be a valid integer"),
    ('"steps": 2.0', "steps: Input should be a valid integer"),
]


def test_bad_seeds_and_numbers_are_listed_with_file_line_and_field(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(f'{{"prompt": "x", {field}}}\n' for field, _ in BAD))
    with pytest.raises(JobFileError) as e:
        load_jobs(path)
    text = str(e.value)
    for n, (_, expected) in enumerate(BAD, 1):
        assert f"{path}:{n}: {expected}" in text, (expected, text)
    result = CliRunner().invoke(cli, ["batch", str(path), "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert "seed 1 is given more than once" in result.output and not (tmp_path / "out").exists()


def test_good_edge_seeds_and_numbers_pass(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "x", "seeds": [4294967295, 0], "steps": 2, "guidance": 7, "width": 64}\n')
    (_, job), = load_jobs(path)
    assert job.seeds == [4294967295, 0] and job.guidance == 7.0


@pytest.mark.parametrize("seeds, expected", [
    (",,,", "give at least one seed or leave seeds out"),
    ("", "give at least one seed"),
    ("3,1,3", "seed 3 is given more than once"),
    ("-1", "seed -1 is out of range"),
    ("4294967296", "from 0 to 4294967295"),
    ("1,x", "give comma-separated integers"),
])
def test_bad_seeds_flag(jobs, tmp_path, seeds, expected):
    result = CliRunner().invoke(cli, ["batch", str(jobs), "-o", str(tmp_path / "out"), "--dry-run", "--seeds", seeds])
    assert result.exit_code == 1, result.output
    assert result.output.count("Error:") == 1 and expected in result.output and "Traceback" not in result.output


def test_bad_seeds_in_run_config_and_argument(jobs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seeds: [2, 2]\n")
    with pytest.raises(JobFileError, match=f"{config}: seeds: Value error, seed 2 is given more than once"):
        load_run_config(config)
    config.write_text("defaults: {seeds: []}\n")
    no_seeds = tmp_path / "no-seeds.jsonl"
    no_seeds.write_text('{"prompt": "x"}\n')
    with pytest.raises(JobFileError, match=":1: seeds: Value error, give at least one seed"):
        run_batch(no_seeds, tmp_path / "o", config, dry_run=True, echo=lambda m: None)
    with pytest.raises(JobFileError, match="seed 5 is given more than once"):
        run_batch(jobs, tmp_path / "o", seeds=[5, 5], dry_run=True, echo=lambda m: None)
    assert run_batch(jobs, tmp_path / "o", seeds=[7], dry_run=True, echo=lambda m: None) == {"planned": 1}


def test_batch_module_imports_without_resource(monkeypatch):
    """``resource`` is Unix-only: the module imports, and peak memory reads 0, where it is missing (Windows)."""
    assert batch._peak_mb() > 0
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    spec = importlib.util.spec_from_file_location("attnctrl.run._batch_without_resource", batch.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._peak_mb() == 0.0
    assert module.run_batch.__name__ == "run_batch"
