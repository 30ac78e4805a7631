"""Deadlines, the last good deployment, and drift repaired by the reconciler (fake backend,
SQLite and PostgreSQL): what a platform engineer checks after things go wrong."""

from __future__ import annotations

import asyncio

import grpc
from sqlalchemy import text

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.integration.conftest import (
    MODEL_V2,
    Stub,
    build,
    create_model,
    op_reason,
    resources,
    wait,
)
from workers.fake_backend import FakeBackend


def fake(server: Server) -> FakeBackend:
    assert isinstance(server.backend, FakeBackend)
    return server.backend


def app_of(model: str) -> str:
    return f"{model.split('/')[1]}.{model.split('/')[3]}"


async def deployed(stub: Stub, model: str) -> pb.Model:
    m: pb.Model = await stub.GetModel(rpc.GetModelRequest(name=model))
    return m


async def redeploy(stub: Stub, model: str, build_no: int, res: pb.Resources) -> pb.Operation:
    op = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(parent=model, build=f"{model}/builds/{build_no}", resources=res)
    )
    return await wait(stub, op)


async def until(what: str, check: object, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if callable(check) and await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


async def test_a_failing_new_build_goes_back_to_the_last_good_deployment(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    fake(server).fail_start[app_of(model.name)] = "RuntimeError: cannot reach the feature store"
    op = await build(stub, model.name, MODEL_V2, "classify", deploy=pb_deploy(2))
    assert op.HasField("error") and op_reason(op) == "DEPLOY_FAILED"
    assert "feature store" in op.error.message
    del fake(server).fail_start[app_of(model.name)]
    m = await deployed(stub, model.name)
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert m.active_deployment == f"{model.name}/deployments/1"
    assert "deployments/2 failed" in m.message and "serving" in m.message
    failed = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
    assert failed.state == pb.DEPLOYMENT_STATE_FAILED
    # What runs is the last good deployment again.
    await until(
        "the last good spec applied",
        lambda: _spec_is(server, model.name, f"{model.name}/deployments/1"),
    )


async def test_gpus_that_cannot_be_placed_fail_at_the_placement_deadline(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    op = await redeploy(stub, model.name, 1, resources(2, gpus=2))
    assert op.HasField("error")
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert op_reason(op) == "PLACEMENT_TIMEOUT" and "GPU" in op.error.message
    m = await deployed(stub, model.name)
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert m.active_deployment == f"{model.name}/deployments/1"


async def test_replicas_that_never_become_healthy_fail_at_the_startup_deadline(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(1))).HasField("error")
    fake(server).start_delay_s = 3600
    op = await redeploy(stub, model.name, 1, resources(1, cpus=1))
    fake(server).start_delay_s = 0.05
    assert op_reason(op) == "STARTUP_TIMEOUT" and "after 3s" in op.error.message
    m = await deployed(stub, model.name)
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert m.active_deployment == f"{model.name}/deployments/1"


async def test_a_failed_restart_keeps_the_replicas_from_before(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    fake(server).fail_start[app_of(model.name)] = "RuntimeError: boom"
    op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)))
    del fake(server).fail_start[app_of(model.name)]
    assert op_reason(op) == "DEPLOY_FAILED"
    m = await deployed(stub, model.name)
    assert m.state == pb.MODEL_STATE_DEPLOYED and "restart failed" in m.message
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    assert dep.state == pb.DEPLOYMENT_STATE_DEPLOYED and "restart failed" in dep.message


async def test_an_application_deleted_behind_our_back_comes_back(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    fake(server).delete_app(app_of(model.name))

    async def back() -> bool:
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model.name}/deployments/1"))
        return app_of(model.name) in fake(server).apps and len(dep.replicas) == 2

    await until("the application re-applied", back)
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model.name}/deployments/1"))
    assert "missing from Serve" in dep.message
    assert (await deployed(stub, model.name)).state == pb.MODEL_STATE_DEPLOYED


async def test_a_replica_killed_from_outside_is_replaced_and_the_event_says_so(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    name = f"{model.name}/deployments/1"
    before = (await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))).replicas
    victim = before[0]
    fake(server).kill_replica(app_of(model.name), victim.id)

    async def replaced() -> bool:
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
        return victim.id not in {r.id for r in dep.replicas} and len(dep.replicas) == 2

    await until("the replica replaced", replaced)
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
    assert f"{victim.id} (pid {victim.pid}) stopped unexpectedly" in dep.message
    assert before[1].id in {r.id for r in dep.replicas}, "the other replica was kept"


async def test_an_error_on_one_model_is_recorded_and_the_loop_goes_on(
    stub: Stub, project: str, server: Server
) -> None:
    broken = await create_model(stub, project, "broken")
    healthy = await create_model(stub, project, "healthy")
    for m in (broken, healthy):
        assert not (await build(stub, m.name, deploy=pb_deploy(1))).HasField("error")
    # Corrupt one record, then make both models need attention.
    with server.db.engine.begin() as conn:
        conn.execute(
            text("UPDATE deployments SET observed_replicas = '{not json' WHERE model = :m"),
            {"m": broken.name},
        )
    dep = f"{healthy.name}/deployments/1"
    victim = (await stub.GetDeployment(rpc.GetDeploymentRequest(name=dep))).replicas[0]
    fake(server).kill_replica(app_of(healthy.name), victim.id)
    fake(server).kill_replica(
        app_of(broken.name), fake(server).apps[app_of(broken.name)].replicas[0].id
    )

    async def broken_recorded() -> bool:
        return "reconcile error" in (await deployed(stub, broken.name)).message

    async def healthy_reconciled() -> bool:
        d = await stub.GetDeployment(rpc.GetDeploymentRequest(name=dep))
        return "stopped unexpectedly" in d.message

    await until("the error recorded on its model", broken_recorded)
    await until("the other model still reconciled", healthy_reconciled)


def pb_deploy(replicas: int) -> rpc.DeployOptions:
    return rpc.DeployOptions(resources=resources(replicas))


async def _spec_is(server: Server, model: str, deployment: str) -> bool:
    app = fake(server).apps.get(app_of(model))
    return app is not None and app.spec.deployment_name == deployment
