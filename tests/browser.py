"""Headless Chromium for end-to-end page tests: Debian's ``chromium`` (scripts/bootstrap.sh installs it) driven by
Playwright, which downloads no browser of its own here. Outside CI a machine without it skips; in CI it fails."""

import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "operator")


def chromium_path() -> str:
    path = os.environ.get("MORL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no chromium on PATH (apt-get install chromium)")
    return path


@contextmanager
def browser_page(width: int = 1440, height: int = 1000):
    """A fresh page in headless Chromium; console errors and failed page scripts are collected in
    ``page.errors`` (a page test asserts it stays empty)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            # a 4xx the page handles (a stale switch) is logged by Chromium as "Failed to load resource": not an error
            page.on(
                "console",
                lambda m: m.type == "error" and "Failed to load resource" not in m.text and page.errors.append(m.text),
            )
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> str:
    """Save the whole page as NAME.png: into docs/operator/ (what the docs show) with MORL_DOCS_SCREENSHOTS=1, else
    into a temporary folder, so a test run leaves the checkout as it was."""
    folder = DOCS if os.environ.get("MORL_DOCS_SCREENSHOTS") == "1" else tempfile.mkdtemp(prefix="morl-screens-")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    page.screenshot(path=path, full_page=True)
    return path
