"""Deadlines, the last good deployment, and drift repaired by the reconciler (fake backend,
SQLite and PostgreSQL): what a platform engineer checks after things go wrong."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from controlplane.server import Server
from controlplane.storage import repo
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
    reconciler_passes,
    resources,
    running,
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


async def redeploy(
    stub: Stub, model: str, build_no: int, res: pb.Resources, wait_for_capacity: bool = False
) -> pb.Operation:
    op = await stub.CreateDeployment(
        rpc.CreateDeploymentRequest(
            parent=model,
            build=f"{model}/builds/{build_no}",
            resources=res,
            wait_for_capacity=wait_for_capacity,
        )
    )
    return await wait(stub, op)


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
    await eventually(
        "the last good spec applied",
        lambda: _spec_is(server, model.name, f"{model.name}/deployments/1"),
    )


@pytest.mark.slow
async def test_gpus_that_cannot_be_placed_fail_at_the_placement_deadline(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    # Asked to wait for capacity (else it is refused up front: test_capacity.py).
    op = await redeploy(stub, model.name, 1, resources(2, gpus=2), wait_for_capacity=True)
    assert op.HasField("error")
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert op_reason(op) == "PLACEMENT_TIMEOUT" and "GPU" in op.error.message
    m = await deployed(stub, model.name)
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert m.active_deployment == f"{model.name}/deployments/1"


@pytest.mark.slow
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
    stub: Stub, project: str, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    name = f"{model.name}/deployments/1"
    before = {
        r.id for r in (await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))).replicas
    }
    fake(server).fail_start[app_of(model.name)] = "RuntimeError: boom"
    op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)))
    del fake(server).fail_start[app_of(model.name)]
    assert op_reason(op) == "DEPLOY_FAILED"
    m = await deployed(stub, model.name)
    assert m.state == pb.MODEL_STATE_DEPLOYED and "restart failed" in m.message
    assert m.active_deployment == name

    async def settled() -> bool:  # the generation before re-applied; nothing else to do
        return fake(server).apps[app_of(model.name)].retiring == []

    await eventually("the restart's replicas gone", settled)
    await reconciler_passes(server, monkeypatch, 3)  # which leave it as it is
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
    assert dep.state == pb.DEPLOYMENT_STATE_DEPLOYED and "restart failed" in dep.message
    assert {r.id for r in dep.replicas} == before, "the replicas from before it were kept"


@pytest.mark.slow
async def test_an_application_deleted_behind_our_back_comes_back(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    fake(server).delete_app(app_of(model.name))

    async def back() -> bool:
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model.name}/deployments/1"))
        return app_of(model.name) in fake(server).apps and len(dep.replicas) == 2

    await eventually("the application re-applied", back)
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

    await eventually("the replica replaced", replaced)
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
    assert f"{victim.id} (pid {victim.pid} on {victim.node}) stopped unexpectedly" in dep.message
    assert before[1].id in {r.id for r in dep.replicas}, "the other replica was kept"
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.message == dep.message, "GetModel says what happened too"


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

    await eventually("the error recorded on its model", broken_recorded)
    await eventually("the other model still reconciled", healthy_reconciled)
    with server.db.read() as s:  # /metrics' figures still read (the broken model: none run)
        assert repo.replicas_by_model(s)[broken.name] == (1, 0)


async def test_a_killed_replica_whose_replacement_fails_is_explained_and_stays_deployed(
    stub: Stub, project: str, server: Server
) -> None:
    model = await create_model(stub, project)
    assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
    name = f"{model.name}/deployments/1"
    victim = (await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))).replicas[0]
    fake(server).fail_start[app_of(model.name)] = "RuntimeError: the GPU driver is gone"
    fake(server).kill_replica(app_of(model.name), victim.id)

    async def explained() -> bool:
        d = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
        return "Serve reports the application DEPLOY_FAILED" in d.message

    await eventually("Serve's report on the deployment", explained)
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
    assert f"{victim.id} (pid {victim.pid} on {victim.node}) stopped unexpectedly" in dep.message
    assert "GPU driver is gone" in dep.message
    assert (await deployed(stub, model.name)).state == pb.MODEL_STATE_DEPLOYED
    del fake(server).fail_start[app_of(model.name)]
    failing = next(r for r in fake(server).apps[app_of(model.name)].replicas if r.fails)
    fake(server).kill_replica(app_of(model.name), failing.id)  # Serve tries again: it runs

    async def healthy() -> bool:
        d = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
        running = [r for r in d.replicas if r.state == pb.REPLICA_STATE_RUNNING]
        return "DEPLOY_FAILED" not in d.message and len(running) == 2

    await eventually("the application healthy again", healthy)
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=name))
    assert dep.message.startswith(
        f"replica {victim.id} (pid {victim.pid} on {victim.node}) stopped unexpectedly"
    )


@contextlib.asynccontextmanager
async def own_server(
    database_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Server, Stub]]:
    async with (
        running(fake_settings(database_url, tmp_path, **overrides)) as srv,
        grpc.aio.insecure_channel(srv.grpc_address) as channel,
    ):
        yield srv, Stub(channel)


@pytest.mark.slow
async def test_an_application_deleted_while_it_rolls_out_comes_back(
    database_url: str, tmp_path: Path, project: str
) -> None:
    async with own_server(database_url, tmp_path, deploy_timeout_s=20.0) as (server, stub):
        model = await create_model(stub, project)
        assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
        fake(server).start_delay_s = 1.0
        op = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name, build=f"{model.name}/builds/1", resources=resources(2, cpus=1)
            )
        )
        await eventually("the rollout applied", lambda: _spec_is(server, model.name, op.deployment))
        fake(server).delete_app(app_of(model.name))  # mid-rollout, behind our back
        done = await wait(stub, op)
        assert not done.HasField("error"), done.error
        m = await deployed(stub, model.name)
        assert m.state == pb.MODEL_STATE_DEPLOYED and m.active_deployment == op.deployment


@pytest.mark.slow
async def test_the_loops_go_on_while_the_cluster_is_unreachable_and_recover(
    database_url: str, tmp_path: Path, project: str
) -> None:
    async with own_server(database_url, tmp_path, deploy_timeout_s=30.0) as (server, stub):
        model = await create_model(stub, project)
        assert not (await build(stub, model.name, deploy=pb_deploy(2))).HasField("error")
        cluster = fake(server)
        cluster.unreachable = True  # then the cluster restarts: nothing runs on it
        cluster.delete_all()
        # A change while it is gone: refused at once, with a retry hint; nothing changes.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateDeployment(
                rpc.CreateDeploymentRequest(
                    parent=model.name, build=f"{model.name}/builds/1", resources=resources(1)
                )
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(refused.value)[0] == "CLUSTER_UNAVAILABLE"
        m = await deployed(stub, model.name)  # reads answer all along
        assert m.state == pb.MODEL_STATE_DEPLOYED
        assert m.active_deployment == f"{model.name}/deployments/1"
        await cluster.reconnected()  # a new, empty cluster: every model is applied again

        async def serving_again() -> bool:
            app = cluster.apps.get(app_of(model.name))
            dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
            running = [r for r in dep.replicas if r.state == pb.REPLICA_STATE_RUNNING]
            return app is not None and len(running) == 2

        await eventually("the model serving again", serving_again)
        op = await wait(stub, await stub.RestartModel(rpc.RestartModelRequest(name=model.name)))
        assert not op.HasField("error"), "the dispatcher and the reconciler went on"


@pytest.mark.slow
async def test_a_build_that_never_starts_fails_at_the_build_deadline(
    database_url: str, tmp_path: Path, project: str
) -> None:
    async with own_server(database_url, tmp_path, build_timeout_s=1.0) as (server, stub):
        fake(server).builds_may_start.clear()  # as a Ray task waiting for a free CPU
        model = await create_model(stub, project)
        op = await build(stub, model.name, deploy=pb_deploy(1))
        assert op_reason(op) == "BUILD_FAILED" and "timed out after 1 s" in op.error.message
        b = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
        assert b.state == pb.BUILD_STATE_FAILED and "timed out" in b.error
        assert (await deployed(stub, model.name)).state == pb.MODEL_STATE_FAILED


def pb_deploy(replicas: int) -> rpc.DeployOptions:
    return rpc.DeployOptions(resources=resources(replicas))


async def _spec_is(server: Server, model: str, deployment: str) -> bool:
    app = fake(server).apps.get(app_of(model))
    return app is not None and app.spec.deployment_name == deployment
