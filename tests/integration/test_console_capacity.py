"""The Re-deploy form's plan and Scale with load, over HTTP against a real server (fake
backend: one node of 8 CPUs, 16 GiB and 2 GPUs) on SQLite and PostgreSQL: the plan shown is
the server's (CreateDeployment with validate_only) and writes nothing; a change with no
room is refused until sent with Deploy anyway (wait for capacity); autoscaling bounds
deploy as typed, and the server's refusal of bad bounds stands beside those fields; the
Overview shows the model's scale and its last decision."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html import unescape
from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.domain.scaling import Autoscaling
from controlplane.server import Server
from tests.helpers import eventually
from tests.helpers.api import fake_settings, running
from tests.helpers.console import Web, console_of, web_of
from tests.integration.test_console_deploy import deployed_model, finished, serving_now
from workers.backend import app_name_for
from workers.fake_backend import FakeBackend

# The Re-deploy form as a browser sends it for deployed_model's deployment 1, unchanged.
FORM = {
    "replicas": "1",
    "cpus": "0",
    "memory_mib": "0",
    "gpus": "0",
    "min_replicas": "1",
    "max_replicas": "2",
    "target_ongoing_requests": "2",
    "environment": "FOO=bar",
    "secret_mode": "keep",
    "secret_environment": "",
}


def text_of(html: str) -> str:
    """What a person reads: the tags gone, the spaces collapsed (hidden elements too:
    check those by their markup)."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split()).replace(" :", ":")


def field_message(html: str, name: str) -> str:
    """The message shown beside the form's field ``name`` (empty: none)."""
    found = re.search(rf'<span class="field-error" id="{name}-error" [^>]*>([^<]*)</span>', html)
    assert found, f"no message element beside {name}"
    return unescape(found.group(1))


async def plan(web: Web, base: str, **fields: str) -> str:
    """The plan block for the form with ``fields`` changed, as the page's script asks."""
    r = await web.post(f"{base}/1/plan", **{**FORM, **fields})
    assert r.status_code == 200, r.text
    return r.text


async def records(server: Server, model: str) -> tuple[object, ...]:
    """Everything a deploy writes: the model, its deployments and operations."""
    async with Client(server.grpc_address) as c:
        m = await c.get_model(model)
        deployments = (await c.list_deployments(model)).items
        operations = (await c.list_operations(model)).items
    return m.etag, m.active_deployment, [d.name for d in deployments], [o.name for o in operations]


async def test_the_form_shows_the_servers_plan_and_showing_it_writes_nothing(
    web: Web, server: Server, project: str
) -> None:
    model, first = await deployed_model(server, project, "planned")
    base = f"/{project}/models/planned/deployments"
    before = await records(server, model)

    page = await web.get(f"{base}/1/redeploy")
    assert page.status_code == 200
    shown = text_of(page.text)
    assert "What Deploy Model will do" in shown
    assert "Nothing changes for the replicas: they keep serving in place" in shown
    assert "Kept 1 Replaced 0 Removed 0 Added 0 After 1" in shown
    assert "Fits: no new replica needs room." in shown
    assert 'id="deploy-anyway" hidden' in page.text, "room enough: no Deploy anyway"

    more = await plan(web, base, replicas="3")
    assert 'class="plan-head plan-in-place"' in more
    shown = text_of(more)
    assert "Scales in place from 1 to 3 replicas: the running replicas keep their ids" in shown
    assert "Replicas: 1 → 3" in shown and 'title="resources.replicas"' in more
    assert "Kept 1 Replaced 0 Removed 0 Added 2 After 3" in shown
    assert "Fits: 2 replicas to start (0 CPU each) have room." in shown
    assert "fake-node" in shown and "8 / 8" in shown and "2 / 2" in shown

    cpu = await plan(web, base, cpus="0.5")
    assert 'class="plan-head plan-roll"' in cpu
    shown = text_of(cpu)
    assert "Rolls: 1 replica of the new spec start" in shown and "in place" not in shown
    assert "CPUs: 0 → 0.5" in shown and 'title="resources.cpus"' in cpu
    assert "Kept 0 Replaced 1 Removed 0 Added 0 After 1" in shown
    # The replica it replaces gives its room back: the node's 8 CPUs are all free.
    assert "Fits: 1 replica to start (0.5 CPU each) has room." in shown

    env = text_of(await plan(web, base, environment="FOO=baz\nMODE=fast"))
    assert "Environment FOO: bar → baz" in env and "Environment MODE: (unset) → fast" in env
    secret = text_of(
        await plan(web, base, secret_mode="new", secret_environment="KEY=another-value")
    )
    assert "Secret KEY: (set) → (changed)" in secret and "another-value" not in secret

    # Each plan above was the server's answer to a validate_only request: nothing written.
    assert await records(server, model) == before
    async with Client(server.grpc_address) as c:
        now = await c.get_deployment(first.name)
        assert {r.id for r in now.replicas} == {r.id for r in first.replicas}


