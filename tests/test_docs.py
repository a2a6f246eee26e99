"""The documentation runs: every ``python`` block of the README and ``docs/**/*.md``, and every docstring example.

Guides: each page's ```` ```python ```` blocks run in order in one namespace (a page is
one test), from a temporary working directory, on the CPU. A block opts out only with
an HTML comment on the line right before its fence, ``<!-- skip: the reason -->``
(for example ``<!-- skip: needs 8 devices -->``); the reason is shown as the skip.

Docstrings: every ``>>>`` example in a module of ``nnjax`` runs as a doctest with
``nj``, ``jax``, ``jnp``, ``np`` and ``key = jax.random.key(0)`` predefined. Outputs are
compared exactly up to whitespace; an example that elides output says so with
``# doctest: +ELLIPSIS`` on its line.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pathlib
import pkgutil
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax
import nnjax as nj

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A fenced block, with the HTML comment (if any) on the line just before it.
_FENCE = re.compile(
    r"(?:^<!--\s*skip:\s*(?P<skip>.*?)\s*-->\n)?^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def code_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """The page's python blocks as ``(line, source, skip reason or None)``."""
    blocks = []
    for m in _FENCE.finditer(text):
        if m["lang"] != "python":
            continue
        line = text.count("\n", 0, m.start("body")) + 1
        blocks.append((line, textwrap.dedent(m["body"]), m["skip"]))
    return blocks


PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_guide_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    ran = 0
    for line, source, skip in code_blocks(page.read_text()):
        if skip is not None:
            continue
        code = compile("\n" * (line - 1) + source, str(page), "exec")
        exec(code, namespace)  # a failure's traceback shows the page's own line numbers
        ran += 1
    skipped = [skip for _, _, skip in code_blocks(page.read_text()) if skip is not None]
    if ran == 0 and skipped:
        pytest.skip("; ".join(skipped))


def test_skip_markers_are_parsed():
    page = "text\n<!-- skip: needs a GPU -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert code_blocks(page) == [(4, "x = 1\n", "needs a GPU"), (8, "y = 2\n", None)]


def _modules() -> list[str]:
    names = [nnjax.__name__]
    for info in pkgutil.walk_packages(nnjax.__path__, "nnjax."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def _docstring_examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        tests += [t for t in finder.find(importlib.import_module(name), name) if t.examples]
    return sorted(tests, key=lambda t: t.name)


EXAMPLES = _docstring_examples()


@pytest.mark.parametrize("test", EXAMPLES, ids=lambda t: t.name)
def test_docstring_example(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    test.globs = {"nj": nj, "jax": jax, "jnp": jnp, "np": np, "key": jax.random.key(0)}
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append, clear_globs=True)
    assert runner.failures == 0, "".join(out)


def test_docstring_examples_are_found():
    names = {t.name for t in EXAMPLES}
    assert "nnjax.layers.dense.Dense" in names
    assert len(EXAMPLES) > 40


def test_site_shows_sphinx_roles_as_sphinx_would():
    pytest.importorskip("griffe", reason="the docs site's extension needs griffe")
    spec = importlib.util.spec_from_file_location("griffe_nnjax", DOCS / "_ext" / "griffe_nnjax.py")
    assert spec is not None and spec.loader is not None
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    text = "A :class:`~nnjax.models.CausalLMConfig` for :func:`nnjax.data.batches`; `x` stays."
    assert ext.roles_as_code(text) == "A `CausalLMConfig` for `nnjax.data.batches`; `x` stays."
    assert ext.roles_as_code(":mod:`~nnjax.layers.quantized`") == "`quantized`"
