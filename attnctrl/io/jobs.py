"""Job files for ``attnctrl batch``: reading, validation (all errors at once, with file:line and field) and the
deterministic expansion into tasks.

A job file is JSONL (one JSON object per line; blank lines and ``#`` comments are skipped) or a YAML/JSON list.
A job names a method (optional), a model (optional), a prompt (a list for DiTCtrl), the method's inputs and any
generation option; a run config (YAML/JSON) gives defaults for every job; command-line flags override both.

Method options go under ``options`` and are validated by pydantic against the method's config dataclass (the same
types and checks as the Python API); option values to sweep go under ``sweep`` (``{"ratio": [0.3, 0.5]}``). The
expansion order is: jobs in file order, then seeds in the order given, then the cartesian product of the swept
values (keys sorted).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core.errors import AttnCtrlError

__all__ = ["Job", "RunConfig", "Task", "JobFileError", "load_jobs", "load_run_config", "expand", "method_config"]


class JobFileError(AttnCtrlError):
    """One or more invalid jobs; ``str()`` lists every problem with file:line and field."""


class Job(BaseModel):
    """One job line. Unknown keys are errors (a typo never silently does nothing)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str]
    method: str | None = None
    model: str | None = None
    negative_prompt: str | None = None
    seeds: list[int] | None = None
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance: float | None = Field(default=None, ge=0)
    width: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    num_frames: int | None = Field(default=None, ge=1, le=1000)
    references: list[str] = []
    subjects: list[str] = []
    loras: list[str] = []
    background: str | None = None
    reference: str | None = None
    reference_mask: str | None = None
    box: list[float] | None = None
    options: dict[str, Any] = {}
    sweep: dict[str, list[Any]] = {}
    name: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string (or a list of them for ditctrl)")
        return value

    @field_validator("box")
    @classmethod
    def _box(cls, value):
        if value is not None and (len(value) != 4 or value[2] <= 0 or value[3] <= 0):
            raise ValueError("box is [x, y, w, h] with a positive width and height")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class RunConfig(BaseModel):
    """Defaults for every job (same keys as a job) plus run settings."""

    model_config = ConfigDict(extra="forbid")

    defaults: dict[str, Any] = {}
    seeds: list[int] | None = None
    device: str | None = None
    dtype: str | None = None
    metadata: bool = True


def method_config(name: str | None, options: dict):
    """The validated method config of ``name`` with ``options`` (pydantic over the config dataclass)."""
    if name is None:
        if options:
            raise AttnCtrlError("options given without a method")
        return None
    from pydantic import TypeAdapter

    from .. import methods

    cls = methods.get(name)
    own = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - own)
    if unknown:
        raise AttnCtrlError(f"unknown option {unknown[0]!r} for {cls.name}; its options are {', '.join(sorted(own))}")
    try:
        return TypeAdapter(cls).validate_python(dict(options))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if not where:  # a check of the config itself (its __post_init__)
            raise AttnCtrlError(str(err.get("ctx", {}).get("error", err["msg"]))) from None
        raise AttnCtrlError(f"option {where}: {err['msg']}") from None


def _read(path: Path) -> list[tuple[int, Any]]:
    """``[(line, raw job)]``; JSONL lines keep their line numbers, YAML/JSON lists their index + 1."""
    if not path.is_file():
        raise JobFileError(f"{path}: no such job file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JobFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".jsonl":
        rows = []
        errors = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{n}: invalid JSON ({e.msg})")
        if errors:
            raise JobFileError("\n".join(errors))
        return rows
    try:
        import yaml

        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except Exception as e:  # yaml and json raise their own error types
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise JobFileError(f"{path}: cannot parse ({str(e).splitlines()[0]}){where}") from None
    if isinstance(data, dict) and "jobs" in data:
        data = data["jobs"]
    if not isinstance(data, list):
        raise JobFileError(f"{path}: expected a list of jobs")
    return [(i + 1, job) for i, job in enumerate(data)]


def load_run_config(path: str | Path | None) -> RunConfig:
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise JobFileError(f"{path}: no such run config")
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return RunConfig.model_validate(data)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise JobFileError(f"{path}: cannot read the run config ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise JobFileError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except Exception as e:
        raise JobFileError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None


def load_jobs(path: str | Path, run: RunConfig | None = None) -> list[tuple[int, Job]]:
    """Read and validate every job (defaults of ``run`` applied); raises :class:`JobFileError` listing all errors."""
    path = Path(path)
    run = run or RunConfig()
    jobs, errors = [], []
    base = Path(path).parent
    for line, raw in _read(path):
        if not isinstance(raw, dict):
            errors.append(f"{path}:{line}: a job must be an object, got {type(raw).__name__}")
            continue
        merged = {**run.defaults, **raw}
        if run.defaults.get("options") and "options" in raw:
            merged["options"] = {**run.defaults["options"], **raw["options"]}
        try:
            job = Job.model_validate(merged)
        except ValidationError as e:
            for err in e.errors():
                field = ".".join(str(p) for p in err["loc"]) or "job"
                errors.append(f"{path}:{line}: {field}: {err['msg']}")
            continue
        try:
            options = dict(job.options)
            for key, values in job.sweep.items():
                if not values:
                    raise AttnCtrlError(f"sweep {key!r} has no values")
                for value in values:
                    method_config(job.method, {**options, key: value})
            method_config(job.method, options)
            _check_files(job, base)
        except AttnCtrlError as e:
            errors.append(f"{path}:{line}: {e}")
            continue
        jobs.append((line, job))
    if errors:
        raise JobFileError("\n".join(errors))
    if not jobs:
        raise JobFileError(f"{path}: no jobs")
    return jobs


def resolve(value: str, base: Path) -> str:
    """A path relative to the job file's folder (absolute paths and existing paths from the cwd stay)."""
    p = Path(value)
    if p.is_absolute() or p.exists():
        return str(p)
    return str(base / p)


def _check_files(job: Job, base: Path) -> None:
    paths = []
    for spec in job.references:
        image, _, rest = spec.partition(":")
        paths += [image, rest.partition(":")[0]]
    for spec in job.loras:
        paths.append(spec.partition(":")[0])
    for spec in job.subjects:
        body = spec.partition("=")[2].rpartition("@")[0] or spec.partition("=")[2]
        head = body.split(":", 1)[0]
        if Path(resolve(head, base)).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            paths.append(head)
    paths += [job.background, job.reference, job.reference_mask]
    for p in paths:
        if p and not Path(resolve(p, base)).is_file():
            raise AttnCtrlError(f"file {p} does not exist")


@dataclass
class Task:
    index: int  # position in the expansion
    job_index: int  # position of the job in the file (0-based)
    line: int
    seed: int
    variant: dict  # swept option values of this task
    variant_index: int
    job: Job


def expand(jobs: list[tuple[int, Job]], seeds: list[int] | None = None) -> list[Task]:
    """Jobs x seeds x swept values, deterministic (see the module docstring). ``seeds`` overrides job seeds."""
    tasks = []
    for j, (line, job) in enumerate(jobs):
        job_seeds = seeds if seeds is not None else (job.seeds or [0])
        keys = sorted(job.sweep)
        combos = list(itertools.product(*(job.sweep[k] for k in keys))) if keys else [()]
        for seed in job_seeds:
            for v, combo in enumerate(combos):
                tasks.append(Task(len(tasks), j, line, int(seed), dict(zip(keys, combo)), v, job))
    return tasks
