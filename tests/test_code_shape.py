"""The package's shape, checked on its source: files small enough to read, functions short enough to
follow, every module named in the README's layout map, and a runner that never asks which kind of
data or model it holds."""

import ast
from pathlib import Path

from helpers import ROOT

MAE = Path(ROOT) / "mae"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


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


def test_long_functions_are_found():
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    assert long_functions(f"def f():\n{body}\n\ndef g():\n    pass\n", 4) == [("f", 6)]


def test_files_and_functions_stay_small():
    big = {
        str(p.relative_to(ROOT)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not big, f"files over {MAX_FILE_LINES} lines: {big}"
    long = {
        str(p.relative_to(ROOT)): f
        for p in modules()
        if (f := long_functions(p.read_text(), MAX_FUNCTION_LINES))
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_module_is_in_the_readme_map():
    readme = (Path(ROOT) / "README.md").read_text()
    models_line = next(line for line in readme.splitlines() if line.startswith("mae/models/"))
    missing = []
    for p in modules():
        rel = p.relative_to(ROOT)
        if rel.parts[:2] == ("mae", "models"):
            if p.stem != "__init__" and p.stem not in models_line:
                missing.append(str(rel))
        elif p.name != "__init__.py" or rel.parent != Path("mae"):
            if f"{rel}" not in readme:
                missing.append(str(rel))
    assert not missing, f"README's layout map misses {missing}"


def test_the_runner_knows_no_kind_of_data_or_model():
    source = (MAE / "runner.py").read_text()
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
    kinds = {
        "streaming",
        "on_device",
        "StreamSource",
        "DeviceSource",
        "LoadedSource",
        "ImageStream",
        "mae",
        "vae",
    }
    assert not names & kinds, f"the runner branches on {names & kinds}"
