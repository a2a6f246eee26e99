"""docs/reliability.md names, beside every behaviour, the test that proves it: each named test exists."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _functions(file: pathlib.Path) -> set[str]:
    tree = ast.parse(file.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_named_in_the_reliability_page_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(test_\w+)::(test_\w+)", text)
    assert len(named) > 50  # the page is read, not skipped
    missing = [
        f"{module}::{name}"
        for module, name in named
        if not (ROOT / "tests" / f"{module}.py").exists()
        or name not in _functions(ROOT / "tests" / f"{module}.py")
    ]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
