"""The web console used as a person uses it, in Debian's Chromium: sign in by typing a token
and pressing Sign in; the Models page lists what the API made, and a model made meanwhile
appears within 2 s without a reload; markup in a name stays text; no other site can frame
the console; every control is reachable with Tab, and axe-core finds nothing serious.
Screenshots of the pages go to docs/console/. The fixtures are in conftest.py."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Dialog, Page, Route, expect

from controlplane.api.client import Client
from controlplane.console.web import ConsoleServer
from controlplane.domain.types import DeployOptions, Resources
from controlplane.server import Server
from tests.helpers.api import MODEL_V1, zip_bytes
from tests.helpers.browser import Errors, assert_accessible, live, screenshot, sign_in

# Seconds of a browser and a server per test: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

PROJECT = "projects/default"  # where a sign-in without a project lands
LIVE_MS = 2_000  # a change made elsewhere is on an open page within 2 s (the issue)

# The controls a keyboard reaches, in the order Tab reaches them: visible, enabled, not
# taken out of the order (tabindex -1), not inside a closed dialog.
FOCUSABLE = """() => {
  const all = document.querySelectorAll(
    "a[href], button, input:not([type=hidden]), select, textarea, [tabindex]");
  return [...all].filter(el =>
    !el.disabled && el.tabIndex >= 0 && !el.closest("[inert]")
    && el.getClientRects().length > 0
  ).map(el => window.__describe(el));
}"""
DESCRIBE = """() => {
  window.__describe = el => {
    const tag = el.tagName.toLowerCase();
    const name = el.id ? "#" + el.id : (el.getAttribute("href") || el.getAttribute("name") || "");
    return `${tag} ${name} ${(el.textContent || "").trim().slice(0, 40)}`.trim();
  };
}"""


async def create_models(server: Server, *models: tuple[str, str]) -> None:
    async with Client(server.grpc_address) as c:
        for model_id, display in models:
            await c.create_model(PROJECT, model_id, display_name=display)


async def deploy(server: Server, model_id: str, replicas: int) -> None:
    """Builds model.py of tests/helpers/api.py and deploys it (the fake backend)."""
    model = f"{PROJECT}/models/{model_id}"
    async with Client(server.grpc_address) as c:
        source = await c.upload_source(model, zip_bytes({"model.py": MODEL_V1}))
        op = await c.create_build(
            model,
            source.sha256,
            "model.py",
            "predict",
            deploy=DeployOptions(Resources(replicas=replicas)),
        )
        done = await c.wait(op.name, timeout_s=30)
        assert done.error is None, done.error


async def tab_order(page: Page) -> tuple[list[str], list[str]]:
    """(the page's focusable controls, what Tab focuses from the top, as many presses)."""
    await page.evaluate(DESCRIBE)
    expected: list[str] = await page.evaluate(FOCUSABLE)
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    focused: list[str] = []
    for _ in expected:
        await page.keyboard.press("Tab")
        focused.append(
            await page.evaluate(
                "document.activeElement === document.body ? 'body' "
                ": window.__describe(document.activeElement)"
            )
        )
    return expected, focused


async def test_a_person_signs_in_and_sees_the_models_made_through_the_api(
    page: Page, server: Server, console: ConsoleServer
) -> None:
    await create_models(
        server,
        ("iris", "Iris classifier"),
        ("fraud", "Fraud detector"),
        ("churn", ""),
    )
    await deploy(server, "iris", replicas=2)
    await page.goto(console.url)
    await expect(page).to_have_url(re.compile(r"/sign-in$"))
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    await screenshot(page, "sign-in")

    await sign_in(page, console)
    await expect(page).to_have_url(f"{console.url}/{PROJECT}/models")
    await live(page)
    table = page.locator("#models-table")
    for name in ("Iris classifier", "Fraud detector", "churn"):
        await expect(table.get_by_role("link", name=name, exact=True)).to_be_visible()
    iris = page.locator("#model-iris")
    await expect(iris.locator(".badge")).to_have_text("DEPLOYED")
    await expect(iris.locator(".replicas")).to_have_text("2/2")
    await expect(page.locator("#model-fraud .badge")).to_have_text(re.compile("NOT_DEPLOYED"))
    await expect(page.get_by_text("admin", exact=True)).to_be_visible()  # no tokens: admin
    await screenshot(page, "models")

    await page.get_by_label("Filter").click()
    await page.keyboard.type("fraud")
    await page.get_by_role("button", name="Filter", exact=True).click()
    await expect(table.locator("tbody tr")).to_have_count(1)
    await expect(table.get_by_role("link", name="Fraud detector")).to_be_visible()


async def test_a_model_made_through_the_api_appears_on_the_open_page_within_2_s(
    page: Page, server: Server, console: ConsoleServer
) -> None:
    await create_models(server, ("first", "First model"))
    await sign_in(page, console)
    await live(page)
    await expect(page.get_by_role("link", name="First model")).to_be_visible()
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    await page.evaluate("window.__sameDocument = true")

    await create_models(server, ("arrives", "Arrives live"))
    await expect(page.get_by_role("link", name="Arrives live")).to_be_visible(timeout=LIVE_MS)
    assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    assert navigations == [], navigations
    await expect(page.locator("#live-status")).to_have_text("Live")


async def test_markup_in_a_display_name_is_shown_as_text_and_never_runs(
    page: Page, server: Server, console: ConsoleServer
) -> None:
    dialogs: list[str] = []

    async def on_dialog(dialog: Dialog) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    script = "<script>alert(1)</script>"
    image = "<img src=x onerror=alert(2)>"
    await create_models(server, ("xss", script))
    await sign_in(page, console)
    await live(page)
    table = page.locator("#models-table")
    await expect(table.get_by_role("link", name=script, exact=True)).to_be_visible()

    await create_models(server, ("xss-live", image))  # through the live update's swap
    await expect(table.get_by_role("link", name=image, exact=True)).to_be_visible(timeout=LIVE_MS)
    await expect(table.locator("script, img")).to_have_count(0)
    await page.reload()
    await expect(table.get_by_role("link", name=image, exact=True)).to_be_visible()
    await expect(table.locator("script, img")).to_have_count(0)
    assert dialogs == [], dialogs


async def test_another_site_cannot_frame_the_console(
    page: Page, console: ConsoleServer, errors: Errors
) -> None:
    # A page of another origin (answered by the browser's own routing, no server) framing
    # the console's sign-in page, and, to show such a frame would render, a page of its own.
    other = "http://other-site.test"

    async def framing(route: Route) -> None:
        await route.fulfill(
            content_type="text/html",
            body=f"<!doctype html><title>Other site</title>"
            f'<iframe id="console" src="{console.url}/sign-in"></iframe>'
            f'<iframe id="control" src="{other}/own"></iframe>',
        )

    async def own(route: Route) -> None:
        await route.fulfill(content_type="text/html", body="<p>A frame of its own</p>")

    await page.route(f"{other}/", framing)
    await page.route(f"{other}/own", own)
    errors.allow(r"Refused to (display|frame)")  # Chromium may say so in the console
    await page.goto(f"{other}/")  # returns once every frame has loaded or failed

    await expect(page.frame_locator("#control").get_by_text("A frame of its own")).to_be_visible()
    handle = await page.query_selector("#console")
    assert handle is not None
    frame = await handle.content_frame()
    assert frame is not None
    assert not frame.url.startswith(console.url), f"the console rendered in a frame: {frame.url}"
    await expect(frame.get_by_role("button", name="Sign in")).to_have_count(0)
    await expect(frame.locator("#token")).to_have_count(0)


async def test_every_control_is_reachable_by_keyboard(
    page: Page, server: Server, console: ConsoleServer
) -> None:
    await create_models(server, ("iris", "Iris classifier"), ("fraud", "Fraud detector"))
    await page.goto(f"{console.url}/sign-in")
    expected, focused = await tab_order(page)
    assert any("#token" in e for e in expected) and any("Sign in" in e for e in expected)
    assert focused == expected, f"Tab order {focused}, controls {expected}"

    # Sign in with the keyboard alone: Tab to the token, type, Tab on to the button, Enter.
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    while await page.evaluate("document.activeElement.id") != "token":
        await page.keyboard.press("Tab")
    await page.keyboard.type("")  # the insecure server takes an empty token
    while await page.evaluate("document.activeElement.textContent.trim()") != "Sign in":
        await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{console.url}/{PROJECT}/models")
    await live(page)
    await expect(page.get_by_role("link", name="Fraud detector")).to_be_visible()

    expected, focused = await tab_order(page)
    for control in ("a /", "#project-switch", "Models", "Sign out", "#filter", "Iris classifier"):
        assert any(control in e for e in expected), (control, expected)
    assert focused == expected, f"Tab order {focused}, controls {expected}"


async def test_axe_finds_nothing_serious_on_the_sign_in_and_models_pages(
    page: Page, server: Server, console: ConsoleServer
) -> None:
    await page.goto(f"{console.url}/sign-in")
    await assert_accessible(page)

    await sign_in(page, console)
    await live(page)
    await expect(page.get_by_text("No models yet")).to_be_visible()
    await assert_accessible(page)

    await create_models(server, ("iris", "Iris classifier"), ("fraud", "Fraud detector"))
    await deploy(server, "iris", replicas=1)
    await expect(page.locator("#model-iris .badge")).to_have_text("DEPLOYED", timeout=LIVE_MS)
    await assert_accessible(page)

    await page.get_by_label("Filter").fill("nothing-like-it")
    await page.get_by_label("Filter").press("Enter")
    await expect(page.get_by_text("No model matches")).to_be_visible()
    await assert_accessible(page)


async def test_the_redeploy_form_shows_the_servers_plan_before_deploy_model(
    page: Page, server: Server, console: ConsoleServer
) -> None:
    await create_models(server, ("iris", "Iris classifier"))
    await deploy(server, "iris", replicas=1)
    await sign_in(page, console)
    await page.goto(f"{console.url}/{PROJECT}/models/iris/deployments")
    await page.get_by_role("link", name=re.compile("Re-deploy this Build")).first.click()
    plan = page.locator("#plan-result")
    await expect(plan).to_contain_text("Nothing changes for the replicas")
    anyway = page.get_by_role("button", name="Deploy anyway (wait for capacity)")
    await expect(anyway).to_be_hidden()

    # More replicas: the server's plan, as typed, without a reload.
    await page.get_by_label("Replicas").fill("3")  # the one label with "replicas" in it
    await expect(plan).to_contain_text("Scales in place from 1 to 3 replicas")
    await expect(plan.locator(".plan-reasons")).to_have_text("Replicas: 1 → 3")
    await expect(plan.locator("tr.node")).to_contain_text("fake-node")
    await expect(plan).to_contain_text("Fits: 2 replicas to start")
    await assert_accessible(page)
    await screenshot(page, "redeploy-plan")

    # More GPUs than the fake cluster has: it does not fit, and Deploy anyway appears.
    await page.get_by_label("GPUs per replica").fill("4")
    await expect(plan).to_contain_text("Does not fit: 3 of 3 new replicas")
    await expect(anyway).to_be_visible()
    await screenshot(page, "redeploy-no-room")
    # Bounds the server refuses stand beside their field while typed.
    await page.get_by_label("GPUs per replica").fill("0")
    await page.get_by_label("Scale with load").check()
    await page.get_by_label("Max replica count").fill("0")
    error = page.locator("#max_replicas-error")
    await expect(error).to_have_text(re.compile("^Max replica count must be between"))
    await expect(page.get_by_label("Max replica count")).to_have_attribute("aria-invalid", "true")
    await expect(anyway).to_be_hidden()
    await assert_accessible(page)
    await screenshot(page, "redeploy-invalid")
    await page.get_by_label("Max replica count").fill("4")
    await expect(error).to_have_text("")
    await expect(plan).to_contain_text("Replicas: 1 → autoscaling 1-4")

    await page.get_by_role("button", name="Deploy Model").click()
    await expect(page).to_have_url(f"{console.url}/{PROJECT}/models/iris")
    await expect(page.locator(".flash")).to_contain_text("with 1 to 4 replicas, scaling with load")
    # The Overview follows the model's scale live: wanted, running, autoscaling, and why.
    status = page.locator("#model-status")
    await expect(status.locator(".scale")).to_have_text(
        "1 running of 1 wanted · autoscaling", timeout=10_000
    )
    await expect(status.locator(".scale-decision")).to_contain_text(
        "deployment 2: autoscaling 1-4 replicas"
    )
    await screenshot(page, "overview-scale")
