"""The house rules, checked on the source: surfaces stand on the run layer and import neither each other, and
nothing in cli/, ui/, io/ or run/ names a method (everything they know of one comes from its registry entry)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnctrl"


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


FORBIDDEN = {
    "cli": ("attnctrl.ui",),
    "ui": ("attnctrl.cli",),
    "run": ("attnctrl.cli", "attnctrl.ui"),
    "io": ("attnctrl.cli", "attnctrl.ui", "attnctrl.run"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_surfaces_import_neither_each_other(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(FORBIDDEN[layer])]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_no_surface_names_a_method():
    from attnctrl.methods import BUILTIN

    names = {e.name for e in BUILTIN} | {e.config.__name__ for e in BUILTIN} | {e.title for e in BUILTIN}
    names -= {"clear", "agent"}  # English words; their class names CLEAR / AgentAttention are checked
    pattern = re.compile("|".join(rf"\b{re.escape(n)}\b" for n in sorted(names)))
    for layer in FORBIDDEN:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            found = pattern.findall(path.read_text(encoding="utf-8"))
            assert not found, f"{path.relative_to(PACKAGE)} names {sorted(set(found))}"
