"""The console's Monitoring, Logs and Operations pages over HTTP, against a real server
(fake backend, made-up replica reports) on SQLite and PostgreSQL: the figures a person
reads after requests were answered, the log lines with their request ids, the replica
filter, the live log that sends each new line once, and operations with their outcome,
their reason when they failed, and Cancel."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.console.pages import signals as signal_pages
from controlplane.domain.states import ModelState
from controlplane.domain.types import Deployment, DeployOptions, Model, Resources
from controlplane.server import Server
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, fake_settings, running, zip_bytes
from tests.helpers.console import Web
from tests.integration.test_signals import figures, line
from workers.backend import app_name_for
from workers.fake_backend import FakeBackend
from workers.signals import Report, latency_bucket


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    """The conftest's server, reading the replicas' reports every 50 ms."""
    settings = fake_settings(database_url, tmp_path, signals_interval_s=0.05)
    async with running(settings) as srv:
        yield srv


@dataclass
class Served:
    """A model of the test's project, deployed with one replica the fake backend runs."""

    server: Server
    model: Model
    deployment: Deployment

    @property
    def id(self) -> str:
        return self.model.name.rsplit("/", 1)[-1]

    @property
    def path(self) -> str:
        return f"/{self.model.name}"

    @property
    def app(self) -> str:
        return app_name_for(self.model.name.split("/")[1], self.id)

    @property
    def build(self) -> str:
        return f"{self.model.name}/builds/1"

    @property
    def replica(self) -> str:
        return self.deployment.replicas[0].id

    @property
    def fake(self) -> FakeBackend:
        assert isinstance(self.server.backend, FakeBackend)
        return self.server.backend


async def upload_and_build(
    c: Client, model: str, function: str = "predict", deploy: DeployOptions | None = None
) -> str:
    """Builds MODEL_V1's ``function`` (deploying it when asked); the operation's name."""
    source = await c.upload_source(model, zip_bytes({"model.py": MODEL_V1}))
    op = await c.create_build(model, source.sha256, "model.py", function, deploy=deploy)
    return op.name


@pytest.fixture
async def served(server: Server, project: str) -> Served:
    async with Client(server.grpc_address) as c:
        model = await c.create_model(project, "iris")
        op = await upload_and_build(
            c, model.name, deploy=DeployOptions(Resources(replicas=1, cpus=1))
        )
        done = await c.wait(op, timeout_s=30)
        assert done.error is None, done.error

        async def deployed() -> tuple[Model, Deployment]:
            m = await c.get_model(model.name)
            assert m.state == ModelState.DEPLOYED and m.active_deployment, m.state
            dep = await c.get_deployment(m.active_deployment)
            assert dep.replicas, "no replica yet"
            return m, dep

        model, deployment = await eventually("the model serving", deployed, timeout=30)
    return Served(server, model, deployment)


def text_of(page: httpx.Response) -> str:
    """The page as a person reads it: markup's entities back to characters."""
    return html.unescape(page.text)


def row_of(page: str, row_id: str) -> str:
    found = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', page, re.S)
    assert found, f"no row {row_id} on the page"
    return found.group(1)


def live_url(page: str) -> str:
    found = re.search(r'data-live="([^"]*)"', page)
    assert found, "the page follows nothing live"
    return html.unescape(found.group(1))


# ---- Monitoring ------------------------------------------------------------------------------


async def test_monitoring_shows_the_requests_answered_and_each_replica(
    web: Web, served: Served
) -> None:
    s = served
    s.fake.report(
        Report(
            figures(
                s.app,
                s.build,
                s.replica,
                requests=90,
                model_errors=9,
                latency=((latency_bucket(4), 90),),
                cpu_seconds=0.5,
                rss_bytes=300 * 1024 * 1024,
            ),
            (),
        ),
        # A replica Serve no longer runs: listed as gone, with what it did.
        Report(figures(s.app, s.build, "oldrep1", requests=30), ()),
    )
    path = f"{s.path}/monitoring"

    async def counted() -> str:
        page = await web.get(path)
        assert page.status_code == 200, page.text
        text = text_of(page)
        assert "120 requests in 15 min" in text, "not counted yet"
        return text

    text = await eventually("the requests on the Monitoring page", counted, timeout=10)
    assert 'aria-current="page">Monitoring<' in text
    assert ">0.13<" in text, "120 requests in 900 s: 0.13 per second"
    assert "7.5%" in text, "9 of 120 failed"
    assert "GPU" in text and "not measured" in text
    mine = row_of(text, f"replica-{s.replica}")
    assert "running" in mine and "90" in mine and "10.0.0.7" in mine and "4242" in mine
    assert "9 (10.0%)" in mine, "its errors and their share"
    gone = row_of(text, "replica-oldrep1")
    assert "gone" in gone and "30" in gone
    assert "build 1" in text
    # The charts: drawn by the server, saying what they show, without inline styles.
    assert text.count("<polyline") >= 3
    assert 'role="img"' in text and "Requests per second over the last 15 min" in text
    assert "style=" not in text
    # Other windows, each at most 90 points.
    hour = text_of(await web.get(path, window="1h"))
    assert "in steps of 40 s" in hour and "120 requests in 1 hour" in hour
    points = re.search(r'<polyline points="([^"]*)"', hour)
    assert points and len(points.group(1).split()) <= 90
    assert f'data-live="{path}/live?window=1h"' in hour, "the live page keeps its window"


