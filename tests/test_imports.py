"""The modules' imports: each fastcifar/ and export/ module imports alone, and imports go one way (no cycle,
counting the imports inside functions, which only hide one).

    pytest -q tests/test_imports.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGES = ("fastcifar", "export")


def module_names() -> list[str]:
    return sorted(f"{package}.{path.stem}" if path.stem != "__init__" else package
                  for package in PACKAGES for path in (REPO_ROOT / package).glob("*.py"))


def imported_modules(name: str, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its file (top level or in a function)."""
    path = REPO_ROOT / (name.replace(".", "/") + ("/__init__.py" if name in PACKAGES else ".py"))
    package = name if name in PACKAGES else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = absolute_module(node, package)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return (found & known) - {name}


def absolute_module(node: ast.ImportFrom, package: str) -> str:
    """The module `from ... import` names, relative ones (`from .recipe`, `from . import recipe`) made
    absolute against `package`, the package of the importing module."""
    if node.level == 0:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0]  # level 1: the package itself
    return f"{base}.{node.module}" if node.module else base


@pytest.mark.parametrize("source, package, module", [
    ("from .recipe import x", "fastcifar", "fastcifar.recipe"), ("from . import flops", "fastcifar", "fastcifar"),
    ("from ..export import onnx", "a.b", "a.export"), ("from os import path", "fastcifar", "os")])
def test_a_relative_import_counts_as_its_absolute_module(source, package, module):
    assert absolute_module(ast.parse(source).body[0], package) == module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node, [node]))), None)


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_go_one_way_even_inside_functions():
    """Sabotage caught: `from fastcifar.flops import per_image_flops`, or its relative form `from .flops import
    per_image_flops`, inside a function of fastcifar/model.py."""
    names = module_names()
    graph = {name: imported_modules(name, set(names)) for name in names}
    assert find_cycle(graph) is None


@pytest.mark.slow  # subprocesses
def test_each_module_imports_alone_in_a_fresh_interpreter():
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    before = set(sys.modules)\n"
              "    importlib.import_module(name)\n"
              "    for added in set(sys.modules) - before:\n"
              "        if added.split('.')[0] in ('fastcifar', 'export'):\n"
              "            del sys.modules[added]\n")
    result = subprocess.run([sys.executable, "-c", script, *module_names()], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
