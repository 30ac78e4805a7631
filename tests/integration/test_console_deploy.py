"""The console's Deployments, Deploy New Build and Builds pages over HTTP, against a real
server (fake backend) on SQLite and PostgreSQL: what a user does and then checks, each
result read back through the API."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
from collections.abc import AsyncIterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.domain.access import Role
from controlplane.domain.states import ModelState, ReplicaState
from controlplane.domain.types import (
    Deployment,
    DeployOptions,
    Operation,
    Resources,
)
from controlplane.server import Server
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, fake_settings, running, zip_bytes
from tests.helpers.console import Web, console_of, web_of

HELPED = "import helper\n\ndef classify(body):\n    return {'label': helper.LABEL, 'echo': body}\n"
Files = list[tuple[str, tuple[str, bytes, str]]]


def serving(**fields: str) -> dict[str, str]:
    """The Deploy New Build form's fields as a browser sends them (a deploy of 1 replica)."""
    return {
        "file_path": "model.py",
        "function_name": "predict",
        "comment": "",
        "deploy": "yes",
        "replicas": "1",
        "cpus": "0",
        "memory_mib": "0",
        "gpus": "0",
        "environment": "",
        "secret_mode": "keep",
        "secret_environment": "",
        **fields,
    }


def a_zip(files: dict[str, str] | None = None) -> Files:
    data = zip_bytes(files or {"model.py": MODEL_V1})
    return [("source_zip", ("code.zip", data, "application/zip"))]


async def deploy_new(web: Web, project: str, files: Files, **fields: str) -> httpx.Response:
    """Deploy New Build's form sent as multipart, with this session's CSRF token."""
    data = {"csrf": web.csrf, **serving(**fields)}
    return await web.http.post(f"/{project}/deploy", data=data, files=files)


async def finished(c: Client, model: str) -> Operation:
    """The model's newest operation, once done and successful."""
    newest = (await c.list_operations(model, 1)).items[0]
    op = await c.wait(newest.name, timeout_s=60)
    assert op.error is None, op.error
    return op


async def serving_now(c: Client, model: str) -> Deployment:
    """The model's active deployment once DEPLOYED with every replica running."""

    async def deployed() -> Deployment:
        m = await c.get_model(model)
        assert m.state == ModelState.DEPLOYED and not m.running_operation, m
        d = await c.get_deployment(m.active_deployment)
        running = [r for r in d.replicas if r.state == ReplicaState.RUNNING]
        assert len(running) == d.resources.replicas == len(d.replicas), d
        return d

    return await eventually(f"{model} deployed", deployed, timeout=30)


async def until_done(web: Web, path: str) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    async with asyncio.timeout(60):
        async for name, data in web.events(path):
            seen.append((name, data))
            assert name not in ("failed", "signed-out"), data
            if name == "done":
                return seen
    raise AssertionError(f"the stream ended without done: {seen}")


async def deployed_model(
    server: Server, project: str, model_id: str = "iris", token: str = ""
) -> tuple[str, Deployment]:
    """A model built and deployed through the API: 1 replica, FOO=bar, a secret KEY."""
    async with Client(server.grpc_address, token=token) as c:
        model = (await c.create_model(project, model_id)).name
        source = await c.upload_source(model, zip_bytes({"model.py": MODEL_V1}))
        deploy = DeployOptions(Resources(replicas=1), {"FOO": "bar"}, {"KEY": "s3cr3t-value"})
        op = await c.create_build(model, source.sha256, "model.py", "predict", deploy=deploy)
        done = await c.wait(op.name, timeout_s=60)
        assert done.error is None, done.error
        return model, await serving_now(c, model)


# ---- Deploy New Build -----------------------------------------------------------------------


