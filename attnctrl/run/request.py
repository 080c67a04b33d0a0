"""A request (model, method, options, inputs, prompts, seeds, sizes) and its one validation, before any model loads.

:func:`validate` turns a :class:`Request` into a :class:`Plan` or raises one :class:`~attnctrl.core.errors.
AttnCtrlError` sentence: the method and its options (the config's own checks), the inputs the method takes (each
read through its kind in :mod:`attnctrl.inputs`, files checked), inputs it does not take, prompts (non-empty UTF-8;
several only for a method that takes several), numbers (finite, in range, sizes multiples of 8, and of the
model's multiple and within its size limit where its configs tell them before it loads) and the output
folder (writable). Checks that need the loaded model (the family, a word of the prompt, a LoRA's keys) run in
:func:`attnctrl.run.generate` before the first generation.
"""

from __future__ import annotations

import json
import math
import tempfile
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from ..core.controller import Method
from ..core.errors import AttnCtrlError, InputError
from ..inputs import KINDS, check_text
from ..methods import MethodEntry, entry

__all__ = ["Request", "Plan", "validate", "method_config", "parse_option", "writable_folder", "MAX_SEED",
           "read_stored", "read_record", "from_record", "check_runtime", "check_size", "MAX_SIZE_FACTOR"]

#: a size may be this many times the model's native size per side (beyond, the attention alone exhausts memory)
MAX_SIZE_FACTOR = 4

#: seeds are 0 .. 2**32 - 1 (the range of NumPy's and A1111's seeds; a larger one is refused, not wrapped)
MAX_SEED = 2**32 - 1


@dataclass
class Request:
    """What to generate. ``method`` is a registered name (or None: plain generation); ``options`` its options (a
    dict, or the config itself); ``inputs`` maps an input kind (``"references"``, ...) to a list of records, job-file
    objects or shorthand strings (paths relative to ``base``); ``plugins`` are further ``(name, options)`` plugin
    methods applied beside it (the speed-ups)."""

    prompts: tuple[str, ...] | list[str] | str
    model: str | None = None
    method: str | None = None
    options: dict | Method = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    plugins: tuple = ()
    negative_prompt: str | None = None
    seed: int = 0
    num_images: int = 1
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    output: Path = Path("outputs")
    device: str = "auto"
    dtype: str = "auto"
    offload: str | None = None
    attention_backend: str | None = None
    metadata: bool = True
    gif: bool = False
    base: Path | None = None


@dataclass
class Plan:
    """A validated request: the method's entry and config, its inputs as records, the plugin configs."""

    request: Request
    prompts: list[str]
    entry: MethodEntry | None
    config: Method | None
    inputs: dict[str, list]
    plugins: list[Method]

    @property
    def method(self) -> str | None:
        return self.entry.name if self.entry is not None else None


def parse_option(cls: type, name: str, raw: str):
    """The command-line text ``raw`` of option ``name`` of config ``cls``, typed by the field's annotation:
    numbers, ``none``, comma-separated lists, or JSON for anything structured."""
    from pydantic import TypeAdapter, ValidationError

    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    listed = origin in (tuple, list) or any(typing.get_origin(a) in (tuple, list) for a in typing.get_args(hint))
    text = raw.strip()
    if text[:1] in "[{":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise AttnCtrlError(f"option {name}: invalid JSON {raw!r} ({e.msg})") from None
    elif text.lower() in ("none", "null"):
        value = None
    elif origin in (tuple, list) or (listed and "," in text):  # "3,2" for "one number or one per reference"
        value = [part.strip() for part in text.split(",") if part.strip()]
    else:
        value = text
    if hint is object:
        return value
    try:
        return TypeAdapter(hint).validate_python(value)
    except ValidationError as e:
        msg = e.errors()[0]["msg"]
        raise AttnCtrlError(f"option {name}={raw!r} is not valid for {cls.name}: {msg}") from None


