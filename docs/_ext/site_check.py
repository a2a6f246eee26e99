"""Build the docs site and look at it in a headless browser, at 1400 and 800 px wide.

    python docs/_ext/site_check.py                       # every page, into site-check/
    python docs/_ext/site_check.py --pages index training api/layers --out /tmp/shots

Needs ``mkdocs`` (``pip install -e ".[docs]"``) and a Chromium: ``chromium``,
``chromium-headless-shell`` (Debian: ``apt-get install chromium-headless-shell``) or
``google-chrome`` on the PATH, or ``--browser PATH``. For each page and width it writes
a screenshot ``<page>-<width>.png`` to look at, and measures every code block in the
browser: a block whose lines are wider than the block (text hidden behind a scroll bar,
such as an expected-output comment) fails the check. Exit status 0: no block hides
text; 1: the hidden blocks are listed; 2: no browser or mkdocs.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
WIDTHS = (1400, 800)

# Runs in the page: each code block whose content is wider than its box, by its first line.
PROBE = """
<script>
window.addEventListener("load", () => {
  const hidden = [];
  for (const code of document.querySelectorAll(".md-content pre > code")) {
    if (code.scrollWidth > code.clientWidth + 1) {
      hidden.push((code.textContent.split("\\n")[0] || "").slice(0, 80));
    }
  }
  const out = document.createElement("pre");
  out.id = "site-check-result";
  out.textContent = JSON.stringify(hidden);
  document.body.appendChild(out);
});
</script>
"""
_RESULT = re.compile(r'<pre id="site-check-result">(.*?)</pre>', re.DOTALL)


def find_browser(given: str | None = None) -> str | None:
    """The Chromium to use: ``given``, else the first of :data:`BROWSERS` on the PATH."""
    if given:
        return shutil.which(given) or (given if pathlib.Path(given).exists() else None)
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def build_site(out: pathlib.Path) -> None:
    """``mkdocs build --strict`` of this checkout into ``out``."""
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        check=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def _chrome(browser: str, width: int, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags += [f"--window-size={width},2000", "--virtual-time-budget=5000"]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


def check_page(browser: str, site: pathlib.Path, page: str, width: int, shots: pathlib.Path):
    """Screenshot ``page`` at ``width`` into ``shots``; the first lines of hidden code blocks."""
    html = site / page / "index.html" if page != "index" else site / "index.html"
    name = f"{page.strip('/').replace('/', '_') or 'index'}-{width}.png"
    _chrome(browser, width, f"--screenshot={shots / name}", html.as_uri())
    probe = html.with_name(".site-check.html")  # beside it: the same relative assets
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = _chrome(browser, width, "--dump-dom", probe.as_uri()).stdout
    finally:
        probe.unlink()
    found = _RESULT.search(dom)
    if found is None:
        raise RuntimeError(f"{page} at {width} px: the browser did not run the probe")
    import json

    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def pages_of(site: pathlib.Path) -> list[str]:
    """Every page of the built site, as its folder relative to the site (``index`` for home)."""
    out = []
    for html in sorted(site.rglob("index.html")):
        rel = html.parent.relative_to(site).as_posix()
        if rel != "404":
            out.append("index" if rel == "." else rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="site-check", help="where the screenshots go")
    parser.add_argument("--pages", nargs="*", help="page folders (default: every page)")
    parser.add_argument("--browser", help="a Chromium executable")
    parser.add_argument("--site", help="an already built site folder (default: build one)")
    args = parser.parse_args(argv)
    browser = find_browser(args.browser)
    if browser is None:
        print(f"no browser: install one of {', '.join(BROWSERS)} or pass --browser")
        return 2
    shots = pathlib.Path(args.out).resolve()
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = pathlib.Path(args.site) if args.site else pathlib.Path(tmp) / "site"
        if not args.site:
            try:
                build_site(site)
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                print(f"mkdocs build failed: {e}")
                return 2
        bad = 0
        for page in args.pages or pages_of(site):
            for width in WIDTHS:
                hidden = check_page(browser, site, page.strip("/"), width, shots)
                for first in hidden:
                    print(f"{page} at {width} px: a code block hides text: {first!r}")
                bad += len(hidden)
    print(f"screenshots in {shots}; {bad} code block(s) hide text")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
