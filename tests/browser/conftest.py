"""A real Chromium for the dashboard's tests: Debian's `chromium` package driven by Playwright
(pip `playwright`; never `playwright install`, which would download a browser of its own).

Headless, a fresh user data dir per test, and nothing that phones home. Chromium missing is a
failure that says how to install it, never a silent skip: `.ci/run` installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, async_playwright

CHROMIUM = os.environ.get("ACB_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# where the screenshots for README go when asked: ACB_SCREENSHOTS=docs/img pytest tests/browser
SCREENSHOTS = os.environ.get("ACB_SCREENSHOTS")


@pytest.fixture
async def chromium(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set ACB_CHROMIUM)")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 900},
            locale="en-US",
            timezone_id="UTC",
        )
        context.set_default_timeout(10_000)
        try:
            yield context
        finally:
            await context.close()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Where a screenshot goes: the docs' folder when ACB_SCREENSHOTS names it, else the test's."""
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
