"""The house: the layers import-linter checks, no two modules importing each other, the engine
free of Prefect at run time too, and no private internals of torch, TensorBoard or Prefect."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import grimp
import pytest

from .conftest import REPO

PACKAGES = ("trainflow.tasks", "trainflow.flows")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_two_modules_import_each_other():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="a")
    graph.add_import(importer="b", imported="c")
    assert _cycles(graph) == [["a", "b"]]


def test_the_import_contracts_hold_and_ci_checks_them():
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "lint-imports")]
        if (REPO / ".venv" / "bin" / "lint-imports").exists()
        else [sys.executable, "-m", "importlinter.cli"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"Contracts: \d+ kept, 0 broken\.", done.stdout), done.stdout[-2000:]
    assert "lint-imports" in (REPO / ".ci" / "run").read_text()


@pytest.mark.system  # a fresh interpreter: what importing the engine loads, and nothing else
def test_the_training_engine_loads_no_prefect():
    script = (
        "import sys, trainflow.tasks.engine.fit, trainflow.tasks.engine.launch\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# Attributes a module may read with a leading underscore: documented, public APIs all the same.
DOCUMENTED = {("os", "_exit")}
LIBRARIES = {"torch", "tensorboard", "prefect"}


def _private_uses(source: str, libraries: set[str] = LIBRARIES) -> list[tuple[int, str]]:
    """Every `x._name` whose `x` is not the object's own (`self`, `cls`), and every import of
    an underscore name or module from `libraries` (torch, TensorBoard and Prefect)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            dunder = node.attr.startswith("__") and node.attr.endswith("__")
            if not dunder and owner not in ("self", "cls") and (owner, node.attr) not in DOCUMENTED:
                found.append((node.lineno, f"{owner or '…'}.{node.attr}"))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in libraries:
            parts = [*node.module.split("."), *(alias.name for alias in node.names)]
            if any(part.startswith("_") for part in parts):
                found.append((node.lineno, f"from {node.module} import …"))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr"):
            name = node.args[1] if len(node.args) > 1 else None
            text = str(name.value) if isinstance(name, ast.Constant) else ""
            if text.startswith("_") and not text.startswith("__"):
                found.append((node.lineno, f"{node.func.id}(…, {text!r})"))
    return found


def test_the_private_use_finder_finds_them():
    # Parsed, never run: each shape of private use, in a made-up library.
    source = (
        "import os\nfrom somelib.sub import _hidden\nx = somelib.sub._inner\n"
        "opt._flag = True\ngetattr(graph, '_run')\nself._own = 1\nos._exit(0)\n"
    )
    assert [line for line, _ in _private_uses(source, {"somelib"})] == [2, 3, 4, 5]


def test_no_private_internals_of_torch_tensorboard_or_prefect():
    found = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for folder in ("tasks", "flows")
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, what in _private_uses(path.read_text())
    ]
    assert found == []
