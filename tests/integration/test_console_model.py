"""The console's Model Overview and Keys pages over HTTP, against a real server (fake
backend) on SQLite and PostgreSQL: what the Overview shows of a deployed model, Stop and
Restart with their confirmation, Cancel, the live replicas block, the Test Model box's own
answers (the call to a real endpoint is a browser test on Ray), roles, and invocation keys
whose secret is shown once."""

from __future__ import annotations

import asyncio
import hashlib
import html
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from controlplane.api.client import Client
from controlplane.domain.access import Role
from controlplane.domain.states import ModelState, ReplicaState
from controlplane.domain.traffic import Gates, Phase, Strategy, StrategyKind
from controlplane.domain.types import Deployment, DeployOptions, Model, Resources
from controlplane.server import Server
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, MODEL_V2, SLOW_IMPORT, fake_settings, running, zip_bytes
from tests.helpers.console import Web, console_of, field, web_of
from tests.integration.test_console import token_of
from workers.fake_backend import FakeBackend
from workers.model_app import UNAUTHORIZED, KeyCheck, invoke

# The build's import check prints, then sleeps: the build runs until it is cancelled.


async def deploy(
    c: Client, project: str, model_id: str = "iris", replicas: int = 1
) -> tuple[Model, Deployment]:
    """A model of ``project`` built from MODEL_V1 and deployed with ``replicas``, once they
    all run."""
    model = await c.create_model(project, model_id)
    source = await c.upload_source(model.name, zip_bytes({"model.py": MODEL_V1}))
    op = await c.create_build(
        model.name,
        source.sha256,
        "model.py",
        "predict",
        deploy=DeployOptions(Resources(replicas=replicas)),
    )
    done = await c.wait(op.name, timeout_s=30)
    assert done.error is None, done.error
    return await serving(c, model.name, replicas)


async def serving(
    c: Client, name: str, replicas: int, not_ids: frozenset[str] = frozenset()
) -> tuple[Model, Deployment]:
    """The model once DEPLOYED with ``replicas`` running, none of them one of ``not_ids``."""

    async def check() -> tuple[Model, Deployment] | None:
        model = await c.get_model(name)
        if model.state != ModelState.DEPLOYED or model.running_operation:
            return None
        dep = await c.get_deployment(model.active_deployment)
        ids = {r.id for r in dep.replicas}
        ok = (
            len(dep.replicas) == replicas
            and all(r.state == ReplicaState.RUNNING for r in dep.replicas)
            and not ids & not_ids
        )
        return (model, dep) if ok else None

    found = await eventually(f"{name} serving {replicas} replicas", check, timeout=30)
    assert found is not None
    return found


def text_of(page: httpx.Response) -> str:
    """The page as a person reads it: markup's entities back to characters."""
    return html.unescape(page.text)


def overview(project: str, model_id: str = "iris") -> str:
    return f"/{project}/models/{model_id}"


