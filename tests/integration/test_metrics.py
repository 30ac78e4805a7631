"""/metrics after a workflow, scraped over HTTP as Prometheus would, on SQLite and
PostgreSQL: RPCs by method and code, operations by kind and outcome, models by state,
replicas desired vs running, watchers, the dispatcher's queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import (
    MODEL_V1,
    Stub,
    build,
    create_model,
    fake_settings,
    resources,
    running,
    wait,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: Server) -> Samples:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://{server.metrics_address}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly these labels (0 if absent, as for a counter
    that never counted); ``grpc_service`` is filled in for RPC metrics."""
    if name.startswith("grpc_server") and "grpc_service" not in labels:
        labels["grpc_service"] = "modellifecycle.v1.ModelLifecycle"
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def metered(fresh_db: str, tmp_path: Path) -> AsyncIterator[Server]:
    """A database of its own: the figures of records count every model in it."""
    async with running(fake_settings(fresh_db, tmp_path, metrics_port=0)) as srv:
        yield srv


async def test_metrics_show_a_workflow(metered: Server, project: str) -> None:
    async with grpc.aio.insecure_channel(metered.grpc_address) as channel:
        stub = Stub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="Not Valid"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetModel(rpc.GetModelRequest(name=f"{project}/models/missing"))
        model = (await create_model(stub, project)).name
        watch = stub.WatchModel(rpc.WatchModelRequest(name=model))
        first = await watch.read()
        assert isinstance(first, pb.ModelEvent) and first.type == pb.EVENT_TYPE_CURRENT
        deploy = rpc.DeployOptions(resources=resources(replicas=2))
        built = await build(stub, model, MODEL_V1, deploy=deploy)
        assert not built.HasField("error")
        failed = await build(stub, model, "def predict(body):\n    return (\n")
        assert failed.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        scaled = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model, build=built.target, resources=resources(3))
        )
        await wait(stub, scaled)

        m = await scrape(metered)
        assert value(m, "modelctl_watchers") == 1
        assert value(m, "modelctl_models", state="DEPLOYED") == 1
        assert value(m, "modelctl_models", state="STOPPED") == 0
        assert value(m, "modelctl_model_replicas_desired", model=model) == 3
        assert value(m, "modelctl_model_replicas_running", model=model) == 3

        watch.cancel()
        await wait(stub, await stub.StopModel(rpc.StopModelRequest(name=model)))

    m = await scrape(metered)
    calls = "grpc_server_handled_total"
    assert value(m, calls, grpc_method="CreateModel", grpc_type="unary", grpc_code="OK") == 1
    assert (
        value(m, calls, grpc_method="CreateModel", grpc_type="unary", grpc_code="INVALID_ARGUMENT")
        == 1
    )
    assert value(m, calls, grpc_method="GetModel", grpc_type="unary", grpc_code="NOT_FOUND") == 1
    assert value(m, calls, grpc_method="CreateBuild", grpc_type="unary", grpc_code="OK") == 2
    assert (
        value(m, calls, grpc_method="UploadSource", grpc_type="client_stream", grpc_code="OK") == 2
    )
    assert (
        value(m, calls, grpc_method="WatchModel", grpc_type="server_stream", grpc_code="CANCELLED")
        == 1
    )
    started = value(m, "grpc_server_started_total", grpc_method="WaitOperation", grpc_type="unary")
    timed = value(
        m, "grpc_server_handling_seconds_count", grpc_method="WaitOperation", grpc_type="unary"
    )
    assert started >= 4 and timed == started
    # Latency buckets: every CreateModel call took less than 60 s and more than 0.
    assert (
        value(
            m,
            "grpc_server_handling_seconds_bucket",
            grpc_method="CreateModel",
            grpc_type="unary",
            le="60.0",
        )
        == 2
    )

    ops = "modelctl_operations_total"
    assert value(m, ops, kind="CREATE_BUILD", outcome="succeeded") == 1
    assert value(m, ops, kind="CREATE_BUILD", outcome="failed") == 1
    assert value(m, ops, kind="CREATE_DEPLOYMENT", outcome="succeeded") == 1
    assert value(m, ops, kind="STOP_MODEL", outcome="succeeded") == 1
    took = value(
        m, "modelctl_operation_duration_seconds_sum", kind="CREATE_BUILD", outcome="succeeded"
    )
    assert 0 < took < 30

    assert value(m, "modelctl_models", state="STOPPED") == 1
    assert value(m, "modelctl_models", state="DEPLOYED") == 0
    assert value(m, "modelctl_model_replicas_running", model=model) == 0
    assert value(m, "modelctl_model_replicas_desired", model=model) == 0, "a stopped model"
    assert value(m, "modelctl_watchers") == 0
    assert value(m, "modelctl_dispatcher_queue_depth") == 0
    assert value(m, "process_resident_memory_bytes") > 0


@pytest.mark.slow
async def test_the_queue_depth_counts_jobs_no_server_has_taken(
    fresh_db: str, tmp_path: Path, project: str
) -> None:
    """Builds held back by the fake backend: one runs, the rest wait in the queue."""
    settings = fake_settings(fresh_db, tmp_path, metrics_port=0, dispatcher_concurrency=1)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.grpc_address) as ch:
        stub = Stub(ch)
        backend = srv.backend
        backend.builds_may_start.clear()  # type: ignore[attr-defined]
        tasks = []
        for i in range(3):
            model = (await create_model(stub, project, f"queued-{i}")).name
            tasks.append(asyncio.create_task(build(stub, model, MODEL_V1)))

        async def one_running_two_queued() -> Samples:
            m = await scrape(srv)
            assert value(m, "modelctl_dispatcher_running_jobs") == 1
            assert value(m, "modelctl_dispatcher_queue_depth") == 2
            return m

        await eventually("one build running and two queued", one_running_two_queued)
        backend.builds_may_start.set()  # type: ignore[attr-defined]
        await asyncio.gather(*tasks)
        assert value(await scrape(srv), "modelctl_dispatcher_queue_depth") == 0


async def test_metrics_are_off_unless_asked(server: Server) -> None:
    assert server.metrics_address == ""
    assert server.metrics is None
