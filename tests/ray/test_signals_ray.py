"""What models do, seen through the API on a real Ray cluster of two nodes.

A head (`ray start --head`) and a second node (`ray start --address`, its own temp dir
and node address 127.0.0.2) on this machine, and a `modelctl serve` joining them: real
replicas on both nodes, real HTTP traffic on 127.0.0.1, and what GetModelMetrics,
StreamModelLogs, Model.health and /metrics say of it, including after a replica is
killed with SIGKILL and after the control plane itself is killed and started again."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually, ray_nodes
from tests.helpers.api import Stub, build, resources
from tests.helpers.servers import Cluster, free_port, metric

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SECRET = "tok-9f8e7d6c5b4a"

MODEL = """
import logging
import os
import time

log = logging.getLogger("busy")
print("loaded on pid", os.getpid())


def predict(body):
    body = body or {}
    print("input", body.get("tag", ""))
    if body.get("secret"):
        print("my key is", os.environ["API_KEY"])
    if body.get("burn"):
        end = time.process_time() + body["burn"]
        while time.process_time() < end:
            pass
    if body.get("sleep"):
        time.sleep(body["sleep"])
    log.warning("answered %s", body.get("tag", ""))
    return {"pid": os.getpid()}
"""

# Build 2: the same, but it raises on every third input.
FLAKY = MODEL.replace(
    '    log.warning("answered',
    '    if body.get("i", 1) % 3 == 0:\n'
    '        raise ValueError("cannot take a multiple of three")\n'
    '    log.warning("answered',
)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[str]:
    with ray_nodes.two_nodes() as address:
        yield address


@dataclass
class World:
    server: Cluster
    stub: Stub
    http: httpx.AsyncClient
    model: pb.Model


@pytest.fixture(scope="module")
async def world(two_nodes: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    data = tmp_path_factory.mktemp("cp-signals")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # the server's driver joins that head
        async for world in _world(two_nodes, data):
            yield world


async def _world(two_nodes: str, data: Path) -> AsyncIterator[World]:
    server = Cluster(
        data / "data",
        f"sqlite:///{data}/cp.db",
        "signals",
        backend="ray",
        extra=[
            f"--ray-address={two_nodes}",
            f"--http-port={free_port()}",
            "--metrics-port=0",
            "--max-queued-requests=2",
            "--deploy-timeout=120",
        ],
    )
    server.start()
    try:
        async with (
            grpc.aio.insecure_channel(server.address) as channel,
            httpx.AsyncClient(timeout=60) as http,
        ):
            stub = Stub(channel)
            model = await stub.CreateModel(
                rpc.CreateModelRequest(parent="projects/obs", model_id="busy")
            )
            # Serve spreads a deployment's replicas over the nodes; half a CPU each leaves
            # room for a rollout's new replicas beside the old ones (surge).
            deploy = rpc.DeployOptions(
                resources=resources(2, cpus=0.5), secret_environment={"API_KEY": SECRET}
            )
            op = await build(stub, model.name, MODEL, deploy=deploy, seconds=300)
            assert not op.HasField("error"), op.error
            model = await stub.GetModel(rpc.GetModelRequest(name=model.name))
            yield World(server, stub, http, model)
    finally:
        server.kill()


async def call(w: World, body: dict[str, Any], request_id: str = "") -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    return await w.http.post(w.model.endpoint, json=body, headers=headers)


async def metrics(w: World, window_s: int = 3600) -> rpc.ModelMetrics:
    from google.protobuf import duration_pb2

    m: rpc.ModelMetrics = await w.stub.GetModelMetrics(
        rpc.GetModelMetricsRequest(
            name=w.model.name, window=duration_pb2.Duration(seconds=window_s)
        )
    )
    return m


async def logs(w: World, **kw: Any) -> list[rpc.ModelLogLine]:
    request = rpc.StreamModelLogsRequest(name=w.model.name, **kw)
    return [line async for line in w.stub.StreamModelLogs(request)]


async def test_replicas_on_both_nodes_report_requests_and_lines(w: World) -> None:
    # Serve's proxy prefers the replicas of its own node while they have room (16 requests
    # at once each): waves of 24 at once reach the other node's replica too (a wave may
    # also meet the queue's limit: those are refused, and counted later).
    answered: dict[str, int] = {}  # request id -> pid

    async def one(rid: str) -> None:
        r = await call(w, {"tag": rid, "sleep": 0.5}, request_id=rid)
        assert r.status_code in (200, 503), r.text
        assert r.headers["x-request-id"] == rid
        if r.status_code == 200:
            answered[rid] = int(r.json()["response"]["pid"])

    for wave in range(10):
        await asyncio.gather(*(one(f"two-nodes-{wave}-{i}") for i in range(24)))
        if len(set(answered.values())) == 2:
            break
    assert len(set(answered.values())) == 2, "both replicas answered"

    dep = await w.stub.GetDeployment(rpc.GetDeploymentRequest(name=w.model.active_deployment))
    placed = {r.id: r.node for r in dep.replicas}
    assert len(set(placed.values())) == 2, f"one replica on each node: {placed}"

    async def both_nodes() -> rpc.ModelMetrics:
        m = await metrics(w)
        assert m.totals.requests >= len(answered), m.totals
        reported = {r.replica_id: r.node for r in m.replicas if r.running and r.totals.requests}
        assert reported == placed, "each replica reports from the node Serve placed it on"
        return m

    m = await eventually("requests counted on both nodes", both_nodes, 30)
    assert m.totals.latency_p50_ms > 0 and m.totals.cpu_requested == 1.0
    assert m.totals.memory_rss_bytes > 50 * 2**20

    async def lines_of(request_id: str) -> list[rpc.ModelLogLine]:
        got = [line for line in await logs(w) if line.request_id == request_id]
        assert {line.stream for line in got} == {"stdout", "log", "access"}, got
        return got

    by_pid = {pid: rid for rid, pid in answered.items()}
    for rid in by_pid.values():  # a request of each replica: its lines carry its id
        got = await eventually(f"the lines of {rid}", functools.partial(lines_of, rid))
        texts = [line.text for line in got]
        assert f"input {rid}" in texts and f"WARNING busy: answered {rid}" in texts
        assert any(t.startswith("200 ") and t.endswith(" ms") for t in texts)
    replicas = {line.replica_id for line in await logs(w) if line.stream == "access"}
    assert len(replicas) == 2
    first = sorted(replicas)[0]
    assert {line.replica_id for line in await logs(w, replica=first)} == {first}


async def test_a_secret_the_model_prints_is_redacted(w: World) -> None:
    r = await call(w, {"secret": True, "tag": "leak"})  # no X-Request-Id: Serve makes one
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    assert request_id

    async def printed() -> rpc.ModelLogLine:
        found = [x for x in await logs(w) if x.request_id == request_id and "my key" in x.text]
        assert len(found) == 1, found
        return found[0]

    line = await eventually("the line with the key", printed, 20)
    assert line.text == "my key is [redacted]"
    assert not any(SECRET in x.text for x in await logs(w))


async def test_a_replica_burning_cpu_shows_it(w: World) -> None:
    async def burn() -> None:
        for _ in range(6):
            r = await call(w, {"burn": 1.0, "tag": "burn"})
            assert r.status_code == 200

    await asyncio.gather(burn(), burn())

    async def busy() -> rpc.ModelMetrics:
        m = await metrics(w, window_s=60)
        used = max(r.totals.cpu_used for r in m.replicas)
        assert used > 0.1, [(r.replica_id, r.totals.cpu_used) for r in m.replicas]
        return m

    await eventually("CPU used shown", busy, 30)


async def test_busy_replicas_refuse_requests_and_health_says_so(w: World) -> None:
    async def slow(i: int) -> int:
        r = await call(w, {"sleep": 3, "tag": f"slow{i}"})
        return r.status_code

    # 2 replicas take 16 each at once and 2 more wait: 80 at once are too many.
    codes = await asyncio.gather(*(slow(i) for i in range(80)))
    assert codes.count(503) > 0 and codes.count(200) > 0, codes

    async def refused() -> rpc.ModelMetrics:
        m = await metrics(w)
        assert m.totals.refused >= codes.count(503), m.totals
        return m

    await eventually("refused requests counted", refused, 30)

    async def health() -> str:
        model = await w.stub.GetModel(rpc.GetModelRequest(name=w.model.name))
        assert model.health.startswith("dropping requests: "), model.health
        return str(model.health)

    said = await eventually("health says so", health, 30)
    assert "refused in the last 5 min at " in said and "replicas busy" in said
    assert await metric(
        w.server.metrics, "modelctl_model_refused_requests_total", model=w.model.name
    ) >= codes.count(503)


async def test_a_build_that_raises_shows_its_error_rate_apart(w: World) -> None:
    deploy = rpc.DeployOptions(resources=resources(2, cpus=0.5))
    op = await build(w.stub, w.model.name, FLAKY, deploy=deploy, seconds=300)
    assert not op.HasField("error"), op.error
    build2 = f"{w.model.name}/builds/2"
    for i in range(1, 31):
        r = await call(w, {"i": i, "tag": f"flaky{i}"})
        assert r.status_code == (500 if i % 3 == 0 else 200), r.text

    async def apart() -> rpc.ModelMetrics:
        m = await metrics(w)
        by_build = {b.build: b.totals for b in m.builds}
        assert build2 in by_build, list(by_build)
        assert by_build[build2].requests == 30 and by_build[build2].model_errors == 10
        assert by_build[f"{w.model.name}/builds/1"].model_errors == 0
        return m

    await eventually("build 2's errors apart from build 1", apart, 30)

    async def health() -> str:
        model = await w.stub.GetModel(rpc.GetModelRequest(name=w.model.name))
        assert "errors: 33% of requests failed on build 2 since " in model.health
        return str(model.health)

    await eventually("health names build 2", health, 30)


async def test_a_replica_killed_with_sigkill_keeps_its_lines(w: World) -> None:
    r = await call(w, {"tag": "last words"}, request_id="last-words")
    pid, replica = r.json()["response"]["pid"], r.json()["replica_id"]

    async def written() -> bool:
        return any(x.request_id == "last-words" for x in await logs(w))

    await eventually("the line stored", written, 20)
    os.kill(pid, signal.SIGKILL)

    async def replaced() -> bool:
        dep = await w.stub.GetDeployment(
            rpc.GetDeploymentRequest(name=(await _model(w)).active_deployment)
        )
        ids = {x.id for x in dep.replicas if x.state == pb.REPLICA_STATE_RUNNING}
        assert replica not in ids and len(ids) == 2, ids
        return True

    await eventually("Serve replaced the killed replica", replaced, 120)
    mine = await logs(w, replica=replica)
    assert any(x.text == "input last words" for x in mine)

    async def listed_as_gone() -> bool:
        m = await metrics(w)
        gone = [x for x in m.replicas if x.replica_id == replica]
        assert gone and not gone[0].running and gone[0].totals.requests >= 1, gone
        return True

    await eventually("the killed replica listed, not running", listed_as_gone, 30)


async def test_lines_survive_a_control_plane_killed_and_started_again(w: World) -> None:
    before = await logs(w)
    w.server.kill()
    w.server.start()
    async with grpc.aio.insecure_channel(w.server.address) as channel:
        w.stub = Stub(channel)
        await _after_restart(w, before)


async def _after_restart(w: World, before: list[rpc.ModelLogLine]) -> None:
    after = await logs(w)
    assert [x.number for x in after[: len(before)]] == [x.number for x in before]
    # and what comes next still arrives, once
    r = await call(w, {"tag": "after restart"}, request_id="after-restart")
    assert r.status_code == 200

    async def arrived() -> bool:
        found = [x for x in await logs(w) if x.request_id == "after-restart"]
        assert len([x for x in found if x.stream == "access"]) == 1, found
        return True

    await eventually("the new line, once", arrived, 30)


async def _model(w: World) -> pb.Model:
    m: pb.Model = await w.stub.GetModel(rpc.GetModelRequest(name=w.model.name))
    return m


@pytest.fixture
def w(world: World) -> World:
    return world
