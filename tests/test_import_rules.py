"""The floors of the house, read from the source with ``ast`` (function-level imports included).

* ``attnctrl/kernels/`` is the ground floor: it imports nothing from attnctrl but other kernels and
  ``attnctrl.errors`` (the base error class, itself importing nothing from attnctrl);
* ``attnctrl/core/`` knows no method and no surface: nothing from the processors, pipelines, methods, run, models,
  distill, cli, ui or io.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnctrl"


def attnctrl_imports(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import of an ``attnctrl`` module in ``path`` (a file under ``root``);
    ``from X import name`` yields ``X.name`` too, since ``name`` may be a submodule (``from .. import methods``)."""
    package = path.relative_to(root).parts[:-1]  # the package a relative import starts from (also for __init__)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return [(line, m) for line, m in found if m == "attnctrl" or m.startswith("attnctrl.")]


def test_the_resolver_reads_relative_and_absolute_imports(tmp_path):
    source = tmp_path / "attnctrl" / "kernels" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("import torch\nfrom .attention import sdpa\nfrom ..core import errors\n"
                      "def f():\n    from .. import methods\n    import attnctrl.ui\n")
    modules = {m for _, m in attnctrl_imports(source, tmp_path)}
    assert {"attnctrl.kernels.attention", "attnctrl.core", "attnctrl.core.errors", "attnctrl.methods",
            "attnctrl.ui"} <= modules and not any(m.startswith("torch") for m in modules)


def _violations(folder: str, allowed) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for line, module in attnctrl_imports(path):
            if not allowed(module):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return bad


def test_kernels_import_nothing_from_attnctrl_outside_kernels():
    def allowed(module):
        return module.split(".")[1:2] in (["kernels"], ["errors"])

    assert list((PACKAGE / "kernels").glob("*.py")), "no kernels found"
    assert _violations("kernels", allowed) == []
    assert attnctrl_imports(PACKAGE / "errors.py") == []  # the one module kernels may import stands on nothing


@pytest.mark.parametrize("above", ["processors", "pipelines", "methods", "run", "models", "distill", "cli", "ui", "io"])
def test_core_imports_no_method_and_no_surface(above):
    assert _violations("core", lambda module: module.split(".")[1:2] != [above]) == []


#: surfaces stand on the run layer and import neither each other; io knows no surface and no run
SURFACES = {
    "cli": ("ui",),
    "ui": ("cli",),
    "run": ("cli", "ui"),
    "io": ("cli", "ui", "run"),
}


@pytest.mark.parametrize("layer", sorted(SURFACES))
def test_surfaces_import_neither_each_other(layer):
    assert _violations(layer, lambda module: module.split(".")[1:2] not in [[s] for s in SURFACES[layer]]) == []


def test_no_surface_names_a_method():
    """Everything cli/, ui/, io/ and run/ know of a method comes from its registry entry."""
    import re

    from attnctrl.methods import BUILTIN

    names = {e.name for e in BUILTIN} | {e.config.__name__ for e in BUILTIN} | {e.title for e in BUILTIN}
    names -= {"clear", "agent"}  # English words; their class names CLEAR / AgentAttention are checked
    pattern = re.compile("|".join(rf"\b{re.escape(n)}\b" for n in sorted(names)))
    for layer in SURFACES:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            found = pattern.findall(path.read_text(encoding="utf-8"))
            assert not found, f"{path.relative_to(PACKAGE)} names {sorted(set(found))}"

