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
    ["bridges"],
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


# Loading code by file path hides a dependency from the layering rules above (and makes the library need a folder
# that is not part of the package at run time): deploy/follow_run.py was once loaded so. Imports go by module name.
PATH_LOADERS = {"spec_from_file_location", "SourceFileLoader", "SourcelessFileLoader", "run_path", "load_source"}
SYS_PATH_EDITS = {"insert", "append", "extend"}


def path_imports(path: Path, source: str | None = None) -> list[str]:
    """Calls in a module that load code by file path or put a folder on sys.path (`sys.path.insert(...)`,
    `sys.path += [...]`, `importlib.util.spec_from_file_location(...)`, `runpy.run_path(...)`, ...)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        target = None
        if isinstance(node, ast.Call):
            target = node.func
        elif isinstance(node, ast.AugAssign):
            target = node.target
        dotted = ast.unparse(target) if target is not None else ""
        name = dotted.rsplit(".", 1)[-1]
        edits_sys_path = dotted == "sys.path" or (dotted.startswith("sys.path.") and name in SYS_PATH_EDITS)
        if name in PATH_LOADERS or edits_sys_path:
            out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {dotted}")
    return out


def test_no_module_imports_by_file_path():
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in path_imports(p)]
    assert not offenders, f"code loaded by file path, out of the layering rules' sight: {offenders}"


def test_the_rule_catches_imports_by_file_path():
    """The check can fail: the shapes a by-path import takes, and an ordinary import that is not one."""
    here = PACKAGE / "federation" / "ask.py"
    by_path = [
        "import importlib.util\nspec = importlib.util.spec_from_file_location('follow_run', 'deploy/follow_run.py')",
        "from importlib.util import spec_from_file_location\nspec_from_file_location('m', 'x.py')",
        "import sys\nsys.path.insert(0, 'deploy')\nimport follow_run",
        "import sys\nsys.path.append('deploy')",
        "import sys\nsys.path += ['deploy']",
        "import runpy\nrunpy.run_path('deploy/follow_run.py')",
        "from importlib.machinery import SourceFileLoader\nSourceFileLoader('m', 'x.py').load_module()",
    ]
    for source in by_path:
        assert path_imports(here, source), source
    by_name = (
        "import importlib\nimportlib.import_module('fedrag_app.federation.follow_run')\nimport sys\nprint(sys.path)"
    )
    assert not path_imports(here, by_name)