async def test_monitoring_refreshes_on_an_open_page(
    web: Web, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signal_pages, "REFRESH_S", 0.2)  # the page's pace, not under test
    s = served
    seen: list[str] = []

    async def follow() -> None:
        async for name, data in web.events(f"{s.path}/monitoring/live?window=5m"):
            if name == "swap" and data["id"] == "monitoring-figures":
                seen.append(html.unescape(data["html"]))

    task = asyncio.create_task(follow())
    try:
        await eventually("the first refresh", lambda: bool(seen), timeout=5)
        assert "in 5 min" in seen[-1]
        s.fake.report(Report(figures(s.app, s.build, s.replica, requests=42), ()))
        await eventually(
            "the new figures on the open page",
            lambda: any("42 requests in 5 min" in h for h in seen),
            timeout=15,
        )
    finally:
        task.cancel()


# ---- Logs ------------------------------------------------------------------------------------


def say(s: Served, replica: str, seq: int, text: str, **kw: object) -> Report:
    return Report(
        figures(s.app, s.build, replica), (line(s.app, s.build, replica, seq, text, **kw),)
    )


async def lines_shown(web: Web, path: str, n: int, **params: str) -> str:
    async def shown() -> str:
        page = await web.get(path, **params)
        assert page.status_code == 200, page.text
        text = text_of(page)
        count = text.count('<span class="line ')
        assert count == n, f"{count} lines shown"
        return text

    return await eventually(f"{n} lines on the Logs page", shown, timeout=10)


async def test_logs_show_the_lines_with_their_request_ids_and_filter_by_replica(
    web: Web, served: Served
) -> None:
    s = served
    s.fake.report(
        Report(
            figures(s.app, s.build, s.replica),
            (
                line(s.app, s.build, s.replica, 0, "loading the <model>"),
                line(s.app, s.build, s.replica, 1, "it went wrong", stream="stderr"),
                line(
                    s.app, s.build, s.replica, 2, "200 3.1 ms", stream="access", request_id="req-1"
                ),
            ),
        ),
        say(s, "otherrep", 0, "from another replica"),
    )
    path = f"{s.path}/logs"
    text = await lines_shown(web, path, 4)
    assert 'aria-current="page">Logs<' in text
    assert 'role="log"' in text
    access = re.search(r'<span class="line stream-access"[^>]*>(.*?)\n</span>', text, re.S)
    assert access and "[req-1]" in access.group(1) and "200 3.1 ms" in access.group(1)
    assert s.replica in access.group(1) and "build 1" in access.group(1)
    assert '<span class="line stream-stderr"' in text, "stderr is marked apart"
    assert "&lt;model&gt;" in (await web.get(path)).text, "a line's text is text, not markup"
    # Filtered by replica: only its lines, and the filter stays in the form.
    other = await lines_shown(web, path, 1, replica="otherrep")
    assert "from another replica" in other and "loading the" not in other
    assert 'name="replica" value="otherrep"' in other
    assert "replica=otherrep" in live_url(other), "following keeps the filter"
    mine = await lines_shown(web, path, 3, replica=s.replica, build="1")
    assert "from another replica" not in mine
    assert await lines_shown(web, path, 1, tail="1")


def appended(sent: list[dict[str, str]]) -> list[str]:
    """The texts of the lines appended so far, in order."""
    out = []
    for data in sent:
        assert data["id"] == "log-lines"
        out += re.findall(r'<span class="x">(.*?)</span>', html.unescape(data["html"]))
    return out


