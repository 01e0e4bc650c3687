"""The package layout: no import cycles among the modules of ``timmface``, ``teachers`` and ``students``.

Every ``.py`` file of the three packages is parsed (never imported), and every ``import`` statement becomes an
edge from the module that contains it to the module it names: statements at module level and inside functions
and classes alike (a function-level import still ties the two modules together for a reader, and still runs),
except those under ``if TYPE_CHECKING:``, which never run. Imports of modules outside the three packages
(torch, timm, ...) are ignored.

How a statement resolves to the module it names:

* ``import a.b.c`` and ``from a.b.c import name`` name ``a.b.c`` only, not the parent packages ``a`` and ``a.b``.
  Python does run their ``__init__`` first, but an edge to the parent would make a false cycle of every package
  whose ``__init__`` re-exports from its submodules: ``teachers/__init__`` imports ``teachers.load``, and the
  import of ``teachers.base`` inside ``teachers.load`` would add ``teachers.load -> teachers``, a cycle no reader
  has to untangle. What a package's ``__init__`` itself imports is counted as that package's own edges.
* ``from pkg import name`` where ``pkg/name.py`` (or ``pkg/name/__init__.py``) exists names the submodule
  ``pkg.name``: that is the module whose code the statement needs. When ``name`` is not a submodule (a function,
  a class, a re-exported name), it names ``pkg`` itself, whose ``__init__`` must run to provide it.
* Relative imports resolve against the importing module's package (``from .base import Teacher`` in
  ``teachers/__init__.py`` names ``teachers.base``; ``from . import variants`` names ``students.variants``).
* A statement that names the module containing it (``from . import x`` inside a package's own ``__init__`` when
  ``x`` is not a submodule) is not an edge.

Lazy name tables resolved with ``importlib.import_module`` (``timmface.data.__getattr__``, the command table of
``timmface.cli``) are not import statements and are not counted: they run only when a caller asks for a name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("timmface", "teachers", "students")


def discover_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is_package)}`` for every ``.py`` file of ``packages`` under ``root``."""
    modules: dict[str, tuple[Path, bool]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement below ``node``, at any depth, except the bodies of ``if TYPE_CHECKING:`` blocks
    (their ``else`` branches run, so they count)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                found.extend(_import_nodes(ast.Module(body=[stmt], type_ignores=[])))
        else:
            found.extend(_import_nodes(child))
    return found


def import_edges(name: str, modules: dict[str, tuple[Path, bool]]) -> dict[str, int]:
    """``{imported module: line of its first import}`` for module ``name``, restricted to ``modules``."""
    path, is_package = modules[name]
    package = name if is_package else name.rpartition(".")[0]
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in modules and target != name:
            edges.setdefault(target, line)

    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        if node.level:  # relative: level 1 is this package, each further level one package up
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            add(submodule if submodule in modules else base, node.lineno)
    return edges


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, int]]:
    return {name: import_edges(name, modules) for name in modules}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected component of more than one module, and
    every module that imports itself; empty when the graph is acyclic. Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in graph[v]:
                    components.append(component)
    return [_cycle_in(set(c), graph) for c in components]


def _cycle_in(component: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the alphabetically first module of ``component`` (breadth-first)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in component and w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, tuple[Path, bool]]) -> str:
    """``a (a.py:12) -> b (b.py:40) -> a``: each hop with the line of the import statement."""
    hops = [
        f"{a} ({modules[a][0].relative_to(ROOT) if modules[a][0].is_relative_to(ROOT) else modules[a][0]}"
        f":{graph[a][b]})"
        for a, b in zip(cycle, cycle[1:])
    ]
    return " -> ".join([*hops, cycle[-1]])


# --------------------------------------------------------------------------------------------------
# The rule itself
# --------------------------------------------------------------------------------------------------


