"""The seed's four workflows done by clicks alone in Chromium, on a real Ray Serve.

Re-deploy an existing build with more replicas (replica ids kept), deploy a new build
with a renamed function (from a folder), restart with confirm (every replica id new),
stop with confirm (the endpoint stops answering); and a change made with the CLI shows
on an open page without a reload. The tests run in this order on one model, each reading
where the last left it through the API.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import AsyncIterator

import httpx
import pytest
from playwright.async_api import Dialog, Page, expect

from controlplane.api.client import Client
from controlplane.cli import main as modelctl
from controlplane.console.web import ConsoleServer
from controlplane.domain.states import ModelState
from controlplane.domain.types import DeployOptions, Resources
from controlplane.server import Server
from tests.helpers import EXAMPLES, eventually
from tests.helpers.browser import (
    assert_accessible,
    browser,
    errors,
    live,
    page,
    screenshot,
    sign_in,
)
from tests.helpers.console import console_of
from tests.helpers.ray_cluster import IRIS, ray_server
from workers.backend import Backend

__all__ = ["browser", "errors", "page"]
pytestmark = pytest.mark.ray

PROJECT = "console"
MODEL = f"projects/{PROJECT}/models/iris"
OVERVIEW = f"/projects/{PROJECT}/models/iris"
IRIS_TEXT = json.dumps(IRIS)
ROLLOUT_MS = 180_000  # a rollout on this 2-core machine, with room


@pytest.fixture(scope="module")
async def ray_cp(
    ray_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with ray_server(ray_backend, tmp_path_factory.mktemp("console")) as server:
        yield server


@pytest.fixture(scope="module")
async def api(ray_cp: Server) -> AsyncIterator[Client]:
    async with Client(ray_cp.grpc_address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
async def console(ray_cp: Server) -> AsyncIterator[ConsoleServer]:
    async with console_of(ray_cp.grpc_address) as c:
        yield c


@pytest.fixture(scope="module")
async def iris(api: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The iris classifier (examples/iris-v1, function predict) deployed with 2 replicas."""
    await api.create_model(f"projects/{PROJECT}", "iris", display_name="Iris classifier")
    archive = tmp_path_factory.mktemp("zip") / "iris.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((EXAMPLES / "iris-v1").rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                z.write(f, f.relative_to(EXAMPLES / "iris-v1").as_posix())
    source = await api.upload_source(MODEL, archive.read_bytes())
    op = await api.create_build(
        MODEL,
        source.sha256,
        "model.py",
        "predict",
        deploy=DeployOptions(Resources(replicas=2, cpus=0.25)),
    )
    done = await api.wait(op.name, timeout_s=ROLLOUT_MS / 1000)
    assert done.error is None, done.error
    return MODEL


async def replica_ids(api: Client) -> set[str]:
    model = await api.get_model(MODEL)
    deployment = await api.get_deployment(model.active_deployment)
    return {r.id for r in deployment.replicas}


async def settled(api: Client, state: ModelState = ModelState.DEPLOYED) -> None:
    async def check() -> bool:
        model = await api.get_model(MODEL)
        assert model.state == state and not model.running_operation, model
        return True

    await eventually(f"the model {state.value}", check, timeout=ROLLOUT_MS / 1000)


async def page_replicas(page: Page) -> set[str]:
    return set(await page.locator("#replicas tbody tr.replica td:first-child").all_inner_texts())


async def test_deploy_a_new_build_with_a_renamed_function_from_a_folder(
    page: Page, console: ConsoleServer, api: Client, iris: str
) -> None:
    await sign_in(page, console, project=PROJECT)
    await page.get_by_role("link", name="Iris classifier").click()
    await page.get_by_role("link", name="Deployments").click()
    await page.locator("#main").get_by_role("link", name="Deploy New Build").click()
    await expect(page.get_by_label("Model id")).to_have_value("iris")
    await page.get_by_label("A folder").set_input_files(EXAMPLES / "iris-v2")
    await page.get_by_label("Function").fill("classify")
    await assert_accessible(page)
    await screenshot(page, "deploy-new-build")
    await page.get_by_role("button", name="Build and Deploy").click()
    await expect(page).to_have_url(re.compile(r"/builds/\d+"))
    await live(page)
    await screenshot(page, "build")
    overview = page.get_by_role("link", name="Go to the model Overview")
    await expect(overview).to_be_visible(timeout=ROLLOUT_MS)
    model = await api.get_model(MODEL)
    deployment = await api.get_deployment(model.active_deployment)
    build = await api.get_build(deployment.build)
    assert build.function_name == "classify" and build.version == 2
    await page.goto(f"{console.url}{OVERVIEW}")
    await expect(page.locator("#model-status")).to_contain_text("build 2")
    # Test Model: the answer names the build and the replica that gave it.
    await page.get_by_label("Request body (JSON)").fill(IRIS_TEXT)
    await page.get_by_role("button", name="Send request").click()
    result = page.locator("#test-result")
    await expect(result).to_contain_text("200", timeout=30_000)
    await expect(result).to_contain_text("build 2")
    shown = (await result.locator("code").first.inner_text()).strip()
    assert shown in await replica_ids(api)
    await assert_accessible(page)
    await screenshot(page, "overview")


