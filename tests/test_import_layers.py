"""The import graph, read from the source with ``ast`` (nothing is imported).

Engine rules: ``fastvideo`` imports none of the service packages, at any level; and its
modules, and its sub-packages, import one another without a cycle. Module-level imports
(those under ``if TYPE_CHECKING:`` or ``try:`` included) must form no cycle. Imports inside
functions must not close one either, except those in ``DEFERRED``: a function-level import
that only breaks a cycle hides it. Importing ``a.b.c`` runs ``a/__init__.py`` and
``a/b/__init__.py`` first, so an import is an edge to the module and to each package above
it (not to the importer's own packages, which are already being imported).

To add layers: a row in ``LAYERS`` (a package and the top-level packages it must not import),
and ``import_graph`` of the packages whose cycles to check.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: package -> the top-level packages it must never import (at any level, even in functions).
LAYERS: dict[str, set[str]] = {
    # engine <- core <- API/scheduler and worker <- tools (ARCHITECTURE.md's layering).
    "fastvideo": {"scheduler", "worker", "fvb_core", "fvb_tools"},
    "fvb_core": {"scheduler", "worker", "fvb_tools", "fastvideo"},
    "scheduler": {"worker", "fvb_tools", "fastvideo"},
    "worker": {"scheduler", "fvb_tools"},
}


#: Function-level imports (importer, imported) allowed to close a cycle, each with why.
#: Empty: every function-level import in the engine is kept to defer a heavy import (see
#: ``test_the_engine_defers_only_heavy_imports``), none of them closes a cycle.
DEFERRED: dict[tuple[str, str], str] = {}

#: The engine's function-level imports, each with why it is not at the top of its module.
ENGINE_FUNCTION_IMPORTS: dict[tuple[str, str], str] = {
    ("fastvideo", "fastvideo.entrypoints.video_generator"): (
        "lazy `from fastvideo import VideoGenerator`: `import fastvideo.layers` (or any "
        "engine module) pulls in no diffusers/transformers"
    ),
    ("fastvideo.entrypoints.cli", "fastvideo.entrypoints.video_generator"): (
        "`fastvideo --help` and `--version` need no diffusers"
    ),
    ("fastvideo.layers.fused_ops", "fastvideo.layers.triton_kernels"): (
        "triton is optional: imported only when it is installed"
    ),
}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # the module (or package) imported, or the top-level name of another one
    line: int
    in_function: bool


@dataclass
class ImportGraph:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)

    def edges(self, in_functions: bool = False) -> dict[str, set[str]]:
        """importer -> modules it imports (and their packages), among ``modules``."""
        graph: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if imp.imported not in self.modules or (imp.in_function and not in_functions):
                continue
            if imp.in_function and (imp.importer, imp.imported) in DEFERRED:
                continue
            parts = imp.imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                own_package = imp.importer.startswith(target + ".")
                if target in self.modules and target != imp.importer and not own_package:
                    graph[imp.importer].add(target)
        return graph


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list:
    """The dotted names an import statement reaches: ``X.y`` for ``from X import y`` (a
    submodule, or a name in ``X``: ``import_graph`` resolves it to the nearest module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" for alias in node.names]


def _imports_of(tree: ast.AST, module: str, is_package: bool) -> Iterable[tuple[str, int, bool]]:
    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if isinstance(child, ast.Import | ast.ImportFrom):
                for name in _imported_names(child, module, is_package):
                    yield name, child.lineno, inside
            yield from walk(child, inside)

    yield from walk(tree, False)


def import_graph(packages: Iterable[str], root: Path = ROOT) -> ImportGraph:
    """Every import statement of every module of ``packages`` (top-level package names)."""
    graph = ImportGraph()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            graph.modules[module_name(path, root)] = path
    for module, path in graph.modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line, in_function in _imports_of(tree, module, path.name == "__init__.py"):
            # The module itself when it is one of ours, else the nearest package that is,
            # else the name as written (another distribution's).
            target = name
            while target and target not in graph.modules and "." in target:
                target = target.rpartition(".")[0]
            if target not in graph.modules:
                target = name
            if target != module:
                graph.imports.append(Import(module, target, line, in_function))
    return graph


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def collapse(edges: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    """The same graph between packages ``depth`` names deep (``fastvideo.attention``, ...):
    two sub-packages that import each other form a cycle even when no two modules do."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:depth])

    graph: dict[str, set[str]] = {}
    for importer, imported in edges.items():
        graph.setdefault(package(importer), set())
        for target in imported:
            if package(target) != package(importer):
                graph[package(importer)].add(package(target))
    return graph


def describe(component: list[str], graph: ImportGraph, in_functions: bool) -> str:
    members = set(component)
    lines = [
        f"  {imp.importer} -> {imp.imported} (line {imp.line}"
        + (", in a function)" if imp.in_function else ")")
        for imp in graph.imports
        if imp.importer in members
        and any(imp.imported == m or m.startswith(imp.imported + ".") for m in members)
        and (in_functions or not imp.in_function)
    ]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(sorted(set(lines)))


def forbidden_imports(graph: ImportGraph, layers: dict[str, set[str]] = LAYERS) -> list[str]:
    found = []
    for imp in graph.imports:
        for package, forbidden in layers.items():
            inside = imp.importer == package or imp.importer.startswith(package + ".")
            if inside and imp.imported.split(".")[0] in forbidden:
                found.append(f"{graph.modules[imp.importer]}:{imp.line}: imports {imp.imported}")
    return found


ENGINE = import_graph(["fastvideo"])


def test_the_engine_imports_no_service_package():
    assert forbidden_imports(ENGINE) == []


def test_the_engine_has_no_module_level_import_cycle():
    found = cycles(ENGINE.edges())
    assert not found, "\n".join(describe(c, ENGINE, in_functions=False) for c in found)


def test_the_engine_sub_packages_import_one_another_without_a_cycle():
    """E.g. ``entrypoints`` uses ``executor``, so ``executor`` (the ranks) must not import
    ``entrypoints``: what both need lives below them (``pipelines.runner``)."""
    for in_functions in (False, True):
        found = cycles(collapse(ENGINE.edges(in_functions), depth=2))
        assert not found, f"sub-package cycles (in functions too: {in_functions}): {found}"


def test_no_function_level_import_hides_a_cycle():
    found = cycles(ENGINE.edges(in_functions=True))
    assert not found, "\n".join(describe(c, ENGINE, in_functions=True) for c in found)


def test_the_engine_defers_only_heavy_imports():
    """A new function-level import of an engine module needs a reason in
    ``ENGINE_FUNCTION_IMPORTS`` (deferring diffusers, transformers, triton...); to break a
    cycle, move code instead."""
    deferred = {
        (imp.importer, imp.imported)
        for imp in ENGINE.imports
        if imp.in_function and imp.imported in ENGINE.modules
    }
    assert deferred == set(ENGINE_FUNCTION_IMPORTS)


def test_the_graph_sees_imports_of_every_form(tmp_path):
    """The builder itself: relative and absolute, module and package, in a function or under
    TYPE_CHECKING; and a cycle through a package's ``__init__`` is found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\n"
    )
    (package / "c.py").write_text("import os\n\ndef f():\n    from . import sub\n")
    graph = import_graph(["pkg"], root=tmp_path)
    seen = {(i.importer, i.imported, i.in_function) for i in graph.imports}
    assert ("pkg", "pkg.sub.b", False) in seen
    assert ("pkg.sub.b", "pkg.c", False) in seen  # under TYPE_CHECKING: still module level
    assert ("pkg.c", "pkg.sub", True) in seen
    assert ("pkg.c", "os", False) in seen
    edges = graph.edges()
    assert edges["pkg.sub.b"] == {"pkg.c"}  # its own packages are no edge
    assert edges["pkg"] == {"pkg.sub", "pkg.sub.b"}
    assert cycles(edges) == []
    # c -> pkg.sub, whose __init__ imports b, which imports c: a cycle through a package.
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (package / "sub" / "b.py").write_text("from pkg.c import C\nB = 1\n")
    (package / "c.py").write_text("import pkg.sub\nC = 1\n")
    graph = import_graph(["pkg"], root=tmp_path)
    assert cycles(graph.edges()) == [["pkg.c", "pkg.sub", "pkg.sub.b"]]
    assert cycles(collapse(graph.edges(), depth=2)) == [["pkg.c", "pkg.sub"]]
    assert forbidden_imports(graph, {"pkg": {"os"}}) == []
    (package / "c.py").write_text("import os.path\n")
    graph = import_graph(["pkg"], root=tmp_path)
    assert forbidden_imports(graph, {"pkg": {"os"}}) == [f"{package / 'c.py'}:1: imports os.path"]


SERVICE = import_graph(["fvb_core", "scheduler", "worker", "fvb_tools"])


def test_each_service_layer_imports_only_the_layers_below_it():
    assert forbidden_imports(SERVICE) == []


def test_the_service_packages_have_no_import_cycle():
    for in_functions in (False, True):
        found = cycles(SERVICE.edges(in_functions))
        assert not found, "\n".join(describe(c, SERVICE, in_functions) for c in found)
        found = cycles(collapse(SERVICE.edges(in_functions), depth=2))
        assert not found, f"sub-package cycles (in functions too: {in_functions}): {found}"
