"""Imports point down the layers only (see the package docstrings).

errors, version, closing and wire < kvm (bindings) < sev (interface, kernel platform) <
sevmodel (the SEV model) < vmm < migration < service < cli, demo. A module may import its own
layer and those below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import intrahost

ORDER = [
    "errors",
    "version",
    "closing",
    "wire",
    "kvm",
    "sev",
    "sevmodel",
    "vmm",
    "migration",
    "service",
    "cli",
    "demo",
]
ROOT = Path(intrahost.__file__).parent


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "intrahost" else None


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_imports_point_down_only() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mine = _layer(module)
        if mine not in ORDER:
            continue
        for name in _imports(path):
            theirs = _layer(name)
            if theirs in ORDER and ORDER.index(theirs) > ORDER.index(mine):
                upward.append(f"{module} imports {name}")
    assert upward == []


def test_every_module_has_a_layer() -> None:
    layers = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.name != "__pycache__"}
    assert layers - set(ORDER) == {"__init__", "__main__"}