async def test_redeploy_an_existing_build_with_more_replicas_keeps_the_replicas(
    page: Page, console: ConsoleServer, api: Client, iris: str
) -> None:
    await settled(api)
    before = await replica_ids(api)
    await sign_in(page, console, project=PROJECT)
    await page.goto(f"{console.url}{OVERVIEW}/deployments")
    await assert_accessible(page)
    await screenshot(page, "deployments")
    await page.get_by_role("link", name=re.compile("Re-deploy this Build")).first.click()
    replicas = page.get_by_label("Replicas")
    await replicas.fill(str(len(before) + 1))
    # The server's plan for the count typed (not the one the page opened with).
    await expect(page.locator("#plan-result")).to_contain_text(
        f"Scales in place from {len(before)} to {len(before) + 1} replicas"
    )
    await assert_accessible(page)
    await screenshot(page, "redeploy")
    await page.get_by_role("button", name="Deploy Model").click()
    await expect(page).to_have_url(re.compile(f"{OVERVIEW}$"))
    await expect(page.locator("#replicas tbody tr.replica")).to_have_count(
        len(before) + 1, timeout=ROLLOUT_MS
    )
    await settled(api)
    after = await replica_ids(api)
    assert len(after) == len(before) + 1 and before < after, "scaled in place: ids kept"
    assert await page_replicas(page) == after


async def test_restart_with_confirm_replaces_every_replica(
    page: Page, console: ConsoleServer, api: Client, iris: str
) -> None:
    await settled(api)
    before = await replica_ids(api)
    await sign_in(page, console, project=PROJECT)
    await page.goto(f"{console.url}{OVERVIEW}")
    await live(page)
    await page.get_by_role("button", name="Restart").click()
    dialog = page.get_by_role("dialog")
    build = (await api.get_model(MODEL)).active_deployment
    build = (await api.get_deployment(build)).build.rsplit("/", 1)[-1]
    many = "both" if len(before) == 2 else f"all {len(before)}"
    await expect(dialog).to_contain_text(
        f"Restart replaces {many} replicas of build {build}; no code change."
    )
    await screenshot(page, "restart-confirm")
    await dialog.get_by_role("button", name="OK").click()
    await expect(page.locator(".flash")).to_contain_text("Restarting")

    async def all_new() -> bool:
        shown = await page_replicas(page)
        assert len(shown) == len(before) and not shown & before, shown
        return True

    await eventually("every replica new on the open page", all_new, timeout=ROLLOUT_MS / 1000)
    await settled(api)
    assert not (await replica_ids(api)) & before


async def test_a_change_made_with_the_cli_shows_on_an_open_page_within_2_s(
    page: Page, console: ConsoleServer, ray_cp: Server, iris: str
) -> None:
    await sign_in(page, console, project=PROJECT)
    await live(page)
    code = await modelctl.run(
        ["--server", ray_cp.grpc_address, "--project", PROJECT, "models", "create", "churn",
         "--display-name", "Churn predictor"]
    )  # fmt: skip
    assert code == 0
    await expect(page.get_by_role("link", name="Churn predictor")).to_be_visible(timeout=2_000)


PAGES = {
    "models": f"/projects/{PROJECT}/models",
    "builds": f"{OVERVIEW}/builds",
    "build-1": f"{OVERVIEW}/builds/1",
    "monitoring": f"{OVERVIEW}/monitoring",
    "logs": f"{OVERVIEW}/logs",
    "operations": f"{OVERVIEW}/operations",
    "keys": f"{OVERVIEW}/keys",
    "tokens": f"/projects/{PROJECT}/tokens",
    "audit": f"/projects/{PROJECT}/audit",
}


async def test_every_page_has_no_serious_accessibility_violation(
    page: Page, console: ConsoleServer, iris: str
) -> None:
    """The pages the workflows above did not pass through, with what they did on them:
    axe finds nothing serious or critical, and each is pictured for docs/console/."""
    await sign_in(page, console, project=PROJECT)
    for name, path in PAGES.items():
        await page.goto(f"{console.url}{path}")
        await expect(page.locator("h1")).to_be_visible()
        await assert_accessible(page)
        await screenshot(page, name)
    await page.goto(f"{console.url}{OVERVIEW}/keys")
    await page.get_by_role("button", name=re.compile("Create")).click()
    await expect(page.locator("#main")).to_contain_text("will not be shown again")
    await assert_accessible(page)
    await screenshot(page, "key-created")


async def test_stop_with_confirm_and_the_endpoint_stops_answering(
    page: Page, console: ConsoleServer, api: Client, iris: str
) -> None:
    await settled(api)
    endpoint = (await api.get_model(MODEL)).endpoint
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.post(endpoint, json=IRIS)).status_code == 200
    await sign_in(page, console, project=PROJECT)
    await page.goto(f"{console.url}{OVERVIEW}")
    await live(page)
    native: list[str] = []

    async def on_dialog(d: Dialog) -> None:  # a native dialog would be a bug: ours is <dialog>
        native.append(d.message)
        await d.dismiss()

    page.on("dialog", on_dialog)
    await page.get_by_role("button", name="Stop").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_contain_text("Stop ends all")
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    assert (await api.get_model(MODEL)).state == ModelState.DEPLOYED, "Cancel changed nothing"
    await page.get_by_role("button", name="Stop").click()
    await dialog.get_by_role("button", name="OK").click()
    await expect(page.locator("#model-status")).to_contain_text("STOPPED", timeout=ROLLOUT_MS)
    await expect(page.locator("#replicas")).to_contain_text("No replica runs")
    assert not native

    async def refused() -> bool:
        async with httpx.AsyncClient(timeout=10) as http:
            try:
                r = await http.post(endpoint, json=IRIS)
            except httpx.HTTPError:
                return True
        assert r.status_code >= 400, r.status_code
        return True

    await eventually("the endpoint stops answering", refused, timeout=30)
