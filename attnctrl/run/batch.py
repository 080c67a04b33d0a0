"""Run a job file, resumably and reproducibly, on one or several processes (``attnctrl batch``).

Outputs ``{job:05d}-{seed}-{slug}[-v{k}].png`` (videos ``.mp4``), each with a JSON sidecar holding the job that
reproduces it (``attnctrl batch OUT/00000-7-a-cat.json`` re-runs it), a line in ``manifest.jsonl`` (status,
seconds, peak memory) and, for the run, ``run.json`` (versions, device, dtype, resolved config, model ids, input file
hashes). Every file is written atomically; an existing output is never overwritten unless ``overwrite``.

A task writes, in this order, its output (through a hidden temporary file renamed into place), its sidecar (which
records the output's size and sha256) and its manifest line. ``resume`` survives a crash between any two of them:
it first removes the temporary files a killed write left, and appends the manifest line (``"adopted": true``) of
every complete output that lacks one; then it skips the complete outputs (sidecar present, output of the recorded
size and hash) and redoes the rest, overwriting an output without a sidecar or with the wrong bytes. At the end the
manifest keeps one ``ok`` line per output (the latest).

Under ``accelerate launch`` (or ``torchrun``) the tasks are split between the processes in contiguous shares, as
``PartialState().split_between_processes`` does; each writes a manifest shard and the main process merges them
when all are done. While it works each process touches ``.alive-{rank}`` in the output folder every few seconds,
and it ends by writing ``.done-{rank}`` (or ``.failed-{rank}`` with its error); the main process fails the run,
naming the rank, when one failed or its heartbeat is older than ``ATTNCTRL_RANK_TIMEOUT`` seconds (default 300),
and removes the markers. (On a CPU-only machine ``accelerate launch --cpu`` starts a single process;
``accelerate launch --multi_gpu --num_processes N`` or ``torchrun --nproc-per-node N`` start N.)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from ..core.errors import AttnCtrlError
from ..inputs import KINDS
from ..io.metadata import atomic_path, save_json, temp_target
from ..io.metadata import sha256_file as _sha256
from .generate import Session, load, slug, write
from .jobs import JobFileError, Task, expand, load_jobs, load_run_config, seeds_problem
from .request import check_runtime, validate, writable_folder

__all__ = ["run_batch", "task_stem", "is_video_task", "split_tasks"]


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process under ``accelerate launch`` / ``torchrun`` / ``mpirun``, else (0, 1)."""
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("PMI_RANK", "PMI_SIZE")):
        if size_key in os.environ:
            return int(os.environ.get(rank_key, "0")), int(os.environ[size_key])
    return 0, 1


def split_tasks(tasks: list, rank: int, world: int) -> list:
    """Contiguous shares, the first ones one longer (``accelerate``'s ``split_between_processes`` rule)."""
    per, extra = divmod(len(tasks), world)
    start = rank * per + min(rank, extra)
    return tasks[start : start + per + (1 if rank < extra else 0)]


def is_video_task(task: Task) -> bool:
    """Whether the task makes a video: its method's entry says so, or its model is a video model."""
    from ..methods import entry
    from ..models import makes_video

    return (task.job.method is not None and entry(task.job.method).video) or makes_video(task.job.model)


def task_stem(task: Task) -> str:
    label = task.job.name or task.job.prompts[0]
    stem = f"{task.job_index:05d}-{task.seed}-{slug(label)}"
    return stem + (f"-v{task.variant_index}" if task.job.sweep else "")


def _complete(out: Path, stem: str) -> str | None:
    """The output's name if the task is complete: its sidecar names ``{stem}.png`` / ``.mp4`` and that file has
    the size and sha256 the sidecar recorded; else None (a sidecar of an older attnctrl, without them, included)."""
    try:
        side = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(side, dict):
        return None
    name, size, digest = side.get("output"), side.get("output_bytes"), side.get("output_sha256")
    if name not in (f"{stem}.png", f"{stem}.mp4") or not isinstance(size, int) or not isinstance(digest, str):
        return None
    main = out / name
    try:
        if not main.is_file() or main.stat().st_size != size:
            return None
        return name if _sha256(main) == digest else None
    except OSError:
        return None


def _append_manifest(path: Path, entry: dict) -> None:
    """Append one manifest line; a line a crash cut short before it is ended first (and dropped by the merge)."""
    line = json.dumps(entry) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))


