"""The browser tests' harness: a real Chromium driven by Playwright for Python, and real
`chatd serve` processes (or an in-process API instance) serving the page.

Chromium is the machine's own (`chromium` on the PATH, or the path in CHATD_CHROMIUM): a
browser download at test time is not possible here, so `playwright install` is never run.
Without a Chromium (or without the playwright package) the tests are skipped, and the session
ends with a line that says so; with CHATD_REQUIRE_BROWSER=1 (what .ci/run sets) a missing
Chromium is an error instead, so CI can never pass without running them.

Screenshots of the main states go to CHATD_ARTIFACTS (default tests/browser/artifacts/)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.db.sql_files import PROJECT_ROOT

if TYPE_CHECKING:
    from playwright.async_api import Browser

BROWSER_DIR = Path(__file__).resolve().parent
CHROMIUM_ENV = "CHATD_CHROMIUM"
REQUIRE_ENV = "CHATD_REQUIRE_BROWSER"
ARTIFACTS_ENV = "CHATD_ARTIFACTS"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get(CHROMIUM_ENV, "")
    if explicit:
        return shutil.which(explicit)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def why_no_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if find_chromium() is None:
        return (
            f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on the PATH and"
            f" {CHROMIUM_ENV}); install it with `apt-get install chromium`"
        )
    return None


def _is_browser_test(item: pytest.Item) -> bool:
    return Path(str(item.path)).is_relative_to(BROWSER_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = why_no_browser()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV):
        raise pytest.UsageError(f"the browser tests must run ({REQUIRE_ENV} is set), but {reason}")
    skip = pytest.mark.skip(reason=f"browser tests skipped: {reason}")
    for item in items:
        if _is_browser_test(item):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reason = why_no_browser()
    if reason is None:
        return
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "browser tests skipped" in str(getattr(report, "longrepr", ""))
    ]
    if skipped:
        terminalreporter.write_sep("=", f"BROWSER TESTS SKIPPED: {reason}", yellow=True, bold=True)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This test's artifact directory (screenshots)."""
    root = Path(os.environ.get(ARTIFACTS_ENV) or PROJECT_ROOT / "tests" / "browser" / "artifacts")
    directory = root / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    yield directory


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415  only when it runs

    # Streams, replica restarts and a database on a shared 2-core machine: patient, never slow
    # when all is well (every wait ends as soon as its condition holds).
    expect.set_options(timeout=30_000)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=find_chromium(),
            # Containers often have a tiny /dev/shm; Chromium then writes its shared memory to
            # /tmp instead of crashing.
            args=["--disable-dev-shm-usage"],
        )
        try:
            yield chromium
        finally:
            await chromium.close()
