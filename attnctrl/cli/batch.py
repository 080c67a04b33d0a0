"""``attnctrl batch``: run a job file, resumably and reproducibly, on one or several processes.

Outputs ``{job:05d}-{seed}-{slug}[-v{k}].png`` (videos ``.mp4``), each with a JSON sidecar holding the job that
reproduces it (``attnctrl batch OUT/00000-7-a-cat.json`` re-runs it), a line in ``manifest.jsonl`` (status,
seconds, peak memory) and, for the run, ``run.json`` (versions, device, dtype, resolved config, model ids, input file
hashes). Every file is written atomically; an existing output is never overwritten unless ``--overwrite``; with
``--resume`` outputs whose file and sidecar are complete are skipped, so an interrupted run (Ctrl-C, a crash)
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
from ..io.jobs import Task, expand, load_jobs, load_run_config, method_config, resolve
from ..io.metadata import save_json, save_png, save_video
from .generate import GenerateRequest, _call_defaults, settings_record, slug, writable_folder
from .runners import MethodInputs, prepare

__all__ = ["run_batch", "task_stem", "is_video_task"]


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
    model = (task.job.model or "").lower()
    return task.job.method == "ditctrl" or "cogvideo" in model


def task_stem(task: Task) -> str:
    label = task.job.name or task.job.prompts[0]
    stem = f"{task.job_index:05d}-{task.seed}-{slug(label)}"
    return stem + (f"-v{task.variant_index}" if task.job.sweep else "")


def _complete(out: Path, stem: str, video: bool) -> bool:
    main = out / f"{stem}.{'mp4' if video else 'png'}"
    side = out / f"{stem}.json"
    if not (main.is_file() and main.stat().st_size > 0 and side.is_file()):
        return False
    try:
        return json.loads(side.read_text(encoding="utf-8")).get("output") == main.name
    except (json.JSONDecodeError, OSError):
        return False


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _input_files(task: Task, base: Path) -> list[str]:
    job = task.job
    files = []
    for spec in job.references:
        image, _, rest = spec.partition(":")
        files += [image, rest.partition(":")[0]]
    files += [spec.partition(":")[0] for spec in job.loras]
    files += [job.background, job.reference, job.reference_mask]
    return [resolve(f, base) for f in files if f and Path(resolve(f, base)).is_file()]


def _resolved_specs(job, base: Path):
    def ref(spec):
        image, _, rest = spec.partition(":")
        mask, _, prompt = rest.partition(":")
        return ":".join([resolve(image, base), resolve(mask, base) if mask else "", prompt]).rstrip(":")

    def subject(spec):
        word, _, rest = spec.partition("=")
        body, at, tail = rest.rpartition("@")
        body = body if at else rest
        head, colon, remainder = body.partition(":")
        if Path(resolve(head, base)).is_file():
            body = ref(body)
        region = ""
        if at:
            region = "@" + (resolve(tail, base) if Path(resolve(tail, base)).is_file() else tail)
        return f"{word}={body}{region}"

    loras = [resolve(s.partition(":")[0], base) + ":" + s.partition(":")[2] for s in job.loras]
    comp = None
    if job.background or job.reference or job.box:
        comp = {"background": job.background and resolve(job.background, base),
                "reference": job.reference and resolve(job.reference, base),
                "reference_mask": job.reference_mask and resolve(job.reference_mask, base), "box": job.box}
    return [ref(s) for s in job.references], [subject(s) for s in job.subjects], loras, comp


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
        existing = [stems[t.index] for t in tasks if (out / f"{stems[t.index]}.json").exists()
                    or (out / f"{stems[t.index]}.{'mp4' if is_video_task(t) else 'png'}").exists()]
        if existing:
            raise AttnCtrlError(f"{len(existing)} output(s) already exist in {out}, e.g. {existing[0]}; use --resume to "
                                f"skip finished ones or --overwrite to replace them")
    writable_folder(out)

    rank, world = process_rank()
    my_tasks = split_tasks(tasks, rank, world)
    manifest = out / ("manifest.jsonl" if world == 1 else f"manifest.{rank}.jsonl")

    from .. import __version__, load_pipeline
    from ..models import recommended_settings

    pipes: dict = {}
    counts = {"ok": 0, "skipped": 0, "error": 0}
    models, hashes = set(), {}
    bar = tqdm(my_tasks, desc="jobs", disable=not progress, position=0)
    for task in bar:
        stem = stems[task.index]
        video = is_video_task(task)
        job = task.job
        if resume and _complete(out, stem, video):
            counts["skipped"] += 1
            continue
        started = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        entry = {"index": task.index, "job_line": task.line, "seed": task.seed, "variant": task.variant,
                 "output": None, "status": "ok"}
        prepared = None
        try:
            key = (job.model, dtype, device)
            if key not in pipes:
                pipes[key] = load_pipeline(job.model, dtype=dtype, device=device)
                pipes[key].set_progress_bar_config(disable=not progress, leave=False, position=1)
            pipe = pipes[key]
            started = time.perf_counter()  # the model load is not the job's time
            models.add(getattr(pipe, "attnctrl_model_id", job.model))
            for f in _input_files(task, base):
                hashes.setdefault(f, _sha256(f))
            config = method_config(job.method, {**job.options, **task.variant})
            references, subjects, loras, comp = _resolved_specs(job, base)
            prepared = prepare(pipe, config, MethodInputs(job.prompts, references, subjects, loras, comp))
            defaults = {**_call_defaults(pipe), **recommended_settings(pipe)}
            steps = job.steps or defaults.get("num_inference_steps", 50)
            guidance = job.guidance if job.guidance is not None else defaults.get("guidance_scale")
            kwargs = {"prompt": job.prompts[0], "num_inference_steps": steps}
            if guidance is not None:
                kwargs["guidance_scale"] = guidance
            if job.negative_prompt:
                kwargs["negative_prompt"] = job.negative_prompt
            for name in ("width", "height"):
                value = getattr(job, name) or defaults.get(name)
                if value:
                    kwargs[name] = value
            if job.num_frames:
                kwargs["num_frames"] = job.num_frames
            result = prepared.generate(**kwargs, generator=torch.Generator("cpu").manual_seed(task.seed), output_type="pil")
            seconds = time.perf_counter() - started
            rerun = job.model_dump(exclude_defaults=True)
            rerun.update(seeds=[task.seed], options={**job.options, **task.variant})
            rerun.pop("sweep", None)
            for k in ("references", "subjects", "loras"):
                if rerun.get(k):
                    rerun[k] = {"references": references, "subjects": subjects, "loras": loras}[k]
            for k in ("background", "reference", "reference_mask"):
                if rerun.get(k):
                    rerun[k] = comp[k]
            request = _request(job, config)
            if video:
                frames = result.frames[0]
                name = f"{stem}.mp4"
                save_video(out / name, frames)
                record = settings_record(request, pipe, task.seed, steps, guidance, frames[0].size,
                                         {"num_frames": len(frames)})
            else:
                image = result.images[0]
                name = f"{stem}.png"
                record = settings_record(request, pipe, task.seed, steps, guidance, image.size, {})
                save_png(out / name, image, record, metadata=metadata)
                for art, im in prepared.artifacts(image).items():
                    save_png(out / f"{stem}-{art}.png", im, record, metadata=metadata)
            save_json(out / f"{stem}.json", {"jobs": [rerun], "output": name, "record": record})
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
        finally:
            if prepared is not None:
                prepared.close()
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


def _request(job, method) -> GenerateRequest:
    """The generate request a job amounts to, for :func:`settings_record` (one definition of a request's fields)."""
    composition = ({"background": job.background, "reference": job.reference, "reference_mask": job.reference_mask,
                    "box": job.box} if job.background else None)
    return GenerateRequest(prompts=tuple(job.prompts), negative_prompt=job.negative_prompt, method=method,
                           references=tuple(job.references), subjects=tuple(job.subjects), loras=tuple(job.loras),
                           composition=composition)
