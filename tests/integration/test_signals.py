"""GetModelMetrics, StreamModelLogs and Model.health through gRPC, with made-up replica
reports put into the fake backend's collector (tests/ray/test_signals_ray.py drives real
replicas on two Ray nodes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from sqlalchemy import text

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, Stub, build, create_model, fake_settings, resources
from tests.integration.test_metrics import Samples, scrape, value
from workers.backend import app_name_for
from workers.fake_backend import FakeBackend
from workers.signals import LogLine, ProxyFigures, ReplicaFigures, Report, latency_bucket

SECRET = "s3cr3t-value-42"
BUCKET_3MS = latency_bucket(3)
BUCKET_4MS = latency_bucket(4)


def figures(app: str, build: str, replica: str, **kw: object) -> ReplicaFigures:
    now = time.time()
    base = ReplicaFigures(
        app=app,
        replica=replica,
        build=build,
        node="10.0.0.7",
        pid=4242,
        start_time=now,
        time=now,
        requested_cpus=1.0,
        busy_limit=2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def line(app: str, build: str, replica: str, seq: int, text_: str, **kw: object) -> LogLine:
    base = LogLine(app, replica, build, "10.0.0.7", seq, time.time(), "stdout", text_)
    return replace(base, **kw)  # type: ignore[arg-type]


class World:
    def __init__(self, server: Server, stub: Stub, model: pb.Model) -> None:
        self.server = server
        self.stub = stub
        self.model = model
        project = model.name.split("/")[1]
        self.app = app_name_for(project, model.name.rsplit("/", 1)[-1])
        self.build1 = f"{model.name}/builds/1"
        self.build2 = f"{model.name}/builds/2"
        assert isinstance(server.backend, FakeBackend)
        self.fake: FakeBackend = server.backend
        self.r1 = ""  # the id of the replica Serve (the fake) runs

    def said(self, seq: int, text_: str) -> Report:
        """The running replica's report of one stdout line."""
        return Report(
            figures(self.app, self.build1, self.r1),
            (line(self.app, self.build1, self.r1, seq, text_),),
        )

    async def logs(self, **kw: object) -> list[rpc.ModelLogLine]:
        request = rpc.StreamModelLogsRequest(name=self.model.name, **kw)  # type: ignore[arg-type]
        return [m async for m in self.stub.StreamModelLogs(request)]


@pytest.fixture
async def world(database_url: str, tmp_path: Path, project: str) -> AsyncIterator[World]:
    settings = fake_settings(
        database_url, tmp_path, signals_interval_s=0.05, health_interval_s=0.1, metrics_port=0
    )
    server = Server(settings, backend=FakeBackend(num_gpus=2))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = Stub(channel)
            model = await create_model(stub, project)
            deploy = rpc.DeployOptions(
                resources=resources(1, cpus=1), secret_environment={"API_KEY": SECRET}
            )
            op = await build(stub, model.name, MODEL_V1, deploy=deploy)
            assert not op.HasField("error"), op.error
            world = World(server, stub, model)
            model = await stub.GetModel(rpc.GetModelRequest(name=model.name))
            dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=model.active_deployment))
            world.r1 = dep.replicas[0].id
            yield world
    finally:
        await server.stop()


async def test_metrics_show_requests_errors_and_latency_per_build_and_replica(w: World) -> None:
    w.fake.report(
        Report(
            figures(
                w.app,
                w.build1,
                w.r1,
                requests=90,
                latency=((latency_bucket(4), 90),),
                cpu_seconds=0.5,
            ),
            (),
        ),
        Report(
            figures(
                w.app,
                w.build2,
                "r2",
                requests=30,
                model_errors=10,
                client_errors=2,
                latency=((latency_bucket(80), 30),),
            ),
            (),
        ),
    )

    async def metrics() -> rpc.ModelMetrics:
        m: rpc.ModelMetrics = await w.stub.GetModelMetrics(
            rpc.GetModelMetricsRequest(name=w.model.name)
        )
        assert m.totals.requests == 120, m.totals
        return m

    m = await eventually("the replicas' requests counted", metrics)
    assert m.totals.model_errors == 10 and m.totals.client_errors == 2
    builds = {b.build: b.totals for b in m.builds}
    assert builds[w.build1].requests == 90 and builds[w.build1].model_errors == 0
    assert builds[w.build2].model_errors == 10
    assert 80 <= builds[w.build2].latency_p50_ms <= 88 and builds[w.build1].latency_p99_ms < 4.5
    replicas = {r.replica_id: r for r in m.replicas}
    assert set(replicas) == {w.r1, "r2"} and replicas[w.r1].running
    assert not replicas["r2"].running, "r2 is none of the replicas Serve lists"
    assert replicas[w.r1].node == "10.0.0.7" and replicas[w.r1].pid == 4242
    assert m.step.seconds == 10 and len(m.points) == 360  # an hour at 10 s steps
    assert sum(p.figures.requests for p in m.points) == 120
    assert m.totals.cpu_requested == 1.0  # 1 CPU requested by the one replica running
    assert m.totals.gpu_used == -1  # not measured


