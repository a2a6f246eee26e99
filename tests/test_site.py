"""The docs site as a reader sees it: Returns sections whole, no private names on the API
pages, and (where a Chromium is installed) no code block hiding text at 1400 or 800 px."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / "_ext" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mkdocs_options() -> dict:
    text = (ROOT / "mkdocs.yml").read_text()
    return {"returns_multiple_items": "returns_multiple_items: false" not in text}


@pytest.mark.parametrize(
    "module, name, must_hold",
    [
        ("nnjax.training.fit", "fit", 'history["epoch"]'),
        ("nnjax.sharding.presets", "tensor_parallel_rules", '"**": P()'),
    ],
)
def test_a_returns_section_renders_as_one_description(module, name, must_hold):
    griffe = pytest.importorskip("griffe", reason="the docs site reads docstrings with griffe")
    obj = griffe.load(module, search_paths=[str(ROOT)])[name]
    options = _mkdocs_options()
    assert options == {"returns_multiple_items": False}  # what mkdocs.yml sets
    sections = obj.docstring.parse(griffe.Parser.google, warnings=False, **options)
    (returns,) = [s for s in sections if s.kind.value == "returns"]
    assert len(returns.value) == 1  # one item: wrapped lines (and ** globs) stay in one span
    assert must_hold in returns.value[0].description


def test_api_pages_name_no_private_helpers():
    ext = _load("griffe_nnjax")
    listed = re.findall(
        r"^::: (\S+)", "".join(p.read_text() for p in (DOCS / "api").glob("*.md")), re.M
    )
    leaks = {}
    for name in listed:
        doc = ext.roles_as_code(importlib.import_module(name).__doc__ or "")
        private = re.findall(r"`(_[a-z]\w*)`", doc)
        if private:
            leaks[name] = private
    assert not leaks, f"module docs on the site name private helpers: {leaks}"


def test_layers_api_page_follows_the_guide():
    order = re.findall(r"^::: nnjax\.layers\.(\w+)", (DOCS / "api" / "layers.md").read_text(), re.M)
    assert order[:4] == ["dense", "conv", "pool", "reshape"] and order.index(
        "attention"
    ) > order.index("recurrent")


@pytest.mark.slow  # builds the site and starts a browser per page and width
def test_site_in_a_headless_browser_hides_no_code(tmp_path):
    pytest.importorskip("mkdocs", reason="builds the docs site")
    check = _load("site_check")
    if check.find_browser() is None:
        pytest.skip(f"no headless browser ({', '.join(check.BROWSERS)})")
    assert (
        check.main(["--pages", "index", "getting-started", "training", "--out", str(tmp_path)]) == 0
    )
    for page in ("index", "getting-started", "training"):
        for width in check.WIDTHS:
            assert (tmp_path / f"{page}-{width}.png").stat().st_size > 10_000
