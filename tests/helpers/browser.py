"""The web console in a real browser: Debian's Chromium driven by Playwright (its async API,
on the session's event loop). A test module (or conftest) that uses these fixtures imports
them and provides a ``console`` fixture of its own (tests/browser: fake backend;
tests/ray/test_console_ray.py: real Ray).

- ``browser``: one Chromium for the session (skips, naming the install, when Chromium or
  axe-core is missing: `make setup`; CP_NO_SKIPS=1 then fails `make test`);
- ``page``: a new context per test (1280x800); the test fails if the page wrote an error
  to its console or threw, unless the test said it expects that error (``Errors.allow``);
- ``axe(page)``: axe-core's serious and critical violations on the page as it is now;
- ``screenshot(page, name)``: docs/console/<name>.png, the whole page;
- ``sign_in(page, console)`` signs in as a person does, by typing into the sign-in form.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright, expect

from controlplane.console.web import ConsoleServer
from tests.helpers import ROOT

CHROMIUM = Path("/usr/bin/chromium")
AXE = ROOT / "tests" / "browser" / "node_modules" / "axe-core" / "axe.min.js"
# Screenshots go into docs/console/ only when asked (`make screenshots`); a plain test run
# writes them to the system's temp dir, so that it leaves the checkout as it was.
SHOTS = Path(os.environ.get("CP_SCREENSHOTS", "") or Path(tempfile.gettempdir()) / "console-shots")
# Without the networking flags Chromium keeps calling Google's hosts, which this closed
# network refuses; without --no-sandbox it does not start as root.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 5_000  # what a step may take before the test fails (live updates: 2 s, their own)


def missing() -> str:
    """Why the browser tests cannot run here, or ''."""
    if not CHROMIUM.exists():
        return (
            f"{CHROMIUM} is missing: run `make setup` as root "
            "(apt-get install -y --no-install-recommends chromium fonts-dejavu-core)"
        )
    if not AXE.exists():
        return f"{AXE} is missing: run `make setup` (npm ci in tests/browser)"
    return ""


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    why = missing()
    if why:
        pytest.skip(why)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Errors:
    """What a page wrote to its console as an error, and the exceptions it threw."""

    seen: list[str] = field(default_factory=list)
    expected: list[re.Pattern[str]] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        """An error this test causes on purpose (a refused frame) is not a failure."""
        self.expected.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.seen if not any(p.search(e) for p in self.expected)]


@pytest.fixture
def errors() -> Errors:
    return Errors()


@pytest.fixture
async def page(browser: Browser, errors: Errors, console: ConsoleServer) -> AsyncIterator[Page]:
    """A new page (its own context: no cookies of another test's), closed before
    ``console`` stops, so that no live stream is cut while the page still follows it."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    opened = await context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            where = message.location.get("url", "")
            errors.seen.append(f"console error: {message.text} ({where})")

    def on_error(error: Error) -> None:
        errors.seen.append(f"uncaught: {error.name}: {error.message}")

    opened.on("console", on_console)
    opened.on("pageerror", on_error)
    try:
        yield opened
    finally:
        await context.close()
    unexpected = errors.unexpected()
    assert not unexpected, "the page reported errors:\n" + "\n".join(unexpected)


# ---- axe-core ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    id: str
    impact: str
    help: str
    targets: list[str]

    def __str__(self) -> str:
        return f"{self.id} ({self.impact}): {self.help}; at {', '.join(self.targets)}"


async def axe(page: Page) -> list[Violation]:
    """axe-core's violations of impact serious or critical on ``page`` as it is now.

    The console's CSP (script-src 'self') refuses an injected <script> element, which is
    what ``page.add_script_tag(path=...)`` makes; so axe's source is evaluated through the
    DevTools protocol, which the page's CSP does not govern, and the CSP stays on."""
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.evaluate(AXE.read_text())
    found: list[dict[str, Any]] = await page.evaluate(
        """async () => {
            const result = await axe.run(document, {resultTypes: ["violations"]});
            return result.violations.map(v => ({
                id: v.id, impact: v.impact || "", help: v.help,
                targets: v.nodes.map(n => JSON.stringify(n.target)),
            }));
        }"""
    )
    return [
        Violation(v["id"], v["impact"], v["help"], v["targets"])
        for v in found
        if v["impact"] in ("serious", "critical")
    ]


async def assert_accessible(page: Page) -> None:
    """axe finds no serious or critical violation on ``page`` (each one named if it does)."""
    found = await axe(page)
    assert not found, f"axe on {page.url}:\n" + "\n".join(str(v) for v in found)


async def screenshot(page: Page, name: str) -> Path:
    """The whole of ``page`` as <name>.png in SHOTS (docs/console/ with `make screenshots`)."""
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=path, full_page=True, animations="disabled", caret="hide")
    return path


async def sign_in(page: Page, console: ConsoleServer, token: str = "", project: str = "") -> None:
    """Opens the console, types the token (and project) and presses Sign in; returns on the
    Models page. The server here takes an empty token (--insecure-no-auth)."""
    await page.goto(console.url)
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.get_by_label("API token").click()
    await page.keyboard.type(token)
    if project:
        await page.get_by_label("Project").click()
        await page.keyboard.type(project)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name=re.compile(r"^Models"))).to_be_visible()


async def live(page: Page) -> None:
    """Waits until the page's live stream is open (its status says Live)."""
    await expect(page.locator("#live-status")).to_have_text("Live")
