"""The command line's method options and inputs, derived from the registry (:mod:`attnctrl.methods`).

* A method's options live in their own namespace: ``--method NAME --opt KEY=VALUE`` (repeatable). Values are typed
  by the config field (:func:`attnctrl.run.parse_option`); an option the method does not have is an error.
* Each input kind of :mod:`attnctrl.inputs` is one flag (``--ref``, ``--subject``, ``--lora``, ``--composition``).
* ``attnctrl generate --method NAME --help`` adds the method's inputs and options (with defaults) to the help.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, fields

import click

from ..core.errors import AttnCtrlError

__all__ = ["MethodCommand", "method_inputs", "given_inputs", "method_options", "method_help", "input_flags"]


def _kinds():
    from ..inputs import KINDS

    return KINDS


def method_inputs(fn):
    """Decorator adding one option per input kind."""
    for key, kind in reversed(list(_kinds().items())):
        fn = click.option(kind.flag, f"input_{key}", multiple=True, metavar=kind.metavar,
                          help=f"{kind.help} [methods: {', '.join(_takers(key)) or '-'}]")(fn)
    return fn


def _takers(key: str) -> list[str]:
    from ..methods import entries

    return [e.name for e in entries() if key in e.inputs]


def input_flags(fn):
    """Decorator: an error about a method's input (the run layer names the input in words) also names its flag."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..core.errors import InputError

        try:
            return fn(*args, **kwargs)
        except InputError as e:
            kind = _kinds()[e.input]
            raise AttnCtrlError(f"{e} ({kind.flag} {kind.metavar})") from None

    return wrapper


def given_inputs(values: dict) -> dict:
    """``{kind key: [shorthand, ...]}`` of the input flags that were given."""
    out = {}
    for name, value in values.items():
        key = name.removeprefix("input_")
        if value:
            out[key] = list(value) if isinstance(value, (list, tuple)) else [value]
    return out


def method_options(method: str | None, opts) -> dict:
    """``{option: typed value}`` from ``--opt KEY=VALUE`` items of ``method``."""
    from ..methods import entry
    from ..run import parse_option

    if not opts:
        return {}
    if method is None:
        raise AttnCtrlError("--opt sets an option of a method: add --method NAME")
    cls = entry(method).config
    own = {f.name for f in fields(cls)}
    options = {}
    for item in opts:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise AttnCtrlError(f"--opt {item!r}: give KEY=VALUE, e.g. --opt {sorted(own)[0]}=...")
        if key not in own:
            raise AttnCtrlError(f"{cls.name} has no option {key!r}; its options are {', '.join(sorted(own))} "
                                f"(attnctrl generate --method {cls.name} --help)")
        options[key] = parse_option(cls, key, value)
    return options


def _default(f) -> str:
    if f.default is not MISSING:
        return repr(f.default)
    if f.default_factory is not MISSING:
        return repr(f.default_factory())
    return "required"


def method_help(name: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Help sections of one method: its inputs and its options (``--opt``) with defaults."""
    from ..core.families import FAMILIES
    from ..inputs import KINDS
    from ..methods import entry

    e = entry(name)
    families = ", ".join(FAMILIES[f].title if f in FAMILIES else f for f in e.families)
    about = [(e.title, e.summary), ("families", families), ("makes", "video" if e.video else "images"),
             ("prompts", "several (-p per segment)" if e.prompts == "many" else "one")]
    inputs = [(f"{KINDS[k].flag} {KINDS[k].metavar}", KINDS[k].help) for k in e.inputs]
    options = [(f"--opt {f.name}=VALUE", f"{f.metadata.get('help', '')} [default: {_default(f)}]")
               for f in fields(e.config)]
    sections = [(f"Method {e.name}", about)]
    if inputs:
        sections.append(("Inputs (required)", inputs))
    sections.append(("Options of " + e.name, options))
    return sections


class MethodCommand(click.Command):
    """``generate``: ``--method NAME --help`` shows that method's inputs and options; a method option given as its
    own flag (the first command line's form) gets a one-line hint to ``--opt``."""

    def parse_args(self, ctx, args):
        ctx.meta["attnctrl.method"] = _method_arg(args)
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            hint = _old_flag_hint(e.option_name)
            if hint:
                raise click.UsageError(f"No such option: {e.option_name}; {hint}", ctx) from None
            raise

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        from ..methods import entries

        name = ctx.meta.get("attnctrl.method")
        if name:
            try:
                sections = method_help(name)
            except AttnCtrlError as e:
                formatter.write_paragraph()
                formatter.write_text(str(e))
                return
            for title, rows in sections:
                with formatter.section(title):
                    formatter.write_dl(rows)
        else:
            with formatter.section("Methods (--method NAME --help for one's inputs and options)"):
                formatter.write_dl([(e.name, e.summary) for e in entries()])


def _method_arg(args) -> str | None:
    for i, a in enumerate(args):
        if a == "--method" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


def _old_flag_hint(option: str) -> str | None:
    from ..methods import entries

    name = option.lstrip("-").replace("-", "_")
    owners = [e.name for e in entries() if name in {f.name for f in fields(e.config)}]
    if owners:
        return f"method options are given as --opt {name}=VALUE (an option of {', '.join(owners)})"
    if name in ("background", "reference", "reference_mask", "box"):
        return "a composition is one --composition BACKGROUND:OBJECT[:MASK]@X,Y,W,H"
    return None
