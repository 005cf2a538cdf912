"""The package's import graph: no cycles, and layers that import only the layers below them.

Every import counts: at module level, inside functions (a lazy import is still a dependency), under
``if TYPE_CHECKING:`` (a module that names a type depends on where it lives), and the modules named
by strings: ``importlib.import_module("moesteer.x")`` and lazy ``"moesteer.x:attr"`` registry entries.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import moesteer

ROOT = Path(moesteer.__file__).parent
MODULE_STRING = re.compile(r"moesteer(?:\.\w+)+(?::[\w.]+)?")
LAYERS = {  # package -> what no module in it may import
    "moesteer.backends": ("moesteer.strategies", "moesteer.evals"),
    "moesteer.strategies": ("moesteer.evals", "moesteer.cli"),
}


def _sources() -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package is its ``__init__``)."""
    sources = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return sources


def _module_of(name: str, sources: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a module of the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in sources:
            return ".".join(parts[:end])
    return None


def _dependencies(module: str, tree: ast.AST, sources: dict[str, Path]) -> set[str]:
    package = module if sources[module].name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from moesteer.x import y` may import the module moesteer.x.y
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in sources else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            names.add(node.value.partition(":")[0])
    found = {_module_of(name, sources) for name in names if name == "moesteer" or name.startswith("moesteer.")}
    return found - {None, module}


def import_graph() -> dict[str, set[str]]:
    """moesteer module -> the moesteer modules it imports, in any of the ways the module docstring lists."""
    sources = _sources()
    return {name: _dependencies(name, ast.parse(path.read_text()), sources) for name, path in sources.items()}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_layers_import_only_downward(package):
    graph = import_graph()
    above = LAYERS[package]
    upward = sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if module == package or module.startswith(f"{package}.")
        for dep in deps
        if any(dep == a or dep.startswith(f"{a}.") for a in above)
    )
    assert not upward, f"{package} imports a layer above it: {'; '.join(upward)}"
