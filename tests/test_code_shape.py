"""The package's shape, checked on its source: functions short enough to follow, every module named
in the README's layout map, and a runner that never asks which kind of data or model it holds.
Each check is tested on a small source of its own first, so that it is known to catch what it
claims to."""

import ast
import itertools
import re
from pathlib import Path

from helpers import ROOT

MAE = Path(ROOT) / "mae"
MAX_FUNCTION_LINES = 80
# names the runner must not mention: kinds of data and model families
KINDS = {
    "streaming",
    "on_device",
    "StreamSource",
    "DeviceSource",
    "LoadedSource",
    "ImageStream",
    "mae",
    "vae",
    "cross",
}


def modules() -> list[Path]:
    return sorted(MAE.rglob("*.py"))


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > limit
    ]


def mentioned(source: str) -> set[str]:
    """Every name, attribute and string constant in ``source``'s code (docstrings included: a
    kind named in prose is a string constant too)."""
    tree = ast.parse(source)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    return names


def map_entries(readme: str) -> set[str]:
    """The paths the README's layout map names: the ``mae/`` paths that open a line, and the
    module names a folder's entry lists after its colon (``mae/models/  ...: a, b``)."""
    entries = set()
    for line in readme.splitlines():
        paths = list(itertools.takewhile(lambda w: w.startswith("mae/"), line.split()))
        entries |= {p.rstrip("/") for p in paths}
        for folder in (p for p in paths if p.endswith("/")):
            listed = line.rsplit(":", 1)[1] if ":" in line else ""
            entries |= {f"{folder}{w}.py" for w in re.findall(r"[a-z_][a-z0-9_]*", listed)}
    return entries


def unmapped(files: list[str], entries: set[str]) -> list[str]:
    """The files (paths relative to the root) that no map entry names: by its own path, or by a
    folder entry whose listed modules include it. Package ``__init__`` files need no entry."""
    missing = []
    for f in files:
        if Path(f).name == "__init__.py":
            continue
        if f not in entries:
            missing.append(f)
    return missing


def test_long_functions_are_found():
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    assert long_functions(f"def f():\n{body}\n\ndef g():\n    pass\n", 4) == [("f", 6)]


def test_functions_stay_short():
    long = {
        str(p.relative_to(ROOT)): f
        for p in modules()
        if (f := long_functions(p.read_text(), MAX_FUNCTION_LINES))
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_map_check_matches_whole_names_only():
    readme = "mae/mae.py mae/b.py   two\nmae/models/  one file per family: mae, vae\n"
    entries = map_entries(readme)
    files = [
        "mae/mae.py",
        "mae/b.py",
        "mae/ae.py",
        "mae/models/mae.py",
        "mae/models/ae.py",
        "mae/__init__.py",
    ]
    # "ae" is inside "mae" and "vae", but names neither file
    assert unmapped(files, entries) == ["mae/ae.py", "mae/models/ae.py"]


def test_every_module_is_in_the_readme_map():
    entries = map_entries((Path(ROOT) / "README.md").read_text())
    missing = unmapped([str(p.relative_to(ROOT)) for p in modules()], entries)
    assert not missing, f"README's layout map misses {missing}"


def test_the_kind_check_sees_names_attributes_and_strings():
    source = 'if cfg.model.name == "mae":\n    x = source.on_device\nelif vae:\n    pass\n'
    assert mentioned(source) & KINDS == {"mae", "on_device", "vae"}


def test_the_runner_knows_no_kind_of_data_or_model():
    found = mentioned((MAE / "runner.py").read_text()) & KINDS
    assert not found, f"the runner branches on {found}"