async def test_deploy_a_new_build_from_a_zip_and_follow_it_live(
    web: Web, server: Server, project: str
) -> None:
    r = await deploy_new(
        web,
        project,
        a_zip(),
        model_id="iris",
        replicas="2",
        environment="FOO=bar\n# a comment\n\nMODE = fast",
        secret_mode="new",
        secret_environment="API_KEY=s3cret",
    )
    assert r.status_code == 303, r.text
    target = urlsplit(r.headers["location"])
    assert target.path == f"/{project}/models/iris/builds/1"
    assert target.query.startswith("operation=operations/")

    # The build page follows the build's log and the operation to its end, live.
    seen = await until_done(web, f"{target.path}/log?{target.query}")
    appended = "".join(d["html"] for n, d in seen if n == "append")
    swaps = [d["html"] for n, d in seen if n == "swap" and d["id"] == "operation-progress"]
    assert seen[-1][0] == "done"
    assert "Go to the model Overview" in swaps[-1] and 'href="/' + project in swaps[-1]

    model = f"{project}/models/iris"
    async with Client(server.grpc_address) as c:
        b = await c.get_build(f"{model}/builds/1")
        assert (b.file_path, b.function_name, b.state.value) == ("model.py", "predict", "BUILT")
        lines = [line.text async for line in c.build_logs(b.name)]
        assert lines and all(line in unescape(appended) for line in lines)
        d = await serving_now(c, model)
        assert d.build == b.name and d.resources.replicas == 2
        assert dict(d.environment) == {"FOO": "bar", "MODE": "fast"}
        assert d.secret_environment_keys == ("API_KEY",)

    page = await web.http.get(r.headers["location"])
    assert page.status_code == 200
    assert "Building iris build 1 and deploying it: operation operations/" in page.text
    assert "model.py:predict" in page.text and "BUILT" in page.text


async def test_deploy_a_new_build_from_a_folder_drops_its_top_folder(
    web: Web, server: Server, project: str
) -> None:
    folder: Files = [
        ("source_folder", ("classifier/model.py", HELPED.encode(), "text/x-python")),
        ("source_folder", ("classifier/helper.py", b"LABEL = 'cat'\n", "text/x-python")),
        ("source_folder", ("classifier/__pycache__/helper.cpython-311.pyc", b"\0", "x/y")),
    ]
    async with Client(server.grpc_address) as c:
        await c.create_model(project, "pets")  # an existing model this time
        r = await deploy_new(web, project, folder, model_id="pets", function_name="classify")
        assert r.status_code == 303, r.text
        await finished(c, f"{project}/models/pets")
        b = await c.get_build(f"{project}/models/pets/builds/1")
        assert (b.file_path, b.function_name) == ("model.py", "classify")
        assert b.state.value == "BUILT", b.error  # helper.py sat beside model.py: it imported
        d = await serving_now(c, f"{project}/models/pets")
        assert d.build == b.name and d.resources.replicas == 1


async def test_the_deploy_form_is_prefilled_from_the_model(
    web: Web, server: Server, project: str
) -> None:
    await deployed_model(server, project, "prefill")
    page = await web.get(f"/{project}/models/prefill/deploy")
    assert page.status_code == 200
    assert 'name="model_id"' in page.text and 'value="prefill"' in page.text
    assert "FOO=bar" in page.text
    assert "(KEY)" in page.text and "s3cr3t-value" not in page.text, "secret names only"
    blank = await web.get(f"/{project}/deploy")
    assert blank.status_code == 200 and 'value="model.py"' in blank.text
    assert '<option value="prefill">' in blank.text