def _manifest_entries(path: Path) -> list[dict | None]:
    """The lines of a manifest, parsed (None for a line a crash cut short)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else None)
    return entries


def _recorded_outputs(out: Path) -> set[str]:
    """Outputs with an ``ok`` line in the manifest or in any manifest shard."""
    done = set()
    for path in [out / "manifest.jsonl", *sorted(out.glob("manifest.*.jsonl"))]:
        for e in _manifest_entries(path):
            if e is not None and e.get("status") == "ok" and isinstance(e.get("output"), str):
                done.add(e["output"])
    return done


def _reconcile(out: Path, stems: dict, mine: list[Task], rank: int, manifest: Path) -> tuple[set, int]:
    """Before a resumed run: remove the temporary files killed writes left (of this process's tasks; the main
    process also those of no task), and append the manifest line of every complete output that lacks one.
    Returns the stems of the complete tasks and how many of them were adopted."""
    by_length = sorted(set(stems.values()), key=len, reverse=True)
    my_stems = {stems[t.index] for t in mine}
    for path in list(out.iterdir()):
        target = temp_target(path.name)
        if target is None:
            continue
        base = target.rsplit(".", 1)[0]
        owner = next((s for s in by_length if base == s or base.startswith(s + "-")), None)
        if owner in my_stems or (owner is None and rank == 0 and not target.startswith(".")):  # not a marker
            path.unlink(missing_ok=True)
    recorded = _recorded_outputs(out)
    complete, adopted = set(), 0
    for task in mine:
        name = _complete(out, stems[task.index])
        if not name:
            continue
        complete.add(stems[task.index])
        if name not in recorded:
            _append_manifest(manifest, {"index": task.index, "job_line": task.line, "seed": task.seed,
                                        "variant": task.variant, "output": name, "status": "ok", "adopted": True})
            adopted += 1
    return complete, adopted


def _merge_shards(out: Path, world: int, ranks) -> None:
    """Main process: append the manifest shards of the processes that ended (all of them after a full run; a
    silent one's stays for --resume) and of earlier runs to ``manifest.jsonl``, then compact it."""
    for shard in sorted(out.glob("manifest.*.jsonl")):
        r = shard.name.split(".")[1]
        if ranks is not None and r.isdigit() and int(r) < world and not ranks.ended(int(r)):
            continue
        text = shard.read_text(encoding="utf-8")
        with open(out / "manifest.jsonl", "a", encoding="utf-8") as merged:
            merged.write(text if not text or text.endswith("\n") else text + "\n")
        shard.unlink()
    _compact_manifest(out / "manifest.jsonl")


def _compact_manifest(path: Path) -> None:
    """Keep one ``ok`` line per output (the latest: a redone output's earlier line goes) and drop lines a crash cut
    short; error lines stay."""
    entries = _manifest_entries(path)
    last = {e["output"]: i for i, e in enumerate(entries) if e is not None and e.get("status") == "ok"}
    keep = [e for i, e in enumerate(entries)
            if e is not None and (e.get("status") != "ok" or last.get(e.get("output")) == i)]
    if len(keep) != len(entries):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in keep), encoding="utf-8")


def _input_files(records: dict) -> list[str]:
    """Every input file of a task (from its records)."""
    files = []

    def walk(value):
        if isinstance(value, dict):
            for k, v in value.items():
                if k in ("image", "mask", "path", "background", "object", "region") and isinstance(v, str):
                    files.append(v)
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(records)
    return [f for f in files if Path(f).is_file()]


