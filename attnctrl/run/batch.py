"""Run a job file, resumably and reproducibly, on one or several processes (``attnctrl batch``).

Outputs ``{job:05d}-{seed}-{slug}[-v{k}].png`` (videos ``.mp4``), each with a JSON sidecar holding the job that
reproduces it (``attnctrl batch OUT/00000-7-a-cat.json`` re-runs it), a line in ``manifest.jsonl`` (status,
seconds, peak memory) and, for the run, ``run.json`` (versions, device, dtype, resolved config, model ids, input file
hashes). Every file is written atomically; an existing output is never overwritten unless ``overwrite``; with
``resume`` outputs whose file and sidecar are complete are skipped, so an interrupted run (Ctrl-C, a crash)
finishes where it stopped. Under ``accelerate launch`` (or ``torchrun``) the tasks are split between the processes
in contiguous shares, as ``PartialState().split_between_processes`` does; each writes a manifest shard and the
main process merges them when all are done. (On a CPU-only machine ``accelerate launch --cpu`` starts a single
process; ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun --nproc-per-node N`` start N.)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time
import traceback
from pathlib import Path

import torch

from ..core.errors import AttnCtrlError
from ..inputs import KINDS
from ..io.metadata import save_json
from .generate import Session, load, slug, write
from .jobs import Task, expand, load_jobs, load_run_config
from .request import validate, writable_folder

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


def _complete(out: Path, stem: str) -> bool:
    """The sidecar exists and names a non-empty output file (a PNG or a video)."""
    side = out / f"{stem}.json"
    try:
        name = json.loads(side.read_text(encoding="utf-8")).get("output")
    except (json.JSONDecodeError, OSError):
        return False
    main = out / str(name)
    return bool(name) and main.is_file() and main.stat().st_size > 0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_batch(jobs_path, out, config_path=None, resume=False, overwrite=False, dry_run=False, seeds=None,
              device=None, dtype=None, metadata=None, echo=print, progress=True) -> dict:
    """Run (or with ``dry_run`` only list) the tasks of a job file; returns counts by status."""
    from tqdm.auto import tqdm

    run = load_run_config(config_path)
    if seeds is not None:
        run.seeds = list(seeds)
    device = device or run.device or "auto"
    dtype = dtype or run.dtype or "auto"
    metadata = run.metadata if metadata is None else metadata
    jobs = load_jobs(jobs_path, run)
    base = Path(jobs_path).resolve().parent
    tasks = expand(jobs, run.seeds)
    out = Path(out)
    stems = {t.index: task_stem(t) for t in tasks}
    if dry_run:
        for t in tasks:
            variant = f" {json.dumps(t.variant)}" if t.variant else ""
            ext = "mp4" if is_video_task(t) else "png"
            echo(f"{t.index:5d}  {jobs_path}:{t.line}  seed {t.seed}{variant}  ->  {stems[t.index]}.{ext}")
        return {"planned": len(tasks)}
    if resume and overwrite:
        raise AttnCtrlError("--resume and --overwrite exclude each other")
    if not resume and not overwrite:
        existing = [stems[t.index] for t in tasks if any(out.glob(f"{stems[t.index]}.*"))]
        if existing:
            raise AttnCtrlError(f"{len(existing)} output(s) already exist in {out}, e.g. {existing[0]}; use --resume to "
                                f"skip finished ones or --overwrite to replace them")
    writable_folder(out)

    rank, world = process_rank()
    my_tasks = split_tasks(tasks, rank, world)
    manifest = out / ("manifest.jsonl" if world == 1 else f"manifest.{rank}.jsonl")

    from .. import __version__

    pipes: dict = {}
    counts = {"ok": 0, "skipped": 0, "error": 0}
    models, hashes = set(), {}
    bar = tqdm(my_tasks, desc="jobs", disable=not progress, position=0)
    for task in bar:
        stem = stems[task.index]
        job = task.job
        if resume and _complete(out, stem):
            counts["skipped"] += 1
            continue
        started = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        entry = {"index": task.index, "job_line": task.line, "seed": task.seed, "variant": task.variant,
                 "output": None, "status": "ok"}
        try:
            plan = validate(job.request(base, task.seed, task.variant, device=device, dtype=dtype, output=out,
                                        metadata=metadata))
            key = (job.model, dtype, device)
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
            seconds = time.perf_counter() - started
            rerun = job.model_dump(exclude_defaults=True)
            rerun.update(seeds=[task.seed], options={**job.options, **task.variant}, **records)
            rerun.pop("sweep", None)
            name = files[0].path.name
            save_json(out / f"{stem}.json", {"jobs": [rerun], "output": name, "record": result.settings})
            entry.update(output=name, seconds=round(seconds, 3), peak_memory_mb=round(_peak_mb(), 1))
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
        with open(manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    if world > 1:  # file-based barrier: works under accelerate launch and torchrun, with or without a GPU
        (out / f".done-{rank}").write_text("")
        if rank == 0:
            while not all((out / f".done-{r}").exists() for r in range(world)):
                time.sleep(0.2)
    if rank == 0:
        if world > 1:
            with open(out / "manifest.jsonl", "a", encoding="utf-8") as merged:
                for r in range(world):
                    shard = out / f"manifest.{r}.jsonl"
                    if shard.exists():
                        merged.write(shard.read_text(encoding="utf-8"))
                        shard.unlink()
                    (out / f".done-{r}").unlink(missing_ok=True)
        import diffusers
        import transformers

        save_json(out / "run.json", {
            "attnctrl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "dtype": dtype,
            "processes": world, "jobs_file": str(jobs_path), "run_config": run.model_dump(),
            "jobs": [job.model_dump(exclude_defaults=True) for _, job in jobs], "models": sorted(map(str, models)),
            "input_hashes": hashes, "tasks": len(tasks),
        })
    return counts