async def test_bad_input_is_refused_in_words_and_creates_nothing(
    web: Web, server: Server, project: str
) -> None:
    cases: list[tuple[Files, dict[str, str], str]] = [
        ([], {}, "choose a zip file or a folder"),
        ([("source_zip", ("", b"", "application/octet-stream"))], {}, "choose a zip file"),
        (a_zip(), {"replicas": "0"}, "Replicas must be between 1 and 100, got 0"),
        (a_zip(), {"replicas": "two"}, "Replicas: “two” is not a whole number"),
        (a_zip(), {"cpus": "lots"}, "CPUs: “lots” is not a number"),
        (a_zip(), {"environment": "FOO=1\nNOVALUE"}, "Environment, line 2"),
        (a_zip(), {"environment": "1BAD=x"}, "names are letters, digits and _"),
        (a_zip(), {"secret_mode": "new", "secret_environment": "oops"}, "write it as NAME=VALUE"),
        (a_zip(), {"file_path": "main.py"}, "main.py is not in the code"),
        (a_zip(), {"function_name": "not a name"}, "is not a Python function name"),
        (a_zip(), {"model_id": "Bad_Id"}, "is not a valid id"),
        ([("source_zip", ("code.zip", b"not a zip", "application/zip"))], {}, "not a zip"),
        (a_zip(), {"file_path": "../model.py"}, "is not the path of a .py file"),
    ]
    for files, fields, words in cases:
        r = await deploy_new(web, project, files, **{"model_id": "iris", **fields})
        assert r.status_code == 400, (fields, r.status_code)
        assert words in r.text, (words, r.text[-3000:])
        assert "oops" not in r.text, "a secret line is never repeated"
    # The server's own limit (256 KiB in these tests): its refusal, in words.
    big = {"model.py": MODEL_V1, "weights.txt": os.urandom(400 * 1024).hex()}
    r = await deploy_new(web, project, a_zip(big), model_id="iris")
    assert r.status_code == 400
    assert "Too big: this server takes at most 256.0 KiB of zipped code." in r.text
    async with Client(server.grpc_address) as c:
        assert (await c.list_models(project)).items == [], "nothing was created"


async def test_a_post_without_the_csrf_token_deploys_nothing(
    web: Web, server: Server, project: str
) -> None:
    r = await web.http.post(
        f"/{project}/deploy", data={**serving(), "model_id": "iris", "csrf": ""}, files=a_zip()
    )
    assert r.status_code == 403 and "CSRF" in r.text
    async with Client(server.grpc_address) as c:
        assert (await c.list_models(project)).items == []


# ---- Deployments and Re-deploy this Build ---------------------------------------------------


