"""The house: the layers import-linter checks, no two modules importing each other, the engine
free of Prefect at run time too, and no private internals of torch, TensorBoard or Prefect."""

from __future__ import annotations

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


PRIVATE = re.compile(
    r"torch\._C\b|_engine_run_backward|_opt_called|log_on_run|_global_optimizer"
    r"|\b(torch|prefect|tensorboard)(\.\w+)*\._[a-z]\w*"
)


def test_no_private_internals_of_torch_tensorboard_or_prefect():
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for folder in ("tasks", "flows")
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert found == []