async def test_the_overview_shows_state_replicas_build_and_endpoint(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        model, dep = await deploy(c, project, replicas=3)
    page = await web.get(overview(project))
    assert page.status_code == 200
    text = text_of(page)
    assert 'aria-current="page">Overview<' in text
    assert ">DEPLOYED<" in text and "Every replica runs: the endpoint answers." in text
    assert "build 1" in text
    for replica in dep.replicas:
        assert replica.id in text and str(replica.pid) in text
    assert text.count('<tr class="replica">') == 3
    assert "3 running of 3" in text
    curl = (
        f"curl -X POST {model.endpoint} -H 'Authorization: Bearer <invocation key>' "
        """-H 'Content-Type: application/json' -d '{"x": 1}'"""
    )
    assert f'data-copy="{curl}"' in text, "a ready-to-copy curl line"
    assert "Nothing is running on this model now." in text
    # The buttons say exactly what they will do.
    assert "Restart replaces all 3 replicas of build 1; no code change." in text
    assert (
        "Stop ends all 3 replicas of build 1: the endpoint stops answering until the model "
        "is deployed or restarted." in text
    )
    # The Test Model box, with a key field that does not show what is typed.
    assert 'data-target="test-result"' in text and 'id="test-result"' in text
    assert '<input id="test-key" name="key" type="password"' in text
    assert f'href="{overview(project)}/keys"' in text


async def test_the_overview_shows_a_split_between_two_builds(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        model, _ = await deploy(c, project)
        source = await c.upload_source(model.name, zip_bytes({"model.py": MODEL_V2}))
        op = await c.create_build(model.name, source.sha256, "model.py", "classify")
        b2 = (await c.wait(op.name, timeout_s=30)).target
        op = await c.set_traffic(model.name, {f"{model.name}/builds/1": 90, b2: 10}, "X-User")
        assert (await c.wait(op.name, timeout_s=30)).error is None
    text = text_of(await web.get(overview(project)))
    assert "build 1 90% · build 2 10% · sticky by X-User" in text


async def test_a_canary_is_promoted_or_aborted_from_the_overview(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        model, _ = await deploy(c, project)
        source = await c.upload_source(model.name, zip_bytes({"model.py": MODEL_V2}))
        op = await c.create_build(model.name, source.sha256, "model.py", "classify")
        b2 = (await c.wait(op.name, timeout_s=30)).target
        path = overview(project)
        canary = Strategy(StrategyKind.CANARY, (10, 50), 600.0, Gates(max_error_rate=0.01))
        for how in ("abort", "promote"):
            op = await c.create_deployment(model.name, b2, rollout=canary)

            async def baking(name: str = op.name) -> bool:
                got = await c.get_operation(name)
                return got.rollout is not None and got.rollout.phase is Phase.BAKING

            await eventually("the canary's first step", baking)
            text = text_of(await web.get(path))
            assert "step 1/2: 10% to build 2" in text
            assert "Promote now" in text and "Abort rollout" in text
            if how == "abort":
                r = await web.post(f"{path}/cancel", back=path, operation=op.name)
                assert r.status_code == 303
                done = await c.wait(op.name, timeout_s=30)
                assert done.error is not None and done.error.code == "CANCELLED"
            else:
                asked = await web.post(
                    f"{path}/promote", back=path, operation=op.name, confirmed=""
                )
                assert "Promote now (step 1/2" in asked.text
                r = await web.post(f"{path}/promote", back=path, operation=op.name)
                assert r.status_code == 303
                done = await c.wait(op.name, timeout_s=30)
                assert done.error is None, done.error
        m = await c.get_model(model.name)
        assert (await c.get_deployment(m.active_deployment)).build == b2


async def test_a_model_that_does_not_exist_is_not_found_in_words(web: Web, project: str) -> None:
    page = await web.get(overview(project, "nope"))
    assert page.status_code == 404
    assert "Not found" in page.text and "Traceback" not in page.text


async def test_stop_asks_first_then_stops_the_model(web: Web, server: Server, project: str) -> None:
    async with Client(server.grpc_address) as c:
        model, _ = await deploy(c, project, replicas=1)
        path = overview(project)

        asked = await web.post(f"{path}/stop", back=path, confirmed="")
        assert asked.status_code == 200
        question = (
            "Stop ends the only replica of build 1: the endpoint stops answering until the "
            "model is deployed or restarted."
        )
        assert question in text_of(asked)
        assert "Are you sure?" in asked.text
        assert field(asked.text, "back") == path, "OK sends the same form again"
        still = await c.get_model(model.name)
        assert still.state == ModelState.DEPLOYED and not still.running_operation

        r = await web.post(f"{path}/stop", back=path)
        assert r.status_code == 303 and r.headers["location"] == path
        page = await web.get(path)
        started = re.search(r"Stopping iris: operation (operations/\S+) started\.", page.text)
        assert started, "the flash names the operation"

        stopped = await c.wait(started.group(1), timeout_s=30)
        assert stopped.error is None
        assert (await c.get_model(model.name)).state == ModelState.STOPPED
    page = await web.get(path)
    assert ">STOPPED<" in page.text and "No replica runs." in page.text
    assert f'action="{path}/stop"' not in page.text, "no Stop for a stopped model"
    assert "Restart starts build 1 again with 1 replica" in page.text


async def test_restart_gives_every_replica_a_new_id(web: Web, server: Server, project: str) -> None:
    async with Client(server.grpc_address) as c:
        model, before = await deploy(c, project, replicas=2)
        path = overview(project)
        r = await web.post(f"{path}/restart", back=path)
        assert r.status_code == 303 and r.headers["location"] == path
        page = await web.get(path)
        assert re.search(r"Restarting iris: operation operations/\S+ started\.", page.text)
        old = frozenset(r.id for r in before.replicas)
        _, after = await serving(c, model.name, 2, not_ids=old)
        assert after.name == before.name, "the same deployment: no code change"
    page = await web.get(path)
    for replica in after.replicas:
        assert replica.id in page.text
    for gone in old:
        assert gone not in page.text


async def test_the_replicas_block_follows_a_change_made_elsewhere(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        model, before = await deploy(c, project, replicas=1)
        swaps: dict[str, list[str]] = {}

        async def follow() -> None:
            async for name, data in web.events(f"{overview(project)}/live"):
                if name == "swap":
                    swaps.setdefault(data["id"], []).append(data["html"])

        task = asyncio.create_task(follow())
        try:
            blocks = {"model-actions", "model-status", "replicas", "operation"}
            # One update is several swaps, sent one after another: all of them, and no other.
            await eventually("the first update", lambda: set(swaps) >= blocks, timeout=5)
            assert set(swaps) == blocks
            assert before.replicas[0].id in swaps["replicas"][-1]

            op = await c.restart_model(model.name)
            await c.wait(op.name, timeout_s=30)
            _, after = await serving(c, model.name, 1, not_ids=frozenset({before.replicas[0].id}))
            new = after.replicas[0].id

            def shown() -> bool:
                last = swaps["replicas"][-1]
                return new in last and before.replicas[0].id not in last

            await eventually("the new replica on the open page", shown, timeout=2)
        finally:
            task.cancel()


async def test_a_running_build_is_cancelled_from_the_overview(
    web: Web, server: Server, project: str
) -> None:
    assert isinstance(server.backend, FakeBackend)
    async with Client(server.grpc_address) as c:
        model = await c.create_model(project, "slow")
        source = await c.upload_source(model.name, zip_bytes({"model.py": SLOW_IMPORT}))
        op = await c.create_build(model.name, source.sha256, "model.py", "predict")
        path = overview(project, "slow")
        page = await web.get(path)
        assert op.name in page.text
        assert "Cancel building build 1" in page.text

        asked = await web.post(f"{path}/cancel", back=path, operation=op.name, confirmed="")
        assert "Cancel building build 1" in asked.text
        assert not (await c.get_operation(op.name)).done, "nothing happens before OK"

        r = await web.post(f"{path}/cancel", back=path, operation=op.name)
        assert r.status_code == 303
        done = await c.wait(op.name, timeout_s=30)
        assert done.error is not None and done.error.code == "CANCELLED"
        assert f"Operation {op.name} cancelled." in (await web.get(path)).text


async def test_an_operation_of_another_model_is_not_cancelled_here(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        await c.create_model(project, "iris")
        other = await c.create_model(project, "slow")
        source = await c.upload_source(other.name, zip_bytes({"model.py": SLOW_IMPORT}))
        op = await c.create_build(other.name, source.sha256, "model.py", "predict")
        try:
            path = overview(project)
            r = await web.post(f"{path}/cancel", back=path, operation=op.name)
            assert r.status_code == 303
            page = await web.get(path)
            assert f"is not an operation of {project}/models/iris" in page.text
            assert not (await c.get_operation(op.name)).done
        finally:  # its own model's page cancels it
            slow = overview(project, "slow")
            await web.post(f"{slow}/cancel", back=slow, operation=op.name)
            assert (await c.wait(op.name, timeout_s=30)).error is not None


async def test_the_test_box_refuses_bad_json_and_sends_nothing(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        await c.create_model(project, "iris")
    r = await web.post(f"{overview(project)}/test", body='{"x": 1,', key="", target="test-result")
    assert r.status_code == 200
    assert r.text.startswith('<div id="test-result"'), "the piece replaces the result box"
    assert "The request is not JSON" in r.text and "nothing was sent" in r.text


async def test_the_test_box_says_when_the_endpoint_cannot_be_reached(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        model = await c.create_model(project, "iris")
    # The fake backend serves no HTTP: its endpoints are on port 0, which nothing answers.
    r = await web.post(
        f"{overview(project)}/test", body='{"x": 1}', key="mlk_x", target="test-result"
    )
    assert r.status_code == 200
    text = text_of(r)
    assert f"The endpoint {model.endpoint} could not be reached" in text
    assert "The model is NOT_DEPLOYED." in text
    assert "Traceback" not in text


class StandIn:
    """A model endpoint without Ray: replies as a replica does (``workers.model_app``),
    with an echo model, and lets in only ``key``."""

    def __init__(self, key: str) -> None:
        self.door = KeyCheck()
        self.door.configure({"open": False, "keys": [hashlib.sha256(key.encode()).hexdigest()]})
        self.seen: list[tuple[str, bytes]] = []  # (path, body) of each request
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        lowered = {k.lower(): v for k, v in headers.items()}
        body = await reader.readexactly(int(lowered.get("content-length", "0")))
        self.seen.append((lines[0].split(" ")[1], body))
        if self.door.allows(lowered.get("authorization")):
            reply = invoke(lambda b: {"echo": b}, body, "replica-7", "builds/1")
        else:
            reply = UNAUTHORIZED
        writer.write(
            f"HTTP/1.1 {reply.status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(reply.body)}\r\nconnection: close\r\n\r\n".encode()
            + reply.body
        )
        await writer.drain()
        writer.close()


async def test_the_test_box_shows_the_reply_and_who_answered(
    fresh_db: str, tmp_path: Path, project: str
) -> None:
    stand_in = StandIn("mlk_right")
    endpoint = await asyncio.start_server(stand_in.serve, "127.0.0.1", 0)
    port = endpoint.sockets[0].getsockname()[1]
    settings = fake_settings(fresh_db, tmp_path)
    backend = FakeBackend(num_gpus=2, http_base=f"http://127.0.0.1:{port}")
    async with endpoint, Server(settings, backend=backend) as srv:
        async with Client(srv.grpc_address) as c:
            model = await c.create_model(project, "iris")
        async with (
            console_of(srv.grpc_address) as console,
            web_of(console, project=project.removeprefix("projects/")) as web,
        ):
            test = f"{overview(project)}/test"
            r = await web.post(test, body='{"x": [1, 2]}', key="mlk_right", target="test-result")
            text = text_of(r)
            assert stand_in.seen == [(f"/{model.name.split('/')[1]}/iris", b'{"x": [1, 2]}')]
            assert ">200<" in text
            assert "<code>replica-7</code>" in text and "build 1" in text
            assert '"echo": {\n' in text, "the reply, pretty-printed"

            r = await web.post(test, body="{}", key="mlk_wrong", target="test-result")
            assert ">401<" in r.text and "create one on the Keys page" in r.text


async def test_the_test_box_needs_the_csrf_token(web: Web, project: str) -> None:
    r = await web.post(f"{overview(project)}/test", body="{}", csrf="")
    assert r.status_code == 403


async def test_keys_show_a_new_secret_once_and_revoke(
    web: Web, server: Server, project: str
) -> None:
    async with Client(server.grpc_address) as c:
        model = await c.create_model(project, "iris")
        keys = f"{overview(project)}/keys"
        empty = await web.get(keys)
        assert empty.status_code == 200
        assert 'aria-current="page">Keys<' in empty.text
        assert "no invocation keys yet" in empty.text

        r = await web.post(keys, description="nightly check", back=keys)
        assert r.status_code == 303 and r.headers["location"] == keys
        page = await web.get(keys)
        assert "will not be shown again" in page.text
        secret = re.search(r'data-copy="(mlk_([0-9a-f]{16})_[^"]+)"', page.text)
        assert secret, "the secret, with a copy button"
        listed = (await c.list_invocation_keys(model.name)).items
        assert [(k.name.rsplit("/", 1)[-1], k.description) for k in listed] == [
            (secret.group(2), "nightly check")
        ]
        again = await web.get(keys)
        assert secret.group(1) not in again.text, "the secret is shown once"
        assert "nightly check" in again.text

        key_id = secret.group(2)
        revoke = f"{keys}/{key_id}/revoke"
        asked = await web.post(revoke, back=keys, confirmed="")
        question = f"Revoke key {key_id}? Requests that send it get 401 within seconds"
        assert question in text_of(asked)
        assert not (await c.list_invocation_keys(model.name)).items[0].revoked

        r = await web.post(revoke, back=keys)
        assert r.status_code == 303
        assert (await c.list_invocation_keys(model.name)).items[0].revoked
        page = await web.get(keys)
        assert f"Invocation key {key_id} revoked." in page.text
        assert ">revoked<" in page.text and f'action="{revoke}"' not in page.text


@pytest.fixture
async def secured(fresh_db: str, tmp_path: Path) -> AsyncIterator[Server]:
    async with running(fake_settings(fresh_db, tmp_path, insecure_no_auth=False)) as srv:
        yield srv


async def test_a_viewer_cannot_stop_a_model_even_by_hand(secured: Server) -> None:
    admin = (secured.settings.data_dir / "admin.token").read_text().strip()
    viewer = await token_of(secured, Role.VIEWER)
    async with (
        Client(secured.grpc_address, token=admin) as c,
        console_of(secured.grpc_address) as console,
        web_of(console, viewer) as web,
    ):
        model, _ = await deploy(c, "projects/default", replicas=1)
        key, _ = await c.create_invocation_key(model.name, "ci")
        path = "/projects/default/models/iris"
        page = await web.get(path)
        assert page.status_code == 200 and ">DEPLOYED<" in page.text
        for verb in ("stop", "restart"):
            assert f'action="{path}/{verb}"' not in page.text, f"no {verb} button"

        r = await web.post(f"{path}/stop", back=path)  # a hand-made, confirmed POST
        assert r.status_code == 303
        refused = await web.get(path)
        assert "Not allowed:" in refused.text and "Traceback" not in refused.text
        assert (await c.get_model(model.name)).state == ModelState.DEPLOYED

        keys = await web.get(f"{path}/keys")
        assert keys.status_code == 200 and "<td>ci</td>" in keys.text
        assert "Create a key" not in keys.text and "/revoke" not in keys.text
        r = await web.post(f"{path}/keys/{key.name.rsplit('/', 1)[-1]}/revoke", back=path)
        assert r.status_code == 303
        assert "Not allowed:" in (await web.get(path)).text
        assert not (await c.list_invocation_keys(model.name)).items[0].revoked
