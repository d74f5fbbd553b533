"""No import cycles among the ``mae`` modules, function-level imports included (DESIGN: imports flow
one way, config -> data / masking / losses -> models -> runner -> entry points; interop never below
config).

Every ``.py`` file under ``mae/`` is parsed, not imported: whatever modules are there now are
checked, and a cycle that bites only when a function runs is caught before it does. Every import in
a file is an edge (top level, inside a function, under ``if TYPE_CHECKING:``, relative,
``importlib.import_module("mae.x")``). A package is its ``__init__``. Importing ``mae.models.mae``
first runs ``mae/models/__init__.py``, so it is an edge to ``mae.models`` too — except from a module
inside ``mae.models``: a submodule only runs once its package has started, so reaching a sibling
does not run the package again. Naming the package itself (``from mae.models import build_model``)
is an edge from anywhere.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> {module it imports: where, e.g. "mae/config/pretraining.py:187"}
Graph = dict[str, dict[str, str]]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` under ``root``."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def named_modules(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules that ``node`` (a statement or call of ``module``) imports by name, absolute."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        # relative to the package the module is in (a package's __init__: the package itself)
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        names_attributes = len(submodules) < len(node.names)  # `from P import name` runs P itself
        return submodules + ([base] if names_attributes else [])
    call = node.func if isinstance(node, ast.Call) else None
    if getattr(call, "attr", getattr(call, "id", None)) == "import_module" and node.args:
        first = node.args[0]
        return (
            [first.value]
            if isinstance(first, ast.Constant) and isinstance(first.value, str)
            else []
        )
    return []


def runs(target: str, module: str) -> list[str]:
    """``target`` and the packages importing it runs first, less those ``module`` itself sits in."""
    parts, own = target.split("."), module.split(".")
    inside = {".".join(own[:i]) for i in range(1, len(own) + 1)}
    return [target] + [p for i in range(1, len(parts)) if (p := ".".join(parts[:i])) not in inside]


def import_graph(root: Path, package: str) -> Graph:
    files = module_files(root, package)
    graph: Graph = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in named_modules(node, module, path.name == "__init__.py", set(files)):
                for dep in runs(target, module):
                    if dep in files and dep != module:
                        edges.setdefault(dep, f"{path.relative_to(root)}:{node.lineno}")
    return graph


def components(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for dep in graph[m]:
            if dep not in index:
                visit(dep)
                low[m] = min(low[m], low[dep])
            elif dep in stack:
                low[m] = min(low[m], index[dep])
        if low[m] == index[m]:
            part = stack[stack.index(m) :]
            del stack[stack.index(m) :]
            if len(part) > 1:
                found.append(sorted(part))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return sorted(found)


def shortest_cycle(graph: Graph, part: list[str]) -> list[str]:
    """The shortest cycle through ``part[0]`` inside the component ``part``,
    first module repeated last."""
    start, within = part[0], set(part)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        m = queue.popleft()
        for dep in sorted(graph[m]):
            if dep == start:
                path = [m]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if dep in within and dep not in parent:
                parent[dep] = m
                queue.append(dep)
    raise AssertionError(f"{part} is not a strongly connected component")


def describe(graph: Graph, cycle: list[str]) -> str:
    steps = "".join(
        f"\n    {graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:], strict=False)
    )
    return " -> ".join(cycle) + steps


def cycles(graph: Graph) -> list[str]:
    """One line per component: its modules, then its shortest cycle,
    each import with its file and line."""
    return [
        f"{', '.join(part)}: {describe(graph, shortest_cycle(graph, part))}"
        for part in components(graph)
    ]


def reachable(graph: Graph, module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checker_finds_function_level_relative_and_package_cycles(tmp_path):
    root = write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def f():\n    from pkg.b import x\n",  # function level
            "pkg/b.py": "from pkg import a\n",  # a submodule through its package
            "pkg/c.py": "import pkg.sub.d\n",  # runs pkg/sub/__init__.py first ...
            # ... which imports c back
            "pkg/sub/__init__.py": "from . import e\nfrom ..c import y\n",
            "pkg/sub/d.py": "",
            "pkg/sub/e.py": "from pkg.sub.d import z\n",  # a sibling: pkg.sub is already running
            "pkg/sub/g.py": "import importlib\nmod = importlib.import_module('pkg.sub')\n",
            "pkg/sub/h.py": "from pkg.sub import NAME\n",  # the package itself, from inside it
        },
    )
    graph = import_graph(root, "pkg")
    assert graph["pkg.sub.e"] == {"pkg.sub.d": "pkg/sub/e.py:1"}
    assert graph["pkg.sub"] == {
        "pkg.sub.e": "pkg/sub/__init__.py:1",
        "pkg.c": "pkg/sub/__init__.py:2",
    }
    # g and h are imported by nothing
    assert components(graph) == [
        ["pkg.a", "pkg.b"],
        ["pkg.c", "pkg.sub"],
    ]
    a_b = (
        "pkg.a, pkg.b: pkg.a -> pkg.b -> pkg.a\n"
        "    pkg/a.py:2 imports pkg.b\n"
        "    pkg/b.py:1 imports pkg.a"
    )
    assert cycles(graph)[0] == a_b
    (root / "pkg/sub/__init__.py").write_text("from . import e, g, h\n")
    assert components(import_graph(root, "pkg")) == [
        ["pkg.a", "pkg.b"],
        ["pkg.sub", "pkg.sub.g", "pkg.sub.h"],
    ]


def test_the_mae_modules_import_each_other_without_cycles():
    found = cycles(import_graph(ROOT, "mae"))
    assert not found, "import cycles among the mae modules:\n" + "\n".join(found)


def test_the_config_sits_below_everything_and_presets_below_the_config():
    graph = import_graph(ROOT, "mae")
    leaves = {"mae.config.presets", "mae.config.families"}
    below = {"mae.config.checks", "mae.config.loader", "mae.config.training", "mae.errors", *leaves}
    for config in ("mae.config", "mae.config.pretraining", "mae.config.evaluation"):
        assert reachable(graph, config) <= below | {"mae.config.pretraining"}, config
    assert graph["mae.config.presets"] == {} and graph["mae.config.families"] == {}
