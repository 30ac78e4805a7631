"""CancelOperation: a queued or running build, a rollout, and what cannot be cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import (
    MODEL_V2,
    Stub,
    build,
    create_model,
    error_info,
    fake_settings,
    op_reason,
    resources,
    running,
    wait,
)
from tests.helpers.api import start_build as build_started
from workers.fake_backend import FakeBackend

# The build's import check prints IMPORTING, then sleeps: a cancel must interrupt it.
IMPORTING = "slow model: importing"
SLOW = (
    f"import time\nprint({IMPORTING!r}, flush=True)\ntime.sleep(60)\n"
    "def predict(body):\n    return body\n"
)


async def start_build(stub: Stub, model: str, source: str, deploy: bool) -> pb.Operation:
    options = rpc.DeployOptions(resources=resources(1)) if deploy else None
    return await build_started(stub, model, {"model.py": source}, deploy=options)


def leftovers(artifacts: Path) -> list[Path]:
    return [p for p in artifacts.rglob("*") if p.name != ".staging"]


async def importing(stub: Stub, build_name: str) -> None:
    """Returns once the build's import check runs SLOW (which sleeps there)."""

    async def printed() -> bool:
        req = rpc.StreamBuildLogsRequest(name=build_name)
        lines = [line.text async for line in stub.StreamBuildLogs(req)]
        return any(IMPORTING in text for text in lines)

    await eventually("the build importing its slow module", printed, 30)


async def test_cancelling_a_running_build_stops_it_and_leaves_nothing(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    op = await start_build(stub, model.name, SLOW, deploy=True)
    await importing(stub, op.target)
    loop = asyncio.get_running_loop()
    started = loop.time()
    done = await stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
    assert done.done and loop.time() - started < 20, "the build was not stopped"
    assert done.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert op_reason(done) == "OPERATION_CANCELLED"
    b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
    assert b.state == pb.BUILD_STATE_FAILED and "cancelled" in b.error
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_NOT_DEPLOYED  # back to where it was
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=done.deployment))
    assert dep.state == pb.DEPLOYMENT_STATE_FAILED
    left = await asyncio.to_thread(leftovers, server.settings.artifacts_dir)
    assert left == [], f"a cancelled build left {left}"
    # The model is free for the next operation.
    assert not (await build(stub, model.name)).HasField("error")


async def test_cancelling_a_queued_build_runs_nothing(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert server.dispatcher is not None
    await server.dispatcher.stop()  # nothing claims jobs: the build stays queued
    op = await start_build(stub, model.name, SLOW, deploy=False)
    done = await stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
    assert done.done and op_reason(done) == "OPERATION_CANCELLED"
    b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
    assert b.state == pb.BUILD_STATE_FAILED and "before it started" in b.error


async def test_cancelling_a_build_handed_back_by_a_server_that_stopped(
    stub: Stub, project: str, server: Server
) -> None:
    """BUILDING, but its job is back in the queue (its server stopped): it ends at once."""
    model = await create_model(stub, project)
    assert server.dispatcher is not None
    await server.dispatcher.stop()
    op = await start_build(stub, model.name, SLOW, deploy=True)
    with server.db.engine.begin() as conn:
        conn.execute(text("UPDATE builds SET state = 'BUILDING' WHERE name = :n"), {"n": op.target})
    done = await stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
    assert done.done and op_reason(done) == "OPERATION_CANCELLED"
    b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
    assert b.state == pb.BUILD_STATE_FAILED and "cancelled while building" in b.error
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_NOT_DEPLOYED


async def test_cancelling_a_rollout_goes_back_to_the_last_good_deployment(
    stub: Stub, project: str, server: Server
) -> None:
    assert isinstance(server.backend, FakeBackend)
    model = await create_model(stub, project)
    first = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(2)))
    assert not first.HasField("error")
    server.backend.start_delay_s = 3600  # the new replicas never become ready
    op = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=model.name, build=f"{model.name}/builds/1", resources=resources(2, cpus=1)
        )
    )

    async def rolling_out() -> bool:
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
        return dep.state == pb.DEPLOYMENT_STATE_DEPLOYING

    await eventually("the rollout under way", rolling_out)
    done = await stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
    server.backend.start_delay_s = 0.05
    assert done.done and op_reason(done) == "OPERATION_CANCELLED"
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert m.active_deployment == f"{model.name}/deployments/1"
    op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)))
    assert not op.HasField("error"), "the model takes new operations"