@pytest.fixture
async def patient(database_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    """A server whose deploys wait a minute for room (the tests' default is 1 s)."""
    async with running(fake_settings(database_url, tmp_path, placement_timeout_s=60)) as srv:
        yield srv


async def test_a_change_with_no_room_says_so_and_deploys_only_when_told_to_wait(
    patient: Server, project: str
) -> None:
    project_id = project.removeprefix("projects/")
    async with console_of(patient.grpc_address) as console, web_of(console, "", project_id) as web:
        await no_room(web, patient, project)


async def no_room(web: Web, server: Server, project: str) -> None:
    model, _ = await deployed_model(server, project, "greedy")
    base = f"/{project}/models/greedy/deployments"
    before = await records(server, model)

    shown = await plan(web, base, gpus="4")  # the fake cluster has 2 GPUs
    assert 'class="fit fit-no" data-no-room' in shown
    words = text_of(shown)
    assert "Does not fit: 1 of 1 new replicas (0 CPU, 4 GPU each) fit on no node" in words
    assert "free now: fake-node 8/8 CPU 2/2 GPU" in words
    assert "Deploy anyway (wait for capacity) starts it all the same" in words
    assert "fake-node 8 / 8 2 / 2 16384 / 16384 0" in words, "the node's row: nothing placed"

    # Deploy Model: refused by the server, the form back with its plan and the choice.
    r = await web.post(f"{base}/1/redeploy", **{**FORM, "gpus": "4"})
    assert r.status_code == 409, r.text[-2000:]
    words = text_of(r.text)
    assert "Not now:" in words and "the cluster has no room for this change" in words
    assert "Deploy anyway (wait for capacity), below, sends it all the same." in words
    assert "Does not fit:" in words
    assert re.search(r'<button type="submit" name="wait_for_capacity" value="yes"[^>]*>', r.text)
    assert 'id="deploy-anyway">' in r.text, "Deploy anyway is shown"
    assert await records(server, model) == before, "nothing deployed"

    # Deploy anyway (wait for capacity): the deploy starts, its replica waiting for room.
    r = await web.post(f"{base}/1/redeploy", **{**FORM, "gpus": "4"}, wait_for_capacity="yes")
    assert r.status_code == 303, r.text[-2000:]
    overview = await web.get(r.headers["location"])
    assert "Deploying build 1 with 1 replica (its new replicas wait for room on the cluster)" in (
        text_of(overview.text)
    )
    async with Client(server.grpc_address) as c:
        deployments = (await c.list_deployments(model)).items
        assert len(deployments) == 2 and deployments[0].resources.gpus == 4
        running_now = (await c.get_model(model)).running_operation
    assert running_now, "the deploy waits for room (a minute on this server)"
    # Meanwhile the form's plan is the server's refusal: one change at a time.
    busy = text_of(await plan(web, base, replicas="2"))
    assert f"Not now: operation {running_now} is running on this model" in busy


async def test_scale_with_load_deploys_its_bounds_and_the_overview_shows_the_scale(
    web: Web, server: Server, project: str
) -> None:
    model, first = await deployed_model(server, project, "elastic")
    base = f"/{project}/models/elastic/deployments"
    scaled = {"autoscale": "yes", "min_replicas": "1", "max_replicas": "3"}
    scaled |= {"target_ongoing_requests": "4"}

    form = await web.get(f"{base}/1/redeploy")
    assert 'id="autoscale" name="autoscale" value="yes" aria-describedby' in form.text
    assert 'id="max_replicas" name="max_replicas" type="number"' in form.text

    shown = await plan(web, base, **scaled)
    assert 'class="plan-head plan-in-place"' in shown
    words = text_of(shown)
    assert "Changes in place: the replica keeps serving, with its id." in words
    assert "Replicas: 1 → autoscaling 1-3" in words
    assert "Scaling with load, the cluster has room for 3 replicas now." in words

    # Bounds the server refuses: its message beside the field, on the plan and on Deploy.
    bad = {**scaled, "max_replicas": "0"}
    refused = await plan(web, base, **bad)
    message = "Max replica count must be between max(1, min_replicas) and 100, got 0"
    assert message in text_of(refused)
    assert f'<p hidden data-field-error="max_replicas">{message}</p>' in unescape(refused)
    r = await web.post(f"{base}/1/redeploy", **{**FORM, **bad})
    assert r.status_code == 400
    assert field_message(r.text, "max_replicas") == message
    assert field_message(r.text, "min_replicas") == ""
    assert 'aria-describedby="max_replicas-error" aria-invalid="true"' in r.text
    start = {**scaled, "min_replicas": "2", "replicas": "1"}
    r = await web.post(f"{base}/1/redeploy", **{**FORM, **start})
    assert r.status_code == 400
    assert field_message(r.text, "replicas") == (
        "Replicas with autoscaling, 0 or within 2..3 (the count to start with), got 1"
    )
    r = await web.post(f"{base}/1/redeploy", **{**FORM, **scaled, "max_replicas": "many"})
    assert r.status_code == 400
    assert field_message(r.text, "max_replicas") == (
        "Max replica count: “many” is not a whole number"
    )
    async with Client(server.grpc_address) as c:
        assert len((await c.list_deployments(model)).items) == 1, "nothing deployed"

    r = await web.post(f"{base}/1/redeploy", **{**FORM, **scaled})
    assert r.status_code == 303, r.text[-2000:]
    overview = await web.get(r.headers["location"])
    assert "Deploying build 1 with 1 to 3 replicas, scaling with load: operation" in (
        text_of(overview.text)
    )
    async with Client(server.grpc_address) as c:
        await finished(c, model)
        now = await serving_now(c, model)
        assert now.resources.autoscaling == Autoscaling(1, 3, 4.0)
        assert {r.id for r in now.replicas} == {r.id for r in first.replicas}, "in place"
    listed = text_of((await web.get(base)).text)
    assert "scales with load: 1 to 3, 4 in flight each" in listed
    again = await web.get(f"{base}/2/redeploy")
    assert 'id="autoscale" name="autoscale" value="yes" checked' in again.text
    assert 'name="target_ongoing_requests" type="number" min="0" step="any" value="4"' in (
        again.text
    )

    async def overview_says(*words: str) -> str:
        page = text_of((await web.get(f"/{project}/models/elastic")).text)
        assert all(w in page for w in words), page
        return page

    await overview_says(
        "Replicas 1 running of 1 wanted · autoscaling",
        "Last scaling 1 → 1,",
        "deployment 2: autoscaling 1-3 replicas, target 4 in flight per replica",
    )
    fake = server.backend
    assert isinstance(fake, FakeBackend)
    fake.load[app_name_for(project.split("/")[1], "elastic")] = 10.0  # 10 at 4 each: 3
    page = await eventually(
        "the autoscaler's 3 replicas on the Overview",
        lambda: overview_says(
            "Replicas 3 running of 3 wanted · autoscaling",
            "Last scaling 1 → 3,",
            "above the target of 4",
        ),
    )
    assert "ago: autoscaler:" in page


async def test_a_fixed_count_model_shows_its_scale_without_autoscaling(
    web: Web, server: Server, project: str
) -> None:
    await deployed_model(server, project, "fixed")

    async def shown() -> str:
        page = text_of((await web.get(f"/{project}/models/fixed")).text)
        assert "Replicas 1 running of 1 wanted" in page, page
        return page

    page = await eventually("the scale on the Overview", shown)
    assert "· autoscaling" not in page
    assert "Last scaling 0 → 1," in page or "Last scaling 1 → 1," in page
    assert "deployment 1: fixed at 1 replicas" in page


async def test_the_plan_needs_the_forms_csrf_token(web: Web, server: Server, project: str) -> None:
    await deployed_model(server, project, "guarded")
    path = f"/{project}/models/guarded/deployments/1/plan"
    r = await web.http.post(path, data={**FORM, "csrf": "stale"})
    assert r.status_code == 403 and "CSRF" in r.text
    async with httpx.AsyncClient(base_url=str(web.http.base_url)) as stranger:
        r = await stranger.post(path, data=FORM)
    assert r.status_code == 303 and r.headers["location"].startswith("/sign-in")