def _peak_mb() -> float:
    """Peak memory of the job in MiB: the GPU's, else the process's peak resident size (0 where the platform has
    no ``resource`` module, Windows)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _rank_timeout() -> float:
    raw = os.environ.get("ATTNCTRL_RANK_TIMEOUT", "300")
    try:
        timeout = float(raw)
    except ValueError:
        timeout = float("nan")
    if not timeout > 0 or timeout == float("inf"):
        raise AttnCtrlError(f"ATTNCTRL_RANK_TIMEOUT={raw!r}: give a number of seconds above 0")
    return timeout


class _Ranks:
    """The marker files of a multi-process run in the output folder (see the module docstring)."""

    def __init__(self, out: Path, rank: int, world: int, started: float):
        self.out, self.rank, self.world, self.started = out, rank, world, started
        self.timeout = _rank_timeout()
        self.interval = max(0.05, min(5.0, self.timeout / 4))
        for kind in ("done", "failed"):  # this rank's markers of an earlier run
            self.marker(kind, rank).unlink(missing_ok=True)
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"attnctrl-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def marker(self, kind: str, rank: int) -> Path:
        return self.out / f".{kind}-{rank}"

    def _beat(self) -> None:
        try:
            self.marker("alive", self.rank).touch()
        except OSError:  # a full or vanished disk shows up in the work itself
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def finish(self, error: BaseException | None) -> None:
        """Stop the heartbeat and say how this rank ended."""
        self._stop.set()
        self._thread.join()
        try:
            if error is None:
                self.marker("done", self.rank).write_text("", encoding="utf-8")
            else:
                text = f"{type(error).__name__}: {error}".rstrip(": ").splitlines()[0]
                with atomic_path(self.marker("failed", self.rank)) as tmp:  # never read half-written
                    tmp.write_text(text, encoding="utf-8")
            if self.rank != 0:
                self.marker("alive", self.rank).unlink(missing_ok=True)
        except OSError:
            pass

    def ended(self, rank: int) -> bool:
        return self.marker("done", rank).exists() or self.marker("failed", rank).exists()

    def wait(self) -> None:
        """Main process: wait until every rank is done; raise naming the first rank that failed or went silent."""
        pending = set(range(1, self.world))
        while pending:
            for r in sorted(pending):
                failed = self.marker("failed", r)
                if failed.exists():
                    try:
                        text = failed.read_text(encoding="utf-8").strip()
                    except (OSError, UnicodeDecodeError):
                        text = ""
                    raise AttnCtrlError(f"rank {r} of {self.world} failed ({text or 'no error text'}); the finished "
                                        f"outputs are complete, run again with --resume")
                if self.marker("done", r).exists():
                    pending.discard(r)
                    continue
                try:
                    beat = max(self.marker("alive", r).stat().st_mtime, self.started)
                except FileNotFoundError:
                    if self.ended(r):  # it finished between the two looks
                        continue
                    beat = self.started
                silent = time.time() - beat
                if silent > self.timeout:
                    never = "" if self.marker("alive", r).exists() else " (it never started)"
                    raise AttnCtrlError(f"rank {r} of {self.world} stopped responding: no heartbeat for "
                                        f"{silent:.0f} s{never}, more than ATTNCTRL_RANK_TIMEOUT={self.timeout:g}; "
                                        f"the finished outputs are complete, run again with --resume")
            if pending:
                time.sleep(min(0.2, self.interval))

    def cleanup(self) -> None:
        for kind in ("alive", "done", "failed"):
            for path in self.out.glob(f".{kind}-*"):
                path.unlink(missing_ok=True)


def run_batch(jobs_path, out, config_path=None, resume=False, overwrite=False, dry_run=False, seeds=None,
              device=None, dtype=None, metadata=None, echo=print, progress=True, offload=None,
              attention_backend=None) -> dict:
    """Run (or with ``dry_run`` only list) the tasks of a job file; returns counts by status (``adopted``: complete
    outputs whose manifest line a crash had cut, recorded by a resumed run; they count as skipped too)."""
    started_at = time.time()
    if resume and overwrite:
        raise AttnCtrlError("--resume and --overwrite exclude each other")
    run = load_run_config(config_path)
    if seeds is not None:
        seeds = list(seeds)
        problem = seeds_problem(seeds)
        if problem:
            raise JobFileError(f"seeds {seeds}: {problem}")
        run.seeds = seeds
    device = device or run.device or "auto"
    dtype = dtype or run.dtype or "auto"
    offload = offload or run.offload
    attention_backend = attention_backend or run.attention_backend
    check_runtime(device, dtype, offload, attention_backend)  # once for the run, before any job
    metadata = run.metadata if metadata is None else metadata
    jobs = load_jobs(jobs_path, run)
    tasks = expand(jobs, run.seeds)
    out = Path(out)
    stems = {t.index: task_stem(t) for t in tasks}
    if dry_run:
        for t in tasks:
            variant = f" {json.dumps(t.variant)}" if t.variant else ""
            ext = "mp4" if is_video_task(t) else "png"
            echo(f"{t.index:5d}  {jobs_path}:{t.line}  seed {t.seed}{variant}  ->  {stems[t.index]}.{ext}")
        return {"planned": len(tasks)}
    if not resume and not overwrite:
        existing = [stems[t.index] for t in tasks if any(out.glob(f"{stems[t.index]}.*"))]
        if existing:
            raise AttnCtrlError(f"{len(existing)} output(s) already exist in {out}, e.g. {existing[0]}; use --resume to "
                                f"skip finished ones or --overwrite to replace them")
    writable_folder(out)

    rank, world = process_rank()
    my_tasks = split_tasks(tasks, rank, world)
    manifest = out / ("manifest.jsonl" if world == 1 else f"manifest.{rank}.jsonl")
    ranks = _Ranks(out, rank, world, started_at) if world > 1 else None
    try:
        try:
            complete, adopted = _reconcile(out, stems, my_tasks, rank, manifest) if resume else (set(), 0)
            counts, models, hashes = _run_tasks(my_tasks, stems, jobs_path, out, manifest, complete, device, dtype,
                                                metadata, echo, progress, offload, attention_backend)
        except BaseException as e:
            if ranks is not None:
                ranks.finish(e)
            raise
        if ranks is not None:
            ranks.finish(None)
        if adopted:
            counts["adopted"] = adopted
        if rank != 0:
            return counts
        if ranks is not None:
            ranks.wait()
    finally:
        if rank == 0:
            try:
                _merge_shards(out, world, ranks)
            finally:
                if ranks is not None:
                    ranks.cleanup()

    import diffusers
    import transformers

    from .. import __version__

    save_json(out / "run.json", {
        "attnctrl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "dtype": dtype, "offload": offload,
        "attention_backend": attention_backend,
        "processes": world, "jobs_file": str(jobs_path), "run_config": run.model_dump(),
        "jobs": [job.model_dump(exclude_defaults=True) for _, job in jobs], "models": sorted(map(str, models)),
        "input_hashes": hashes, "tasks": len(tasks),
    })
    return counts


def _run_tasks(my_tasks, stems, jobs_path, out, manifest, complete, device, dtype, metadata, echo, progress,
               offload=None, attention_backend=None):
    """This process's share (the stems in ``complete`` skipped): ``(counts, model ids, input file hashes)``."""
    from tqdm.auto import tqdm

    base = Path(jobs_path).resolve().parent
    pipes: dict = {}
    counts = {"ok": 0, "skipped": 0, "error": 0}
    models, hashes = set(), {}
    bar = tqdm(my_tasks, desc="jobs", disable=not progress, position=0)
    for task in bar:
        stem = stems[task.index]
        job = task.job
        if stem in complete:
            counts["skipped"] += 1
            continue
        started = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        entry = {"index": task.index, "job_line": task.line, "seed": task.seed, "variant": task.variant,
                 "output": None, "status": "ok"}
        try:
            plan = validate(job.request(base, task.seed, task.variant, device=device, dtype=dtype, output=out,
                                        metadata=metadata, offload=offload,
                                        attention_backend=attention_backend))
            key = (job.model, dtype, device, offload, attention_backend)
            if key not in pipes:
                pipes[key] = load(plan)
                pipes[key].set_progress_bar_config(disable=not progress, leave=False, position=1)
            pipe = pipes[key]
            started = time.perf_counter()  # the model load is not the job's time
            models.add(getattr(pipe, "attnctrl_model_id", job.model))
            records = {k: [KINDS[k].record(r) for r in v] for k, v in plan.inputs.items()}
            for f in _input_files(records):
                hashes.setdefault(f, _sha256(f))
            with Session(plan, pipe) as session:
                result = session(task.seed)
                files = list(write(plan, session, result, out, stem, metadata))
            records = result.settings.get("inputs") or records  # the copies next to the outputs (with metadata)
            seconds = time.perf_counter() - started
            rerun = job.model_dump(exclude_defaults=True)
            rerun.update(seeds=[task.seed], options={**job.options, **task.variant}, **records)
            rerun.pop("sweep", None)
            main = files[0].path
            save_json(out / f"{stem}.json", {"jobs": [rerun], "output": main.name, "output_bytes": main.stat().st_size,
                                             "output_sha256": _sha256(main), "record": result.settings})
            entry.update(output=main.name, seconds=round(seconds, 3), peak_memory_mb=round(_peak_mb(), 1))
            counts["ok"] += 1
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failing job (bad input found late, out of memory) is recorded; the run goes on
            entry.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0],
                         seconds=round(time.perf_counter() - started, 3))
            if not isinstance(e, AttnCtrlError):
                entry["traceback"] = traceback.format_exc(limit=5)
            counts["error"] += 1
            echo(f"job {jobs_path}:{task.line} seed {task.seed} failed: {entry['error']}")
        _append_manifest(manifest, entry)
    return counts, models, hashes
