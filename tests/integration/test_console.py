"""The web console over HTTP, against a real server (fake backend) on SQLite and PostgreSQL:
sign-in, sessions and their cookies, CSRF, escaping, frames, the Models page (filter,
pages, live updates) and roles. Clicks in a real browser are in tests/browser."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.console.web import ConsoleServer
from controlplane.domain.access import Role
from controlplane.domain.types import DeployOptions, Resources
from controlplane.server import Server
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, fake_settings, running, zip_bytes
from tests.helpers.console import Web, console_of, field, web_of


async def test_pages_need_a_session_and_send_you_to_sign_in(console: ConsoleServer) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        r = await http.get("/projects/default/models")
        assert r.status_code == 303
        assert r.headers["location"] == "/sign-in?next=%2Fprojects%2Fdefault%2Fmodels"
        live = await http.get("/projects/default/models/-live")
        assert live.status_code == 401


async def test_every_response_refuses_frames_and_foreign_scripts(console: ConsoleServer) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        for path in ("/sign-in", "/static/console.css", "/projects/x/models"):
            r = await http.get(path)
            policy = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"


async def test_the_session_cookie_is_http_only_and_same_site_strict(
    console: ConsoleServer,
) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        web = Web(http)
        r = await web.sign_in()
        assert r.status_code == 303
        cookie = next(
            v for k, v in r.headers.multi_items() if k == "set-cookie" and "modelctl_session" in v
        )
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie, "plain HTTP: a Secure cookie would never come back"


async def test_a_model_name_with_markup_renders_as_text(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        await c.create_model(project, "xss", display_name="<script>alert(1)</script>")
    page = await web.get(f"/{project}/models")
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(web: Web) -> None:
    r = await web.post("/sign-out", csrf="")
    assert r.status_code == 403
    assert "CSRF" in r.text
    r = await web.post("/sign-out", csrf="forged")
    assert r.status_code == 403
    still = await web.get("/")
    assert still.status_code == 303 and "/models" in still.headers["location"], "signed in"
    r = await web.post("/sign-out")
    assert r.status_code == 303
    gone = await web.get("/")
    assert gone.headers["location"] == "/sign-in"


async def test_a_post_from_another_site_is_refused(web: Web) -> None:
    r = await web.http.post(
        "/sign-out", data={"csrf": web.csrf}, headers={"origin": "https://evil.example"}
    )
    assert r.status_code == 403


async def test_a_stale_sign_in_form_is_refused(console: ConsoleServer) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        r = await http.post("/sign-in", data={"sign_in_token": "made-up", "token": ""})
        assert r.status_code == 403
        assert "stale" in r.text


async def test_the_models_page_filters_and_pages(web: Web, server: Server, project: str) -> None:
    async with Client(server.grpc_address) as c:
        for i in range(55):
            await c.create_model(project, f"m{i:02d}")
        await c.create_model(project, "special", display_name="Fraud detector")
    first = await web.get(f"/{project}/models")
    assert first.text.count('<tr id="model-') == 50
    nxt = field(first.text.replace("?page=", 'name="page" value="'), "page")
    second = await web.get(f"/{project}/models", page=nxt)
    assert second.text.count('<tr id="model-') == 6
    found = await web.get(f"/{project}/models", filter="fraud")
    assert found.text.count('<tr id="model-') == 1 and "Fraud detector" in found.text
    none = await web.get(f"/{project}/models", filter="nothing-like-it")
    assert "No model matches" in none.text


async def test_a_change_made_elsewhere_reaches_an_open_models_page_at_once(
    web: Web, server: Server, project: str
) -> None:
    seen: list[str] = []

    async def follow() -> None:
        async for name, data in web.events(f"/{project}/models/-live"):
            if name == "swap" and data["id"] == "models-table":
                seen.append(data["html"])

    task = asyncio.create_task(follow())
    try:
        await eventually("the first update", lambda: _nonempty(seen), timeout=5)
        async with Client(server.grpc_address) as c:
            await c.create_model(project, "arrives", display_name="Arrives live")
        await eventually(
            "the new model on the open page",
            lambda: _contains(seen, "Arrives live"),
            timeout=2,
        )
    finally:
        task.cancel()


async def _nonempty(seen: list[str]) -> bool:
    return bool(seen)


async def _contains(seen: list[str], text: str) -> bool:
    return any(text in html for html in seen)


@pytest.fixture
async def secured(fresh_db: str, tmp_path: Path) -> AsyncIterator[Server]:
    async with running(fake_settings(fresh_db, tmp_path, insecure_no_auth=False)) as srv:
        yield srv


async def token_of(server: Server, role: Role, project: str = "default") -> str:
    admin = (server.settings.data_dir / "admin.token").read_text().strip()
    async with Client(server.grpc_address, token=admin) as c:
        _, secret = await c.create_token(f"projects/{project}", role)
    return secret


async def test_a_bad_token_is_refused_in_words(secured: Server) -> None:
    async with (
        console_of(secured.grpc_address) as console,
        httpx.AsyncClient(base_url=console.url) as http,
    ):
        r = await Web(http).sign_in("mlc_not_a_real_token")
        assert r.status_code == 401
        assert "That token is not valid" in r.text


async def test_a_viewer_sees_no_button_it_cannot_use(secured: Server) -> None:
    viewer = await token_of(secured, Role.VIEWER)
    async with console_of(secured.grpc_address) as console, web_of(console, viewer) as web:
        page = await web.get("/projects/default/models")
        assert page.status_code == 200
        assert ">viewer<" in page.text
        assert "Deploy New Build" not in page.text
        assert 'href="/projects/default/tokens"' not in page.text
        assert 'href="/projects/default/audit"' not in page.text


async def test_a_revoked_token_ends_its_session(secured: Server) -> None:
    admin = (secured.settings.data_dir / "admin.token").read_text().strip()
    async with Client(secured.grpc_address, token=admin) as c:
        made, secret = await c.create_token("projects/default", Role.DEPLOYER)
        async with console_of(secured.grpc_address) as console, web_of(console, secret) as web:
            assert (await web.get("/projects/default/models")).status_code == 200
            await c.revoke_token(made.name)

            async def signed_out() -> bool:
                r = await web.get("/projects/default/models")
                assert r.status_code == 303, r.status_code
                return r.headers["location"].startswith("/sign-in")

            await eventually("the session ended", signed_out, timeout=5)


async def test_each_deployment_says_who_asked_for_it(secured: Server) -> None:
    """GetDeployment's creator is the token that deployed (by a build with deploy, or by
    CreateDeployment), and the Deployments page shows it."""
    deployer = await token_of(secured, Role.DEPLOYER)
    async with Client(secured.grpc_address, token=deployer) as c:
        who = (await c.get_caller()).name
        model = await c.create_model("projects/default", "who")
        source = await c.upload_source(model.name, zip_bytes({"model.py": MODEL_V1}))
        op = await c.create_build(
            model.name, source.sha256, "model.py", "predict", deploy=DeployOptions(Resources())
        )
        op = await c.wait(op.name, timeout_s=30)
        first = await c.get_deployment(op.deployment)
        build = first.build
    admin = (secured.settings.data_dir / "admin.token").read_text().strip()
    async with Client(secured.grpc_address, token=admin) as c:
        op = await c.create_deployment(model.name, build, Resources(replicas=2))
        second = await c.get_deployment(op.deployment)
        admin_name = (await c.get_caller()).name
    assert first.creator == who and second.creator == admin_name != who
    async with console_of(secured.grpc_address) as console, web_of(console, admin) as web:
        page = await web.get("/projects/default/models/who/deployments")
        assert f'title="{who}"' in page.text and f'title="{admin_name}"' in page.text


async def test_a_token_of_another_project_never_gets_its_live_pages(secured: Server) -> None:
    """Pages on one address share their reads only among tokens that see the same
    projects: project A's token asking for project B's stream is refused as the API
    refuses it (not found), while B's own page follows its changes."""
    admin = (secured.settings.data_dir / "admin.token").read_text().strip()
    async with Client(secured.grpc_address, token=admin) as c:
        await c.create_model("projects/b", "secret-plans", display_name="Secret plans")
    of_b = await token_of(secured, Role.VIEWER, project="b")
    of_a = await token_of(secured, Role.ADMIN, project="a")
    async with (
        console_of(secured.grpc_address) as console,
        web_of(console, of_b) as web_b,
        web_of(console, of_a) as web_a,
    ):
        seen_by_b: list[str] = []

        async def follow_b() -> None:
            async for name, data in web_b.events("/projects/b/models/-live"):
                if name == "swap":
                    seen_by_b.append(data["html"])

        task = asyncio.create_task(follow_b())
        try:
            await eventually("B's page follows", lambda: _contains(seen_by_b, "Secret plans"))
            got: list[tuple[str, dict[str, str]]] = []
            async for name, data in web_a.events("/projects/b/models/-live"):
                got.append((name, data))
                if name != "swap":
                    break
            assert [n for n, _ in got] == ["failed"], got
            assert "Not found" in got[0][1]["message"]
            assert not any("Secret plans" in str(d) for _, d in got)
        finally:
            task.cancel()


async def test_the_live_stream_keeps_the_pages_filter_and_sign_in_keeps_the_address(
    console: ConsoleServer, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        await c.create_model(project, "kept", display_name="Kept")
        await c.create_model(project, "other", display_name="Other")
    async with httpx.AsyncClient(base_url=console.url) as http:
        asked = await http.get(f"/{project}/models", params={"filter": "kept & more"})
        assert asked.status_code == 303
        back = httpx.URL(asked.headers["location"]).params["next"]
        assert back == f"/{project}/models?filter=kept+%26+more"
        web = Web(http)
        await web.sign_in(project=project.removeprefix("projects/"))
        page = await web.get(f"/{project}/models", filter="kept")
        assert f'data-live="/{project}/models/-live?filter=kept"' in page.text
        odd = await web.get(f"/{project}/models", filter="kept", page="²")
        assert odd.status_code == 200, "a page number that is not one: the first page"
        bad = await web.get(f"/{project}/models", page="²")  # the API's own page token
        assert bad.status_code == 400 and "Not valid" in bad.text
