"""The whole active-model workflow over real gRPC, on SQLite and PostgreSQL (fake serving)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

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
    resources,
    wait,
)

S = pb


async def deployed_replicas(stub: Stub, name: str) -> list[pb.Replica]:
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
    assert dep.state == pb.DEPLOYMENT_STATE_DEPLOYED, dep
    return list(dep.replicas)


async def test_build_deploy_scale_restart_stop_restart(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    assert model.state == pb.MODEL_STATE_NOT_DEPLOYED
    assert model.active_deployment == ""

    op = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(2)))
    assert op.done and not op.HasField("error"), op
    assert op.kind == pb.OPERATION_KIND_CREATE_BUILD
    assert op.target == f"{model.name}/builds/1"
    b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
    assert b.state == pb.BUILD_STATE_BUILT and b.image.startswith("artifact://sha256:")
    assert b.error == ""
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert m.active_deployment == f"{model.name}/deployments/1"
    assert m.endpoint.endswith(f"/{project.split('/')[1]}/iris")
    first = await deployed_replicas(stub, m.active_deployment)
    assert len(first) == 2 and all(r.state == pb.REPLICA_STATE_RUNNING for r in first)

    # Re-deploy the same build with 3 replicas: in place, the 2 replicas stay.
    op = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(parent=model.name, build=b.name, resources=resources(3))
    )
    op = await wait(stub, op)
    assert not op.HasField("error"), op
    scaled = await deployed_replicas(stub, f"{model.name}/deployments/2")
    assert len(scaled) == 3
    assert {(r.id, r.pid) for r in first} <= {(r.id, r.pid) for r in scaled}
    old = await stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model.name}/deployments/1"))
    assert old.state == pb.DEPLOYMENT_STATE_REPLACED

    # Restart: every replica replaced, same build and resources.
    op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)))
    assert not op.HasField("error"), op
    restarted = await deployed_replicas(stub, f"{model.name}/deployments/2")
    assert len(restarted) == 3
    assert not {r.id for r in restarted} & {r.id for r in scaled}
    assert not {r.pid for r in restarted} & {r.pid for r in scaled}

    # Stop: no replica left, records stay.
    op = await wait(stub, await stub.StopModel(rpc.StopModelRequest(name=model.name)))
    assert not op.HasField("error"), op
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_STOPPED
    assert m.active_deployment == f"{model.name}/deployments/2"
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.state == pb.DEPLOYMENT_STATE_STOPPED and len(dep.replicas) == 0

    # Restart a stopped model: its last deployment starts again.
    op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)))
    assert not op.HasField("error"), op
    assert len(await deployed_replicas(stub, f"{model.name}/deployments/2")) == 3
    deps = await stub.ListDeployments(rpc.ListDeploymentsRequest(parent=model.name))
    assert [d.name.rsplit("/", 1)[1] for d in deps.deployments] == ["2", "1"]  # newest first


async def test_new_build_with_renamed_function_then_rollback(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(2)))
    op = await build(
        stub,
        model.name,
        source=MODEL_V2,
        function="classify",
        deploy=rpc.DeployOptions(resources=resources(2)),
    )
    assert not op.HasField("error"), op
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.build == f"{model.name}/builds/2"
    # Roll back to build 1, keeping the current resources (none given).
    op = await wait(
        stub,
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model.name, build=f"{model.name}/builds/1")
        ),
    )
    assert not op.HasField("error"), op
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.build == f"{model.name}/builds/1" and dep.resources.replicas == 2
    assert m.state == pb.MODEL_STATE_DEPLOYED


async def test_failed_build_names_the_function(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    op = await build(
        stub, model.name, function="nope", deploy=rpc.DeployOptions(resources=resources(1))
    )
    assert op.HasField("error")
    assert op.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
    assert b.state == pb.BUILD_STATE_FAILED and "nope" in b.error
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_FAILED and "nope" in m.message
    # A failed build cannot be deployed.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateDeployment(rpc.CreateDeploymentRequest(parent=model.name, build=b.name))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(e.value)[0] == "BUILD_NOT_BUILT"


@pytest.mark.slow
async def test_unplaceable_gpus_fail_after_the_deadline(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    deploy = rpc.DeployOptions(resources=resources(2, gpus=4))
    # Asked to wait for capacity (else it is refused up front: test_capacity.py).
    op = await build(stub, model.name, deploy=deploy, wait_for_capacity=True)
    assert op.HasField("error") and op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "GPU" in op.error.message
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_FAILED
    # One logical GPU per replica fits the 2 of the cluster.
    op = await wait(
        stub,
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name, build=f"{model.name}/builds/1", resources=resources(2, gpus=1)
            )
        ),
    )
    assert not op.HasField("error"), op


async def test_user_code_failing_at_start_fails_the_deploy(
    stub: Stub, project: str, server: Server
) -> None:
    from workers.fake_backend import FakeBackend

    assert isinstance(server.backend, FakeBackend)
    model = await create_model(stub, project)
    server.backend.fail_start[f"{project.split('/')[1]}.iris"] = "RuntimeError: boom at start"
    op = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
    assert op.HasField("error") and "boom at start" in op.error.message
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model.name}/deployments/1"))
    assert dep.state == pb.DEPLOYMENT_STATE_FAILED and "boom at start" in dep.message


async def test_second_mutation_is_aborted_naming_the_running_operation(
    stub: Stub, project: str
) -> None:
    model = await create_model(stub, project)
    await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
    op = await stub.RestartModel(rpc.RestartModelRequest(name=model.name))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.StopModel(rpc.StopModelRequest(name=model.name))
    assert e.value.code() == grpc.StatusCode.ABORTED
    reason, metadata, _ = error_info(e.value)
    assert reason == "OPERATION_IN_PROGRESS" and metadata["operation"] == op.name
    assert op.name in (e.value.details() or "")
    await wait(stub, op)


async def test_request_id_does_the_work_once(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
    first = await stub.RestartModel(rpc.RestartModelRequest(name=model.name, request_id="r-1"))
    again = await stub.RestartModel(rpc.RestartModelRequest(name=model.name, request_id="r-1"))
    assert again.name == first.name
    await wait(stub, first)
    third = await stub.RestartModel(rpc.RestartModelRequest(name=model.name, request_id="r-1"))
    assert third.name == first.name
    ops = await stub.ListOperations(rpc.ListOperationsRequest(parent=model.name))
    assert sum(o.kind == pb.OPERATION_KIND_RESTART_MODEL for o in ops.operations) == 1
    same = await stub.CreateModel(
        rpc.CreateModelRequest(parent=project, model_id="m2", request_id="c-1")
    )
    again_model = await stub.CreateModel(
        rpc.CreateModelRequest(parent=project, model_id="m2", request_id="c-1")
    )
    assert same.name == again_model.name


async def test_watch_snapshot_then_every_change_and_exact_resume(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    events: list[pb.ModelEvent] = []

    async def follow() -> None:
        async for ev in stub.WatchModel(rpc.WatchModelRequest(name=model.name)):
            events.append(ev)
            if ev.HasField("model") and ev.model.state == pb.MODEL_STATE_DEPLOYED:
                return

    watcher = asyncio.create_task(follow())
    await eventually("the watch open (its snapshot's first event)", lambda: events)
    await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
    await asyncio.wait_for(watcher, 20)
    assert events[0].type == pb.EVENT_TYPE_CURRENT and events[0].model.name == model.name
    live = [e for e in events if e.type not in (pb.EVENT_TYPE_CURRENT, pb.EVENT_TYPE_BOOKMARK)]
    revisions = [e.revision for e in live]
    assert revisions == sorted(set(revisions)), "revisions strictly increase"
    model_states = [e.model.state for e in live if e.HasField("model")]
    # Intermediate states are visible, in order.
    assert (
        model_states.index(pb.MODEL_STATE_PENDING)
        < model_states.index(pb.MODEL_STATE_DEPLOYING)
        < model_states.index(pb.MODEL_STATE_DEPLOYED)
    )
    build_states = [e.build.state for e in live if e.HasField("build")]
    assert build_states[:3] == [
        pb.BUILD_STATE_QUEUED,
        pb.BUILD_STATE_BUILDING,
        pb.BUILD_STATE_BUILT,
    ]

    # Resume after the 3rd live event: exactly the events after it, no snapshot.
    since = live[2].revision
    resumed: list[pb.ModelEvent] = []
    call = stub.WatchModel(rpc.WatchModelRequest(name=model.name, since_revision=since))
    async for ev in call:
        resumed.append(ev)
        if ev.revision == live[-1].revision:
            break
    call.cancel()
    assert [e.revision for e in resumed] == revisions[3:]


async def test_delete_refuses_an_active_model(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.DeleteModel(rpc.DeleteModelRequest(name=model.name))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(e.value)[0] == "MODEL_ACTIVE"
    await wait(stub, await stub.StopModel(rpc.StopModelRequest(name=model.name)))
    await stub.DeleteModel(rpc.DeleteModelRequest(name=model.name))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