async def test_metrics_refuse_a_window_or_step_that_makes_no_sense(w: World) -> None:
    for window, step in ((5, 0), (7200, 0), (60, 15), (60, 120)):
        request = rpc.GetModelMetricsRequest(
            name=w.model.name,
            window=duration_pb2.Duration(seconds=window),
            step=duration_pb2.Duration(seconds=step) if step else None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await w.stub.GetModelMetrics(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (window, step)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await w.stub.GetModelMetrics(rpc.GetModelMetricsRequest(name=w.model.name + "x"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_logs_come_back_filtered_and_tailed_with_secrets_redacted(w: World) -> None:
    w.fake.report(
        Report(
            figures(w.app, w.build1, w.r1),
            (
                line(w.app, w.build1, w.r1, 0, "loading"),
                line(w.app, w.build1, w.r1, 1, f"my key is {SECRET}!", stream="stderr"),
                line(w.app, w.build1, w.r1, 2, "200 3.1 ms", stream="access", request_id="req-1"),
            ),
        ),
        Report(
            figures(w.app, w.build2, "r2"),
            (line(w.app, w.build2, "r2", 0, "second build"),),
        ),
    )
    lines = await eventually("four lines", lambda: _count(w, 4), 10)
    assert [m.text for m in lines] == [
        "loading",
        "my key is [redacted]!",
        "200 3.1 ms",
        "second build",
    ]
    access = lines[2]
    assert (access.stream, access.request_id, access.replica_id) == ("access", "req-1", w.r1)
    assert access.build == w.build1 and access.node == "10.0.0.7"
    assert [m.text for m in await w.logs(replica="r2")] == ["second build"]
    assert [m.text for m in await w.logs(build=w.build1, tail=1)] == ["200 3.1 ms"]
    # Stored redacted too: the secret is nowhere in the database's lines.
    with w.server.db.read() as s:
        stored = s.execute(text("SELECT text FROM model_log_lines")).scalars().all()
    assert stored and not any(SECRET in t for t in stored)
    # The same lines read again (another server, or this one after a restart) are kept once.
    w.fake.report(w.said(0, "loading"))
    await w.server.signals.poll() if w.server.signals else None
    assert len(await w.logs()) == 4


async def _count(w: World, n: int) -> list[rpc.ModelLogLine]:
    lines = await w.logs()
    assert len(lines) == n, [m.text for m in lines]
    return lines


async def test_a_follower_gets_new_lines_as_they_come(w: World) -> None:
    w.fake.report(w.said(0, "before"))
    await eventually("the first line", lambda: _count(w, 1), 10)
    call = w.stub.StreamModelLogs(rpc.StreamModelLogsRequest(name=w.model.name, follow=True))
    try:
        first = await asyncio.wait_for(call.read(), 10)
        assert isinstance(first, rpc.ModelLogLine) and first.text == "before"
        w.fake.report(w.said(1, "after"))
        second = await asyncio.wait_for(call.read(), 10)
        assert isinstance(second, rpc.ModelLogLine)
        assert second.text == "after" and second.number > first.number
    finally:
        call.cancel()


async def test_a_build_of_another_model_or_a_bad_replica_id_is_refused(w: World) -> None:
    for kw in ({"build": "projects/x/models/y/builds/1"}, {"replica": "a b"}, {"tail": -1}):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await w.logs(**kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw


async def test_health_says_dropping_requests_and_watchers_see_it(w: World) -> None:
    async def health(expected: str) -> pb.Model:
        m: pb.Model = await w.stub.GetModel(rpc.GetModelRequest(name=w.model.name))
        assert m.health.startswith(expected), m.health
        return m

    w.fake.report(Report(figures(w.app, w.build1, w.r1, in_flight=0), ()))
    w.fake.proxies[w.app] = ProxyFigures(w.app, refused=0, queued=0)
    before = await eventually("healthy", lambda: health("ok"), 10)
    watch = w.stub.WatchModel(
        rpc.WatchModelRequest(name=w.model.name, since_revision=int(before.etag.strip('"')))
    )
    try:
        w.fake.report(Report(figures(w.app, w.build1, w.r1, in_flight=2), ()))
        w.fake.proxies[w.app] = ProxyFigures(w.app, refused=37, queued=5)
        said = "dropping requests: 37 refused in the last 5 min at 1/1 replicas busy"
        await eventually("dropping requests", lambda: health(said), 10)
        event = await asyncio.wait_for(_event_with_health(watch), 10)
        assert event.model.health == said
    finally:
        watch.cancel()


async def _event_with_health(watch: Any) -> pb.ModelEvent:
    async for event in watch:
        if event.model.health.startswith("dropping"):
            return event  # type: ignore[no-any-return]
    raise AssertionError("the watch ended")


async def test_apps_of_models_this_database_does_not_have_are_not_read(w: World) -> None:
    other = app_name_for("someone", "else")
    w.fake.report(
        Report(
            figures(other, "projects/someone/models/else/builds/1", "x"),
            (line(other, "b", "x", 0, "x"),),
        )
    )
    w.fake.report(w.said(0, "mine"))
    await eventually("my line", lambda: _count(w, 1), 10)
    assert other not in w.server.signals.window.apps() if w.server.signals else False
    with w.server.db.read() as s:
        lines = s.execute(text("SELECT model FROM model_log_lines WHERE model LIKE '%someone%'"))
        assert lines.scalars().all() == []


@pytest.fixture
def w(world: World) -> World:
    return world


async def test_prometheus_gets_each_models_requests_latency_and_refusals(w: World) -> None:
    w.fake.proxies[w.app] = ProxyFigures(w.app, refused=5, queued=0)
    w.fake.report(
        Report(
            figures(
                w.app, w.build1, w.r1, requests=40, model_errors=4, latency=((BUCKET_3MS, 40),)
            ),
            (),
        )
    )
    await eventually("the first proxy reading, the base", lambda: w.app in _apps(w), 10)
    w.fake.proxies[w.app] = ProxyFigures(w.app, refused=12, queued=3)
    model, build = w.model.name, "1"

    async def scraped() -> Samples:
        samples = await scrape(w.server)
        assert value(samples, "modelctl_model_refused_requests_total", model=model) == 7
        # The replica counts as alive once the signals loop has read the serving set again
        # (every signals_interval_s), which may come after the refusals.
        assert value(samples, "modelctl_model_cpu_requested_cores", model=model) == 1.0
        return samples

    samples = await eventually("the refusals exported", scraped, 10)
    ok = value(samples, "modelctl_model_requests_total", model=model, build=build, outcome="ok")
    raised = value(
        samples, "modelctl_model_requests_total", model=model, build=build, outcome="model_error"
    )
    assert (ok, raised) == (36, 4)
    count = value(
        samples, "modelctl_model_request_duration_seconds_count", model=model, build=build
    )
    le = value(
        samples,
        "modelctl_model_request_duration_seconds_bucket",
        model=model,
        build=build,
        le="0.005",
    )
    below = value(
        samples,
        "modelctl_model_request_duration_seconds_bucket",
        model=model,
        build=build,
        le="0.0025",
    )
    assert (count, le, below) == (40, 40, 0)  # 3 ms: above 2.5 ms, within 5 ms


def _apps(w: World) -> list[str]:
    assert w.server.signals is not None
    return w.server.signals.window.apps()


async def test_a_broken_record_of_another_model_stops_nothing(w: World, project: str) -> None:
    other = await create_model(w.stub, project, "broken")
    op = await build(w.stub, other.name, MODEL_V1, deploy=rpc.DeployOptions(resources=resources(1)))
    assert not op.HasField("error"), op.error
    with w.server.db.write() as tx:
        tx.session.execute(
            text("UPDATE deployments SET observed_replicas = '{not json' WHERE model = :m"),
            {"m": other.name},
        )
    w.fake.report(w.said(0, "still here"))
    lines = await eventually("my line, beside the broken record", lambda: _count(w, 1), 10)
    assert lines[0].text == "still here"
