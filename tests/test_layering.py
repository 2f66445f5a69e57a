"""The package's layers: which subpackage may import which, read from every module's imports (nested ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# a layer may import the shared top-level modules (errors, cli, durable, layout, ...) and the layers listed here
ALLOWED = {
    "model": set(),
    "data": set(),
    "loss": {"model", "data"},
    "evaluation": {"model", "data", "loss"},
    "train": {"model", "data", "loss", "evaluation"},
}
LAYERS = set(ALLOWED)


def imported_modules(path: Path) -> set[str]:
    """Every ncal_core / ncal_kernels module a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("ncal_core", "ncal_kernels")}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "ncal_core" and len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer):
    offending = []
    for path in sorted((REPO / "ncal_core" / layer).glob("*.py")):
        for module in imported_modules(path):
            other = layer_of(module)
            if other not in (None, layer) and other not in ALLOWED[layer]:
                offending.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offending, offending


def test_shared_top_level_modules_import_no_layer():
    # the commands (infer, analyze, export, serve) sit on top; every other top-level module is shared by the layers
    commands = ("infer", "analyze", "export", "serve")
    shared = [p for p in (REPO / "ncal_core").glob("*.py") if p.stem not in commands]
    assert len(shared) >= 6
    offending = [f"{p.name} imports {m}" for p in shared for m in imported_modules(p) if layer_of(m)]
    assert not offending, offending


def test_kernels_are_leaves():
    paths = sorted((REPO / "kernels").glob("*.py"))
    assert paths
    offending = [f"{p.name} imports {m}" for p in paths for m in imported_modules(p) if m.startswith("ncal_core")]
    assert not offending, offending


def test_the_checker_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ncal_core.train.loop import train\n")
    assert layer_of(next(iter(imported_modules(module)))) == "train"