def method_config(name: str, options: dict | Method | None = None) -> Method:
    """The validated config of method ``name`` (pydantic over its dataclass: the same types and checks as the
    Python API); an option the method does not have is an error naming its options."""
    from pydantic import TypeAdapter, ValidationError

    cls = entry(name).config
    if isinstance(options, Method):
        if not isinstance(options, cls):
            raise AttnCtrlError(f"options of {name} must be a {cls.__name__}, not a {type(options).__name__}")
        return options
    options = dict(options or {})
    own = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - own)
    if unknown:
        raise AttnCtrlError(f"{cls.name} has no option {unknown[0]!r}; its options are {', '.join(sorted(own))}")
    try:
        return TypeAdapter(cls).validate_python(options)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if not where:  # a check of the config itself (its __post_init__)
            raise AttnCtrlError(str(err.get("ctx", {}).get("error", err["msg"]))) from None
        raise AttnCtrlError(f"{cls.name} option {where}: {err['msg']}") from None
    except TypeError as e:
        raise AttnCtrlError(f"invalid options for {cls.name}: {e}") from None


def writable_folder(folder: Path) -> Path:
    """Create ``folder`` and check that files can be written there (before any generation), else a clear error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise AttnCtrlError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None
    return folder


def _number(value, name: str, kind=int, minimum=None, maximum=None, multiple=None):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AttnCtrlError(f"{name} must be a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise AttnCtrlError(f"{name} must be a whole number, got {value!r}")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise AttnCtrlError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise AttnCtrlError(f"{name} must be at most {maximum}, got {value}")
    if multiple and value % multiple:
        raise AttnCtrlError(f"{name} must be a multiple of {multiple}, got {value}")
    return value


def validate(request: Request, check_output: bool = True) -> Plan:
    """Every check that needs no model (see the module docstring); returns the :class:`Plan`."""
    prompts = [request.prompts] if isinstance(request.prompts, str) else list(request.prompts)
    if not prompts:
        raise AttnCtrlError("give a prompt: write what to draw")
    for i, p in enumerate(prompts):
        label = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if not check_text(p, label).strip():
            raise AttnCtrlError(f"{label} is empty: write what to draw")
    if request.negative_prompt:
        check_text(request.negative_prompt, "the negative prompt")
    r = request
    _number(r.seed, "the seed", int, 0, MAX_SEED)
    _number(r.num_images, "the number of images", int, 1, 10000)
    if r.seed + r.num_images - 1 > MAX_SEED:
        raise AttnCtrlError(f"seeds run from the seed up to seed + number of images - 1, which must be at most "
                            f"{MAX_SEED}; got {r.seed} + {r.num_images - 1}")
    _number(r.steps, "steps", int, 1, 1000)
    _number(r.guidance, "guidance", float, 0)
    _number(r.width, "width", int, 8, 8192, 8)
    _number(r.height, "height", int, 8, 8192, 8)
    _number(r.num_frames, "frames", int, 1, 1000)

    check_runtime(r.device, r.dtype, r.offload, r.attention_backend)
    from ..models import check_model

    check_model(r.model)  # the model reference resolves (not loaded): a bad one fails before any work
    from ..models import size_rule

    rule = size_rule(r.model)  # read from the model's configs: a size it cannot take fails before it loads
    if rule is not None:
        check_size(r.width, r.height, *rule)
    method = entry(r.method) if r.method is not None else None
    config = method_config(method.name, r.options) if method is not None else None
    if method is None and r.options:
        raise AttnCtrlError("method options given without a method: add the method's name")
    given = {k: v for k, v in (r.inputs or {}).items() if v}
    for key in given:
        if key not in KINDS:
            raise AttnCtrlError(f"unknown input {key!r}; inputs are {', '.join(KINDS)}")
    wanted = set(method.inputs) if method is not None else set()
    stray = [k for k in given if k not in wanted]
    if stray:
        raise InputError(f"{method.name if method else 'plain generation'} takes no {stray[0]}", stray[0])
    inputs = {}
    for key in sorted(wanted):
        kind = KINDS[key]
        values = given.get(key) or []
        if not isinstance(values, (list, tuple)):
            values = [values]
        if not values:
            raise InputError(f"{method.name} needs {key}: give {'one' if kind.single else 'at least one'}", key)
        if kind.single and len(values) != 1:
            raise AttnCtrlError(f"{method.name} takes one {key}, got {len(values)}")
        inputs[key] = [kind.read(v, i, r.base) for i, v in enumerate(values)]
    many = method is not None and method.prompts == "many"
    if len(prompts) > 1 and not many:
        takers = [e.name for e in _entries() if e.prompts == "many"]
        raise AttnCtrlError(f"several prompts are for {', '.join(takers) or 'no method'}; "
                            f"{method.name if method else 'plain generation'} takes one")
    if many and len(prompts) < 2:
        raise AttnCtrlError(f"{method.name} needs at least two prompts, one per segment")
    if method is not None and method.check is not None:
        method.check(config, prompts, inputs)
    plugins = []
    for item in r.plugins:
        name, options = (item.name, item) if isinstance(item, Method) else item
        plugin = entry(name)
        if plugin.pipeline is not None:
            raise AttnCtrlError(f"{plugin.name} needs its pipeline; it cannot be applied beside another method")
        plugins.append(method_config(plugin.name, options))
    if check_output:
        r.output = Path(r.output)
    return Plan(request=r, prompts=prompts, entry=method, config=config, inputs=inputs, plugins=plugins)


def check_size(width, height, native: int | None, multiple: int | None) -> None:
    """Each given side is at most :data:`MAX_SIZE_FACTOR` times the model's ``native`` side and a multiple of what
    the model needs (its VAE's downsampling times its patch), else an error naming the side."""
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if native and value > MAX_SIZE_FACTOR * native:
            raise AttnCtrlError(f"{name} {value} is more than {MAX_SIZE_FACTOR} times this model's native {native} px "
                                f"(at most {MAX_SIZE_FACTOR * native}): the attention would exhaust memory; generate "
                                f"smaller")
        if multiple and value % multiple:
            near = max(multiple, round(value / multiple) * multiple)
            raise AttnCtrlError(f"{name} {value} is not a multiple of {multiple}, which this model needs; try {near}")


def read_stored(path) -> dict:
    """Everything an output stores: a PNG's metadata chunks (``attnctrl``, A1111's ``parameters``), or the object
    of a JSON record / batch sidecar."""
    from ..io import read_png_metadata

    p = Path(path)
    if not p.is_file():
        raise AttnCtrlError(f"{path}: no such file")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AttnCtrlError(f"{path}: not a JSON record ({e.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise AttnCtrlError(f"{path}: not a JSON record (it holds a {type(data).__name__}, not an object)")
        return data
    try:
        data = read_png_metadata(p)
    except Exception as e:  # PIL raises several types for files that are not PNGs
        raise AttnCtrlError(f"{path}: not a PNG with stored settings ({type(e).__name__})") from None
    if not data.get("attnctrl") and not data.get("parameters"):
        raise AttnCtrlError(f"{path}: no settings are stored in this file (written with --no-metadata?)")
    return data


def read_record(path) -> dict:
    """The settings record stored with an output: a PNG's ``attnctrl`` chunk, a video's JSON record or a batch
    sidecar's ``record``."""
    data = read_stored(path)
    record = data.get("record", data) if Path(path).suffix.lower() == ".json" else data.get("attnctrl")
    if not isinstance(record, dict) or "prompt" not in record:
        raise AttnCtrlError(f"{path}: it holds no attnctrl settings (written with --no-metadata, or by another tool)")
    return record


def from_record(record: dict, base: Path | None = None, **overrides) -> Request:
    """The request that makes an output again from its settings record (:func:`read_record`); ``overrides`` (any
    :class:`Request` field) replace recorded values. Same seed, settings, model and dtype: the same bytes."""
    dtype = record.get("dtype")
    plugins = tuple((p["method"], p.get("options") or {}) for p in record.get("plugins") or ())
    fields_ = dict(
        prompts=record["prompt"], model=record.get("model"), method=record.get("method"),
        options=record.get("method_options") or {}, inputs=record.get("inputs") or {}, plugins=plugins,
        negative_prompt=record.get("negative_prompt") or None, seed=record.get("seed", 0),
        steps=record.get("steps"), guidance=record.get("guidance_scale"), width=record.get("width"),
        height=record.get("height"), num_frames=record.get("num_frames"),
        dtype={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, "auto"), base=base,
    )
    fields_.update({k: v for k, v in overrides.items() if v is not None})
    return Request(**fields_)


def check_runtime(device, dtype, offload=None, attention_backend=None) -> None:
    """The device exists here, the dtype is one attnctrl knows, offload and the attention backend can run there (the
    model's own checks come with the load)."""
    from ..models import check_attention_backend, check_offload, parse_dtype, resolve_device

    target = resolve_device(device)
    parse_dtype(dtype, target)
    check_offload(offload, target)
    check_attention_backend(attention_backend, target)


def _entries():
    from ..methods import entries

    return entries()


def plain(value):
    """A config or record as JSON-ready data (paths as text)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