def test_no_import_cycles_in_timmface_teachers_students() -> None:
    modules = discover_modules()
    assert len(modules) > 50 and "timmface.data.batch" in modules  # the walk found the real tree
    graph = import_graph(modules)
    cycles = [describe(c, graph, modules) for c in find_cycles(graph)]
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_data_flows_one_way() -> None:
    """The shared batch machinery and the image decoders import none of the modules built on them."""
    modules = discover_modules()
    graph = import_graph(modules)
    for low in ("timmface.data.image", "timmface.data.batch"):
        above = {"timmface.data.loader", "timmface.data.wds", "timmface.data.gpu_decode", "timmface.trainer"}
        assert not set(graph[low]) & above, (low, sorted(graph[low]))
    assert set(graph["timmface.data.image"]) <= {"timmface.errors"}


def test_distillation_needs_only_the_cache_format() -> None:
    """The distillation trainer reads the teacher cache; the engine that writes it belongs to ``timmface embed``."""
    modules = discover_modules()
    graph = import_graph(modules)
    distill = [m for m in modules if m == "timmface.distill" or m.startswith("timmface.distill.")]
    used = {target for m in distill for target in graph[m] if target.startswith("timmface.embedding")}
    assert used == {"timmface.embedding.cache"}, used
    assert not any(t.startswith("timmface.embedding") for t in graph["timmface.embedding.cache"])


# --------------------------------------------------------------------------------------------------
# The checker, on trees written here: it must find what it claims to find
# --------------------------------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, dict[str, int]]:
    """The import graph of package ``pkg`` written under ``tmp_path`` (an empty ``pkg/__init__.py`` unless given)."""
    for rel, text in {"pkg/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = discover_modules(tmp_path, ("pkg",))
    return import_graph(modules)


def test_checker_counts_function_level_imports_and_skips_type_checking(tmp_path: Path) -> None:
    graph = _tree(
        tmp_path,
        {
            "pkg/a.py": "from pkg.b import f\n",
            "pkg/b.py": "def f():\n    from pkg.a import g\n",
            "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import g\nelse:\n"
            "    import pkg.d\n",
            "pkg/d.py": "import typing\nif typing.TYPE_CHECKING:\n    import pkg.c\n",
        },
    )
    assert graph["pkg.a"] == {"pkg.b": 1}
    assert graph["pkg.b"] == {"pkg.a": 2}  # inside a function: counted
    assert graph["pkg.c"] == {"pkg.d": 5}  # the TYPE_CHECKING body is not, its else branch is
    assert graph["pkg.d"] == {}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_checker_resolves_submodules_parents_and_relative_imports(tmp_path: Path) -> None:
    graph = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from .sub import thing\nfrom . import helper\n",
            "pkg/helper.py": "from pkg import sub\nimport pkg.sub.deep\n",
            "pkg/sub/__init__.py": "thing = 1\n",
            "pkg/sub/deep.py": "from .. import helper\nfrom ..sub import thing\nfrom pkg import VERSION\n",
        },
    )
    assert set(graph["pkg"]) == {"pkg.sub", "pkg.helper"}
    assert set(graph["pkg.helper"]) == {"pkg.sub", "pkg.sub.deep"}  # not the parents pkg, pkg.sub of deep
    # `from ..sub import thing`: thing is no submodule -> pkg.sub; `from pkg import VERSION` -> pkg itself
    assert set(graph["pkg.sub.deep"]) == {"pkg.helper", "pkg.sub", "pkg"}
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and cycles[0][0] == cycles[0][-1] == "pkg"
    assert set(cycles[0]) == {"pkg", "pkg.helper", "pkg.sub.deep"}


@pytest.mark.parametrize("acyclic", [True, False])
def test_checker_names_the_cycle_with_file_and_line(tmp_path: Path, acyclic: bool) -> None:
    back = "" if acyclic else "x = 1\nimport pkg.a\n"
    graph = _tree(
        tmp_path,
        {"pkg/a.py": "import pkg.b\n", "pkg/b.py": "import pkg.c\n", "pkg/c.py": back},
    )
    cycles = find_cycles(graph)
    if acyclic:
        assert cycles == []
        return
    assert cycles == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    modules = discover_modules(tmp_path, ("pkg",))
    text = describe(cycles[0], graph, modules)
    assert text.endswith("pkg.c (" + str(tmp_path / "pkg" / "c.py") + ":2) -> pkg.a"), text