async def test_redeploy_with_more_replicas_scales_in_place_as_the_plan_says(
    web: Web, server: Server, project: str
) -> None:
    model, first = await deployed_model(server, project, "scaled")
    base = f"/{project}/models/scaled/deployments"
    page = await web.get(base)
    assert page.status_code == 200
    assert 'id="deployment-1"' in page.text and "Re-deploy this Build" in page.text
    assert "FOO=bar" in page.text and "KEY" in page.text and "s3cr3t-value" not in page.text

    form = await web.get(f"{base}/1/redeploy")
    assert form.status_code == 200
    assert 'name="replicas" type="number" min="1" max="100" step="1" required value="1"' in (
        form.text
    )
    assert "FOO=bar</textarea>" in form.text and "Deploy Model" in form.text

    fields = {"replicas": "1", "cpus": "0", "memory_mib": "0", "gpus": "0"}
    fields |= {"environment": "FOO=bar", "secret_mode": "keep"}
    # The server's plan, as the page's script asks for it (tests/integration/
    # test_console_capacity.py has the rest of it).
    more = await web.post(f"{base}/1/plan", **{**fields, "replicas": "3"})
    assert "in place" in more.text and "from 1 to 3 replicas" in more.text
    cpu = await web.post(f"{base}/1/plan", **{**fields, "cpus": "0.5"})
    assert "Rolls" in cpu.text and "in place" not in cpu.text
    assert "CPUs</span>: 0 → 0.5" in cpu.text
    env = await web.post(f"{base}/1/plan", **{**fields, "environment": "FOO=baz"})
    assert "Rolls" in env.text and "Environment FOO</span>: bar → baz" in env.text
    bad = await web.post(f"{base}/1/plan", **{**fields, "replicas": "500"})
    assert "Replicas must be between 1 and 100" in bad.text

    r = await web.post(f"{base}/1/redeploy", **{**fields, "replicas": "3"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/{project}/models/scaled"
    overview = await web.get(r.headers["location"])
    assert "Deploying build 1 with 3 replicas: operation operations/" in overview.text
    async with Client(server.grpc_address) as c:
        await finished(c, model)
        now = await serving_now(c, model)
        assert now.name.endswith("/deployments/2") and now.resources.replicas == 3
        assert now.secret_environment_keys == ("KEY",), "the secrets were kept"
        kept = {r.id for r in first.replicas}
        assert kept <= {r.id for r in now.replicas}, "scaled in place: replica ids kept"

        r = await web.post(f"{base}/2/redeploy", **{**fields, "replicas": "3", "cpus": "0.5"})
        assert r.status_code == 303, r.text
        await finished(c, model)
        rolled = await serving_now(c, model)
        assert rolled.resources.cpus == 0.5
        assert not {r.id for r in now.replicas} & {r.id for r in rolled.replicas}, "rolled"

    listed = await web.get(base)
    assert listed.text.index('id="deployment-3"') < listed.text.index('id="deployment-1"')


async def test_redeploy_with_bad_numbers_says_why_and_deploys_nothing(
    web: Web, server: Server, project: str
) -> None:
    model, _ = await deployed_model(server, project, "strict")
    path = f"/{project}/models/strict/deployments/1/redeploy"
    for fields, words in (
        ({"replicas": "0"}, "Replicas must be between 1 and 100, got 0"),
        ({"replicas": "1.5"}, "Replicas: “1.5” is not a whole number"),
        ({"memory_mib": "-1"}, "Memory (MiB) must be between 0"),
        ({"gpus": "nan"}, "GPUs must be between 0 and 64"),
        ({"environment": "JUST TEXT"}, "Environment, line 1"),
        ({"secret_mode": "new", "secret_environment": ""}, "give NAME=VALUE lines"),
    ):
        form = {"replicas": "2", "cpus": "0", "memory_mib": "0", "gpus": "0", **fields}
        r = await web.post(path, **form)
        assert r.status_code == 400, (fields, r.status_code)
        assert words in r.text, (words, r.text[-2000:])
    async with Client(server.grpc_address) as c:
        assert len((await c.list_deployments(model)).items) == 1, "nothing deployed"


# ---- Builds ---------------------------------------------------------------------------------


async def test_the_builds_pages_and_the_build_log_stream(
    web: Web, server: Server, project: str
) -> None:
    model, _ = await deployed_model(server, project, "logged")
    base = f"/{project}/models/logged/builds"
    listing = await web.get(base)
    assert listing.status_code == 200
    assert 'id="build-1"' in listing.text and "model.py:predict" in listing.text
    assert "BUILT" in listing.text

    page = await web.get(f"{base}/1")
    assert page.status_code == 200
    assert "Build log" in page.text and "data-live" not in page.text, "finished: nothing live"
    async with Client(server.grpc_address) as c:
        lines = [line.text async for line in c.build_logs(f"{model}/builds/1")]
    assert lines

    seen = await until_done(web, f"{base}/1/log")
    kinds = [n for n, _ in seen if n != "swap"]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"append"}, kinds
    html = "".join(d["html"] for n, d in seen if n == "append")
    assert html.count('<span class="log-line">') == len(lines)
    assert all(line in unescape(html) for line in lines)
    assert all(d["id"] == "build-log" for n, d in seen if n == "append")
    later = await until_done(web, f"{base}/1/log?after={len(lines)}")
    assert [n for n, _ in later if n == "append"] == [], "only the lines after `after`"


async def test_the_oci_export_downloads_or_says_why_not(
    web: Web, server: Server, project: str, tmp_path: Path
) -> None:
    await deployed_model(server, project, "exported")
    path = f"/{project}/models/exported/builds/1"
    page = await web.get(path)
    assert "Download OCI export" in page.text
    r = await web.get(f"{path}/export", base=f"oci:{tmp_path / 'no-such-layout'}:1")
    assert r.status_code == 303 and r.headers["location"] == path
    shown = await web.get(path)
    assert "The OCI export did not work. Not now: exporting" in shown.text
    if shutil.which("buildah") is None:
        assert "cannot run buildah" in shown.text
        return
    async with web.http.stream("GET", f"{path}/export", params={"base": "scratch"}) as r:
        assert r.status_code == 200
        assert r.headers["content-disposition"] == (
            'attachment; filename="exported-build-1-oci.tar"'
        )
        data = b"".join([chunk async for chunk in r.aiter_bytes()])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert "index.json" in names and "oci-layout" in names


# ---- roles ----------------------------------------------------------------------------------


@pytest.fixture
async def secured(fresh_db: str, tmp_path: Path) -> AsyncIterator[Server]:
    async with running(fake_settings(fresh_db, tmp_path, insecure_no_auth=False)) as srv:
        yield srv


async def token_of(server: Server, role: Role) -> str:
    admin = (server.settings.data_dir / "admin.token").read_text().strip()
    async with Client(server.grpc_address, token=admin) as c:
        _, secret = await c.create_token("projects/default", role)
    return secret


async def test_a_viewer_cannot_deploy_even_by_hand_made_posts(secured: Server) -> None:
    admin = (secured.settings.data_dir / "admin.token").read_text().strip()
    model, _ = await deployed_model(secured, "projects/default", "guarded", token=admin)
    viewer = await token_of(secured, Role.VIEWER)
    async with console_of(secured.grpc_address) as console, web_of(console, viewer) as web:
        page = await web.get("/projects/default/models/guarded/deployments")
        assert page.status_code == 200 and 'id="deployment-1"' in page.text
        assert "Re-deploy this Build" not in page.text and "Deploy New Build" not in page.text
        build = await web.get("/projects/default/models/guarded/builds/1")
        assert "Download OCI export" not in build.text

        r = await web.post(
            "/projects/default/models/guarded/deployments/1/redeploy",
            replicas="3",
            cpus="0",
            memory_mib="0",
            gpus="0",
            environment="",
            secret_mode="keep",
        )
        assert r.status_code == 403 and "Not allowed" in r.text
        for model_id in ("guarded", "newcomer"):
            r = await deploy_new(web, "projects/default", a_zip(), model_id=model_id)
            assert r.status_code == 403 and "Not allowed" in r.text, r.text[-2000:]
        r = await web.get("/projects/default/models/guarded/builds/1/export", base="scratch")
        assert r.status_code == 303
        assert "Not allowed" in (await web.get(r.headers["location"])).text
    async with Client(secured.grpc_address, token=admin) as c:
        assert [m.name for m in (await c.list_models("projects/default")).items] == [model]
        assert len((await c.list_deployments(model)).items) == 1
        assert len((await c.list_builds(model)).items) == 1


async def test_a_new_build_of_an_autoscaled_model_keeps_its_bounds_and_delays(
    web: Web, server: Server, project: str
) -> None:
    from controlplane.domain.scaling import Autoscaling
    from controlplane.domain.types import Resources

    model = f"{project}/models/auto"
    r = await deploy_new(web, project, a_zip(), model_id="auto")
    assert r.status_code == 303, r.text
    async with Client(server.grpc_address) as c:
        await finished(c, model)
        bounds = Autoscaling(1, 3, target_ongoing_requests=4, downscale_delay_s=5)
        op = await c.create_deployment(
            model, f"{model}/builds/1", Resources(replicas=0, autoscaling=bounds)
        )
        await c.wait(op.name, timeout_s=30)
        # The form is prefilled from it: Scale with load ticked, its bounds, and the
        # delays (which the form does not show) carried.
        page = (await web.get(f"/{project}/models/auto/deploy")).text
        assert 'id="autoscale" name="autoscale" value="yes" checked' in page
        assert 'name="downscale_delay_s" value="5"' in page
        r = await deploy_new(
            web,
            project,
            a_zip(),
            model_id="auto",
            autoscale="yes",
            min_replicas="1",
            max_replicas="3",
            target_ongoing_requests="4",
            upscale_delay_s="30",
            downscale_delay_s="5",
        )
        assert r.status_code == 303, r.text
        await finished(c, model)
        d = await serving_now(c, model)
        assert d.build == f"{model}/builds/2" and d.resources.autoscaling == bounds
