"""The scanning package has no import cycles, and none hidden inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gateway" / "scanning"
MODULES = sorted(f"gateway.scanning.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(gateway module imported, whether at module level) for each import in ``tree``."""
    found = []
    top = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "gateway.scanning":
                names = [f"gateway.scanning.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [(name, id(node) in top) for name in names if name.startswith("gateway.")]
    return found


def test_no_function_level_imports_of_the_gateway() -> None:
    hidden = [(path.name, name) for path in PACKAGE.glob("*.py")
              for name, at_top in _imports(ast.parse(path.read_text())) if not at_top]
    assert hidden == []


def test_the_package_imports_form_no_cycle() -> None:
    graph = {f"gateway.scanning.{p.stem}": {name for name, _ in _imports(ast.parse(p.read_text()))
                                            if name.startswith("gateway.scanning.")}
             for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["gateway.scanning.engine"] == set()  # the bottom: everything else builds on it
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for dependency in graph.get(module, ()):
            visit(dependency, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module: str) -> None:
    """A fresh interpreter imports the module first: a cycle would fail here."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
