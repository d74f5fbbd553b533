"""The test suite's own layout: shared code lives in helpers.py, and no test file imports another
test file or conftest (pytest imports those itself; importing them again runs their module code
twice and ties one test file's names to another's)."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SHARED = {"helpers"}  # the one sibling module test files may import


def sibling_imports(source: str, siblings: set[str]) -> list[str]:
    """The names of modules in ``siblings`` that ``source`` imports, at any depth
    (function-level too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in siblings]
    return found


def test_sibling_imports_finds_top_level_and_function_level_imports():
    # names held apart so a grep for such imports stays clean
    fixtures, other = (
        "conftest",
        "test_probe",
    )
    source = (
        f"import os\nfrom {fixtures} import ROOT\n\n"
        f"def f():\n    import {other}\n    from helpers import TINY\n"
    )
    assert sibling_imports(source, {fixtures, other}) == [fixtures, other]


def test_no_test_file_imports_another_test_file_or_conftest():
    siblings = {p.stem for p in TESTS.glob("*.py")} - SHARED
    offenders = {
        p.name: found
        for p in sorted(TESTS.glob("*.py"))
        if (found := sibling_imports(p.read_text(), siblings))
    }
    assert offenders == {}, f"import shared test code from helpers.py instead: {offenders}"
