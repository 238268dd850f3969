"""The layering the tree promises (docs/ARCHITECTURE.md): each folder imports only from folders below it, Flower stays
in flower/, and nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedrag_app"
# Bottom to top. A module may import its own folder and the folders listed before it, never one after it; the two
# folders of one layer (training, evaluation) never import each other.
LAYERS = [
    ["core"],
    ["config"],
    ["data"],
    ["rag"],
    ["training", "evaluation"],
    ["federation"],
    ["flower"],
    ["commands"],
    ["cli"],
]
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def folder(path: Path) -> str:
    """The layer folder of a module (cli.py is a layer of its own; __init__.py at the top belongs to none)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def modules() -> dict[Path, set[str]]:
    return {p: imports(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}


def test_every_module_sits_in_a_layer_folder():
    assert {folder(p) for p in modules()} <= set(RANK), "a module outside the layer folders: add it to LAYERS"


def upward_imports(mods: dict[Path, set[str]]) -> list[str]:
    out = []
    for path, deps in mods.items():
        here = folder(path)
        for dep in deps:
            there = dep.split(".")[1] if dep.startswith("fedrag_app.") else None
            if there in RANK and there != here and RANK[there] >= RANK[here]:
                out.append(f"{path.relative_to(PACKAGE.parent)} ({here}) imports {dep}")
    return out


def test_imports_go_down_the_layers_only():
    assert not upward_imports(modules())


def test_only_the_flower_folder_imports_flower():
    offenders = sorted(
        str(p.relative_to(PACKAGE.parent))
        for p, deps in modules().items()
        if folder(p) != "flower" and any(d == "flwr" or d.startswith("flwr.") for d in deps)
    )
    assert not offenders, f"Flower imported outside fedrag_app/flower/: {offenders}"


def test_the_rule_catches_upward_and_sideways_imports():
    """The check can fail: training reaching the Flower edge, or evaluation reaching into training."""
    fake = {
        PACKAGE / "training" / "ralt.py": {"fedrag_app.flower.records"},
        PACKAGE / "evaluation" / "evaluate.py": {"fedrag_app.training.ralt"},
        PACKAGE / "rag" / "pipeline.py": {"fedrag_app.core.errors", "fedrag_app.rag.retrieval"},
    }
    assert len(upward_imports(fake)) == 2
