"""Job files for ``attnctrl batch``: reading, validation (all errors at once, with file:line and field) and the
deterministic expansion into tasks.

A job file is JSONL (one JSON object per line; blank lines and ``#`` comments are skipped) or a YAML/JSON list.
A job names a method (optional), a model (optional), a prompt (a list for a method that takes several), the
method's inputs (one key per input kind of :mod:`attnctrl.inputs`: ``references``, ``subjects``, ``loras``,
``composition``; objects with named fields, or the command-line shorthand strings), its ``options`` and any
generation setting; a run config (YAML/JSON) gives defaults for every job; command-line flags override both.
Each job is checked by the same :func:`attnctrl.run.validate` as a command-line request, for every swept value.

Option values to sweep go under ``sweep`` (``{"ratio": [0.3, 0.5]}``). The expansion order is: jobs in file order,
then seeds in the order given, then the cartesian product of the swept values (keys sorted).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ..core.errors import AttnCtrlError
from ..inputs import KINDS
from .request import Request, validate

__all__ = ["Job", "RunConfig", "Task", "JobFileError", "load_jobs", "load_run_config", "expand", "seeds_problem",
           "parse_seeds", "MAX_SEED"]

#: seeds are what ``torch.Generator.manual_seed`` and numpy take everywhere: 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1

_LEGACY_COMPOSITION = {"background": "background", "reference": "object", "reference_mask": "mask", "box": "box"}


class JobFileError(AttnCtrlError):
    """One or more invalid jobs; ``str()`` lists every problem with file:line and field."""


def seeds_problem(seeds: list) -> str | None:
    """What is wrong with a list of seeds (one sentence), or None. Booleans are not seeds."""
    if not seeds:
        return "give at least one seed or leave seeds out"
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            return f"seed {seed!r} is not an integer"
        if not 0 <= seed <= MAX_SEED:
            return f"seed {seed} is out of range: seeds are integers from 0 to {MAX_SEED} (2**32 - 1)"
    twice = [seed for seed, n in Counter(seeds).items() if n > 1]
    if twice:
        return f"seed {twice[0]} is given more than once; give each seed once (it would write the same output twice)"
    return None


def parse_seeds(text: str, what: str = "--seeds") -> list[int]:
    """Comma-separated seeds (``--seeds 1,2,3``); raises :class:`JobFileError` with one sentence."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise JobFileError(f"{what} {text!r}: give comma-separated integers") from None
    problem = seeds_problem(seeds)
    if problem:
        raise JobFileError(f"{what} {text!r}: {problem}")
    return seeds


def _check_seeds(value):
    if value is not None:
        problem = seeds_problem(value)
        if problem:
            raise ValueError(problem)
    return value


def _message(err: dict) -> str:
    """pydantic's message, saying why a boolean is refused where a number was expected."""
    if isinstance(err.get("input"), bool) and err.get("type") in ("int_type", "float_type"):
        return f"{str(err['input']).lower()} is a boolean, not a number"
    return err["msg"]


def _no_bool(value):
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


class _JobBase(BaseModel):
    """One job line. Unknown keys are errors (a typo never silently does nothing)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str]
    method: str | None = None
    model: str | None = None
    negative_prompt: str | None = None
    seeds: list[StrictInt] | None = None
    steps: StrictInt | None = Field(default=None, ge=1, le=1000)
    guidance: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    width: StrictInt | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    height: StrictInt | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    num_frames: StrictInt | None = Field(default=None, ge=1, le=1000)
    options: dict[str, Any] = {}
    sweep: dict[str, list[Any]] = {}
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data):
        """The first job format put a composition's parts at the top level; they are one ``composition`` now."""
        if isinstance(data, dict) and any(k in data for k in _LEGACY_COMPOSITION):
            data = dict(data)
            if "composition" in data:
                raise ValueError("give the composition once: background/reference/reference_mask/box are the old "
                                 "form of composition {background, object, mask, box}")
            data["composition"] = {new: data.pop(old) for old, new in _LEGACY_COMPOSITION.items() if old in data}
        return data

    _seeds = field_validator("seeds")(_check_seeds)
    _guidance_not_bool = field_validator("guidance", mode="before")(_no_bool)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string (or a list of them for a multi-prompt method)")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def inputs(self) -> dict:
        return {k: getattr(self, k) for k in KINDS if getattr(self, k)}

    def request(self, base: Path, seed: int = 0, variant: dict | None = None, **settings) -> Request:
        """The request this job makes for ``seed`` and one swept ``variant`` (paths relative to ``base``)."""
        return Request(prompts=self.prompts, model=self.model, method=self.method,
                       options={**self.options, **(variant or {})}, inputs=self.inputs(),
                       negative_prompt=self.negative_prompt, seed=seed, steps=self.steps, guidance=self.guidance,
                       width=self.width, height=self.height, num_frames=self.num_frames, base=base, **settings)


#: the job schema: the settings above plus one key per input kind (a list, or one object for a single input)
Job = create_model("Job", __base__=_JobBase, **{
    k: ((dict | str | None), None) if kind.single else (list[Any], []) for k, kind in KINDS.items()
})
Job.__doc__ = _JobBase.__doc__


class RunConfig(BaseModel):
    """Defaults for every job (same keys as a job) plus run settings."""

    model_config = ConfigDict(extra="forbid")

    defaults: dict[str, Any] = {}
    seeds: list[StrictInt] | None = None
    device: str | None = None
    dtype: str | None = None
    offload: str | None = None
    attention_backend: str | None = None
    metadata: bool = True

    _seeds = field_validator("seeds")(_check_seeds)


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
        raise JobFileError(f"{path}: {'.'.join(map(str, err['loc']))}: {_message(err)}") from None
    except Exception as e:
        raise JobFileError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None


def load_jobs(path: str | Path, run: RunConfig | None = None) -> list[tuple[int, Job]]:
    """Read and validate every job (defaults of ``run`` applied); raises :class:`JobFileError` listing all errors."""
    path = Path(path)
    run = run or RunConfig()
    jobs, errors = [], []
    base = path.resolve().parent
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
                errors.append(f"{path}:{line}: {field}: {_message(err)}")
            continue
        try:
            for key, values in job.sweep.items():
                if not values:
                    raise AttnCtrlError(f"sweep {key!r} has no values")
                for value in values:
                    validate(job.request(base, variant={key: value}), check_output=False)
            validate(job.request(base), check_output=False)
        except AttnCtrlError as e:
            errors.append(f"{path}:{line}: {e}")
            continue
        jobs.append((line, job))
    if errors:
        raise JobFileError("\n".join(errors))
    if not jobs:
        raise JobFileError(f"{path}: no jobs")
    return jobs


@dataclass
class Task:
    index: int  # position in the expansion
    job_index: int  # position of the job in the file (0-based)
    line: int
    seed: int
    variant: dict  # swept option values of this task
    variant_index: int
    job: Any  # a Job


def expand(jobs: list[tuple[int, Any]], seeds: list[int] | None = None) -> list[Task]:
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
