"""Command-line options of the methods, generated from their config dataclasses.

Every field of every registered method config becomes one ``--field-name`` option (shared by the methods that
have a field of that name, e.g. ``--layers``). Values are parsed with the field's type annotation through pydantic:
numbers, ``none``, comma-separated lists for tuple fields, or JSON for anything structured.
"""

from __future__ import annotations

import json
import typing
from dataclasses import fields

import click

from ..core.errors import AttnCtrlError
from ..methods import REGISTRY

__all__ = ["method_options", "build_method_config", "parse_field"]


def _method_fields() -> dict[str, list[tuple[type, object]]]:
    """option dest -> [(method class, dataclass field)] for every field of every registered method."""
    table: dict[str, list] = {}
    for cls in REGISTRY.values():
        for f in fields(cls):
            table.setdefault(f.name, []).append((cls, f))
    return table


def method_options(fn):
    """Decorator adding one option per method field (see the module docstring)."""
    for dest, owners in sorted(_method_fields().items(), reverse=True):
        names = ", ".join(cls.name for cls, _ in owners)
        help_text = next((f.metadata.get("help") for _, f in owners if f.metadata.get("help")), "")
        fn = click.option(
            f"--{dest.replace('_', '-')}", f"m_{dest}", default=None, metavar="VALUE",
            help=f"{help_text} [method: {names}]",
        )(fn)
    return fn


def parse_field(cls: type, name: str, raw: str):
    """Parse the command-line string ``raw`` for field ``name`` of method class ``cls``."""
    from pydantic import TypeAdapter, ValidationError

    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    listed = origin in (tuple, list) or any(typing.get_origin(a) in (tuple, list) for a in typing.get_args(hint))
    text = raw.strip()
    if text[:1] in "[{":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise AttnCtrlError(f"--{name.replace('_', '-')}: invalid JSON {raw!r} ({e.msg})") from None
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
        raise AttnCtrlError(f"--{name.replace('_', '-')}={raw!r} is not valid for {cls.name}: {msg}") from None


def build_method_config(method: str | None, kwargs: dict):
    """The method config for ``--method`` and its options (None when no method was chosen)."""
    from .. import methods

    given = {k[2:]: v for k, v in kwargs.items() if k.startswith("m_") and v is not None}
    if method is None:
        if given:
            owners = _method_fields()
            first = next(iter(given))
            names = ", ".join(cls.name for cls, _ in owners[first])
            raise AttnCtrlError(f"--{first.replace('_', '-')} is an option of {names}; add --method NAME")
        return None
    cls = methods.get(method)
    own = {f.name for f in fields(cls)}
    foreign = [k for k in given if k not in own]
    if foreign:
        valid = ", ".join("--" + n.replace("_", "-") for n in sorted(own))
        raise AttnCtrlError(
            f"--{foreign[0].replace('_', '-')} is not an option of {cls.name}; its options are {valid}"
        )
    try:
        return cls(**{k: parse_field(cls, k, v) for k, v in given.items()})
    except TypeError as e:
        raise AttnCtrlError(f"invalid options for {cls.name}: {e}") from None
