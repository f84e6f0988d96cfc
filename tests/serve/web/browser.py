"""The browser side of the chat app's tests: the system's Chromium driven by Playwright
(never a downloaded browser), a page that records console errors, and screenshots.

The browser is Debian's ``chromium`` (``make setup`` installs it), or the binary named by
``LORATREE_CHROMIUM``. Screenshots go to the test's tmp dir, and also to
``LORATREE_SCREENSHOTS`` when that is set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
NETWORK_ERROR = "Failed to load resource"


def chromium_path() -> str:
    """The Chromium binary to drive; fails the test (never skips it) when there is none."""
    given = os.environ.get("LORATREE_CHROMIUM")
    if given:
        if not os.access(given, os.X_OK):
            pytest.fail(f"LORATREE_CHROMIUM={given} is not an executable file")
        return given
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("the chat app's browser tests need Chromium: `apt-get install -y chromium` "
                "(as `make setup` does where apt is available), or set LORATREE_CHROMIUM "
                "to a Chromium binary")


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True)


class Page:
    """A Playwright page that records the page's console errors and uncaught exceptions.

    ``errors`` are JavaScript errors (``console.error`` and uncaught exceptions);
    ``network`` holds Chromium's own "Failed to load resource" lines, which an HTTP error
    status the test provoked on purpose (404, 429, 503) produces."""

    def __init__(self, browser, url: str, shots: Path, **context) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.url, self.shots = url, shots
        self.errors: list[str] = []
        self.network: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def _console(self, message) -> None:
        if message.type != "error":
            return
        (self.network if message.text.startswith(NETWORK_ERROR) else self.errors).append(
            message.text)

    def open(self, query: str = "temperature=0&max_tokens=12") -> None:
        self.page.goto(f"{self.url}/?{query}")
        self.page.wait_for_selector("body[data-ready=true]", timeout=10_000)

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        extra = os.environ.get("LORATREE_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(extra) / path.name)
        return path

    def close(self, allowed_network: tuple[str, ...] = ()) -> None:
        """Close, and fail on any JavaScript error and on any network error but those
        naming one of ``allowed_network`` (status codes the test provoked)."""
        self.context.close()
        assert not self.errors, f"JavaScript errors in the page: {self.errors}"
        unexpected = [n for n in self.network if not any(s in n for s in allowed_network)]
        assert not unexpected, f"unexpected failed loads: {unexpected}"
