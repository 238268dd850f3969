"""The layering the tree promises (docs/ARCHITECTURE.md): Flower stays at the edge, the library never reaches up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedrag_app"
FLOWER_EDGE = {"client_app", "server_app", "records", "strategies"}  # entry points, record packing, server optimizers
ENTRY_POINTS = {"client_app", "server_app", "cli"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules() -> dict[str, set[str]]:
    return {p.stem: imports(p) for p in PACKAGE.glob("*.py")}


def test_only_the_edge_imports_flower():
    offenders = {name for name, deps in modules().items()
                 if any(d == "flwr" or d.startswith("flwr.") for d in deps) and name not in FLOWER_EDGE}
    assert not offenders, f"Flower imported outside the app edge: {sorted(offenders)}"


def test_library_modules_never_import_entry_points():
    for name, deps in modules().items():
        if name in ENTRY_POINTS:
            continue
        reached = {d.rsplit(".", 1)[-1] for d in deps if d.startswith("fedrag_app.")} & ENTRY_POINTS
        assert not reached, f"fedrag_app/{name}.py imports the entry point(s) {sorted(reached)}"


def test_modules_stay_small():
    for path in PACKAGE.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path.name} has {lines} lines: split it"
