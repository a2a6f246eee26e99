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

# ``print(expr)  # (2, 16)``: a top-level print whose comment starts like output (a
# bracket, quote or digit) states what it prints; a comment in words is a remark.
_PRINTED = re.compile(r"^print\((?P<args>.*?)\)\s{2,}#\s(?P<want>[(\[{'0-9-].*)$", re.MULTILINE)
_OUTPUT = doctest.OutputChecker()


def with_output_checks(source: str) -> str:
    """``source`` with each stated print replaced by a call that also checks its output."""
    return _PRINTED.sub(lambda m: f"_check_printed({m['want']!r}, {m['args']})", source)


def _check_printed(want: str, *values) -> None:
    """Print ``values``; the text must be ``want`` (``...`` elides), or its part before a
    trailing ``": remark"``."""
    got = " ".join(map(str, values))
    print(got)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    wants = [want, want.rsplit(": ", 1)[0]]
    assert any(_OUTPUT.check_output(w + "\n", got + "\n", flags) for w in wants), (
        f"printed {got!r}, the page says {want!r}"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_guide_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs.{page.stem}", "_check_printed": _check_printed}
    ran = 0
    for line, source, skip in code_blocks(page.read_text()):
        if skip is not None:
            continue
        code = compile("\n" * (line - 1) + with_output_checks(source), str(page), "exec")
        exec(code, namespace)  # a failure's traceback shows the page's own line numbers
        ran += 1
    skipped = [skip for _, _, skip in code_blocks(page.read_text()) if skip is not None]
    if ran == 0 and skipped:
        pytest.skip("; ".join(skipped))


def test_stated_prints_are_checked_and_remarks_are_not():
    source = "print(x.shape)   # (2, 16)\nprint(y)   # the loss\nprint(z)   # 4 (4,): per step\n"
    assert with_output_checks(source) == (
        "_check_printed('(2, 16)', x.shape)\nprint(y)   # the loss\n"
        "_check_printed('4 (4,): per step', z)\n"
    )
    _check_printed("['a', ...]", ["a", "b", "c"])
    _check_printed("4 (4,): one loss per step", 4, (4,))
    with pytest.raises(AssertionError, match=r"printed '\(2, 17\)', the page says '\(2, 16\)'"):
        _check_printed("(2, 16)", (2, 17))


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