async def test_the_live_log_sends_each_new_line_once_and_none_already_shown(
    web: Web, served: Served
) -> None:
    s = served
    s.fake.report(say(s, s.replica, 0, "first"), say(s, s.replica, 1, "second"))
    path = f"{s.path}/logs"
    page = await lines_shown(web, path, 2)
    url = live_url(page)
    assert url.startswith(f"{path}/live?") and "after=" in url

    sent: list[dict[str, str]] = []

    async def follow(into: list[dict[str, str]], headers: Mapping[str, str] | None) -> None:
        async for name, data in web.events(url, headers):
            if name == "append":
                into.append(data)

    task = asyncio.create_task(follow(sent, None))
    try:
        s.fake.report(say(s, s.replica, 2, "third"))
        await eventually("the new line appended", lambda: "third" in appended(sent), 10)
        s.fake.report(say(s, s.replica, 3, "fourth"))
        await eventually("the next line appended", lambda: "fourth" in appended(sent), 10)
        assert appended(sent) == ["third", "fourth"], "each new line once, none shown before"
        ids = [int(i) for d in sent for i in re.findall(r'id="line-(\d+)"', d["html"])]
        assert ids == sorted(set(ids)) and len(ids) == 2
    finally:
        task.cancel()

    # A browser that reconnects names the last line it got: it gets only what came after.
    resumed: list[dict[str, str]] = []
    task = asyncio.create_task(follow(resumed, {"last-event-id": str(ids[-1])}))
    try:
        s.fake.report(say(s, s.replica, 4, "fifth"))
        await eventually("the line after the reconnect", lambda: "fifth" in appended(resumed), 10)
        assert appended(resumed) == ["fifth"]
    finally:
        task.cancel()


# ---- Operations ------------------------------------------------------------------------------


async def test_operations_list_builds_and_deploys_with_their_outcome_and_reason(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        model = await c.create_model(project, "ops")
        built = await c.wait(await upload_and_build(c, model.name), timeout_s=30)
        assert built.error is None
        deployed = await c.wait(
            (await c.create_deployment(model.name, built.target, Resources(replicas=1))).name,
            timeout_s=30,
        )
        assert deployed.error is None
        failed = await c.wait(await upload_and_build(c, model.name, "classify"), timeout_s=30)
        assert failed.error is not None
    page = await web.get(f"/{model.name}/operations")
    assert page.status_code == 200
    text = text_of(page)
    assert 'aria-current="page">Operations<' in text
    rows = re.findall(r'<tr id="operation-([^"]+)">', text)
    ids = [op.name.rsplit("/", 1)[-1] for op in (failed, deployed, built)]
    assert rows == ids, "newest first"
    build_row = row_of(text, f"operation-{ids[2]}")
    assert "Build" in build_row and "build 1" in build_row and ">done<" in build_row
    deploy_row = row_of(text, f"operation-{ids[1]}")
    assert "Deploy" in deploy_row and "deployment 1" in deploy_row and ">done<" in deploy_row
    failed_row = row_of(text, f"operation-{ids[0]}")
    assert ">failed<" in failed_row and "build 2" in failed_row
    assert "build 2 failed: function 'classify' not found in model.py" in failed_row
    assert "reason <code>BUILD_FAILED</code>" in failed_row
    assert "code <code>FAILED_PRECONDITION (what it needed was not there)</code>" in failed_row
    assert "/cancel" not in text, "nothing is running: nothing to cancel"


async def test_a_running_operation_is_cancelled_after_a_confirmation(
    web: Web, server: Server, project: str
) -> None:
    assert isinstance(server.backend, FakeBackend)
    server.backend.builds_may_start.clear()  # the build waits: it stays running
    async with Client(server.grpc_address) as c:
        model = await c.create_model(project, "slow")
        op = await upload_and_build(c, model.name)
    op_id = op.rsplit("/", 1)[-1]
    path = f"/{model.name}/operations"
    text = text_of(await web.get(path))
    row = row_of(text, f"operation-{op_id}")
    assert ">running<" in row and ">Cancel</button>" in row
    action = f"{path}/{op_id}/cancel"
    assert f'action="{action}"' in row

    asked = await web.post(action, back=path, confirmed="")
    assert asked.status_code == 200 and "Are you sure?" in asked.text
    assert f"Cancel the build of build 1 (operation {op_id})?" in text_of(asked)
    async with Client(server.grpc_address) as c:
        assert not (await c.get_operation(op)).done, "asking changes nothing"

    r = await web.post(action, back=path)
    assert r.status_code == 303 and r.headers["location"] == path
    after = text_of(await web.get(path))
    assert "Build of build 1 cancelled." in after
    assert ">cancelled<" in row_of(after, f"operation-{op_id}")
    assert "OPERATION_CANCELLED" in after