@pytest.mark.parametrize("change", ["build-and-deploy", "restart"])
async def test_cancelling_a_new_build_deploying_or_a_restart_keeps_the_replicas_serving(
    stub: Stub, project: str, server: Server, change: str
) -> None:
    assert isinstance(server.backend, FakeBackend)
    model = await create_model(stub, project)
    first = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(2)))
    assert not first.HasField("error")
    serving = f"{model.name}/deployments/1"
    before = {
        r.id for r in (await stub.GetDeployment(rpc.GetDeploymentRequest(name=serving))).replicas
    }
    server.backend.start_delay_s = 3600  # the new replicas never become ready
    if change == "restart":
        op = await stub.RestartModel(rpc.RestartModelRequest(name=model.name))
    else:
        op = await start_build(stub, model.name, MODEL_V2.replace("classify", "predict"), True)

    async def rolling_out() -> bool:  # past its build: the rollout has started
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
        return dep.state == pb.DEPLOYMENT_STATE_DEPLOYING

    await eventually("the rollout under way", rolling_out)
    done = await stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
    server.backend.start_delay_s = 0.05
    assert done.done and done.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert op_reason(done) == "OPERATION_CANCELLED"
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_DEPLOYED and m.active_deployment == serving
    assert f"cancelled on request ({op.name})" in m.message, m.message

    async def replicas_from_before() -> pb.Deployment:  # the spec from before applied again
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=serving))
        assert {r.id for r in dep.replicas} == before, dep.replicas
        return dep

    dep = await eventually("the replicas from before serving", replicas_from_before)
    assert dep.state == pb.DEPLOYMENT_STATE_DEPLOYED


@pytest.mark.parametrize("case", ["done", "stop", "unknown", "bad"])
async def test_what_cannot_be_cancelled(stub: Stub, project: str, case: str) -> None:
    model = await create_model(stub, project)
    op = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
    name, code, why = op.name, grpc.StatusCode.FAILED_PRECONDITION, "OPERATION_DONE"
    if case == "stop":
        stop = await stub.StopModel(rpc.StopModelRequest(name=model.name))
        name, why = stop.name, "NOT_CANCELLABLE"
    elif case == "unknown":
        name, code, why = "operations/nope", grpc.StatusCode.NOT_FOUND, "OPERATION_NOT_FOUND"
    elif case == "bad":
        name, code, why = "nope", grpc.StatusCode.INVALID_ARGUMENT, ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelOperation(rpc.CancelOperationRequest(name=name))
    assert err.value.code() == code
    if why:
        assert error_info(err.value)[0] == why


@pytest.mark.slow
async def test_a_build_running_on_another_server_is_cancelled_through_this_one(
    fresh_db: str, tmp_path: Path, project: str
) -> None:
    """The request goes to the database; the server running the build notices and stops it."""
    data = tmp_path / "shared"  # one database, one data dir (sources, artifacts), two servers
    here = fake_settings(fresh_db, data, dispatcher_concurrency=0)  # runs no job itself
    there = fake_settings(fresh_db, data)
    async with (
        running(there) as other,
        running(here) as this,
        grpc.aio.insecure_channel(this.grpc_address) as channel,
    ):
        stub = Stub(channel)
        model = await create_model(stub, project)
        op = await start_build(stub, model.name, SLOW, deploy=False)
        await importing(stub, op.target)
        assert other.dispatcher is not None and other.dispatcher._by_job, "not running there"
        done = await stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
        assert done.done and op_reason(done) == "OPERATION_CANCELLED"
        b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
        assert b.state == pb.BUILD_STATE_FAILED and "cancelled while building" in b.error
        left = await asyncio.to_thread(leftovers, other.settings.artifacts_dir)
        assert left == [], f"a cancelled build left {left}"
