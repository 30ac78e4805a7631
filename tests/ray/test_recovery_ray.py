"""On a real Ray Serve: a failing new build leaves the last good deployment serving under
load; a replica killed from outside is replaced and the event says so; an application
deleted behind our back comes back."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
import pytest

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.integration.conftest import MODEL_V1, Stub, build, resources, wait
from tests.ray.conftest import ray_server
from tests.ray.test_workflow_ray import call, under_load
from workers.backend import Backend

pytestmark = pytest.mark.ray

RAISES_AT_START = (
    "import os\nif os.environ.get('CP_RESTART_GENERATION') is not None:\n"
    "    raise RuntimeError('cannot reach the feature store')\n"
    "def predict(body):\n    return {'version': 2}\n"
)


@pytest.fixture(scope="module")
async def server(
    ray_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with ray_server(ray_backend, tmp_path_factory.mktemp("cp-recovery")) as srv:
        yield srv


@pytest.fixture(scope="module")
async def stub(server: Server) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        yield Stub(channel)


async def deployment(stub: Stub, model: str) -> pb.Deployment:
    m = await stub.GetModel(rpc.GetModelRequest(name=model))
    dep: pb.Deployment = await stub.GetDeployment(
        rpc.GetDeploymentRequest(name=m.active_deployment)
    )
    return dep


async def test_a_failing_build_leaves_the_last_good_one_serving(stub: Stub, server: Server) -> None:
    model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/rec", model_id="m"))
    deploy = rpc.DeployOptions(resources=resources(2, cpus=0.25))
    op = await build(stub, model.name, MODEL_V1, deploy=deploy, seconds=180)
    assert not op.HasField("error"), op.error
    endpoint = (await stub.GetModel(rpc.GetModelRequest(name=model.name))).endpoint

    failing = build(stub, model.name, RAISES_AT_START, deploy=deploy, seconds=180)
    op, failures, total = await under_load(endpoint, failing)
    assert op.HasField("error") and "feature store" in op.error.message
    assert total > 20 and failures == [], failures[:5]
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_DEPLOYED
    assert m.active_deployment == f"{model.name}/deployments/1"
    body = (await call(endpoint, {"x": 1})).json()
    assert body["success"] and body["build"] == f"{model.name}/builds/1"

    # A replica killed from outside: Serve replaces it, the deployment says which.
    for _ in range(240):  # the last good spec re-applied: its replicas all run
        before = await deployment(stub, model.name)
        running = [r for r in before.replicas if r.state == pb.REPLICA_STATE_RUNNING]
        if len(running) == 2 and len(before.replicas) == 2:
            break
        await asyncio.sleep(0.5)
    victim = running[0]
    os.kill(victim.pid, signal.SIGKILL)
    for _ in range(240):
        dep = await deployment(stub, model.name)
        ids = {r.id for r in dep.replicas if r.state == pb.REPLICA_STATE_RUNNING}
        if victim.id not in ids and len(ids) == 2:
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError(f"the killed replica was not replaced: {dep}")
    assert f"{victim.id} (pid {victim.pid}) stopped unexpectedly" in dep.message, dep.message
    (replacement,) = ids - {r.id for r in running}
    assert f"Serve replaced it with {replacement}" in dep.message, dep.message

    # The application deleted behind our back comes back.
    await server.backend.apply([])
    for _ in range(240):
        if "missing from Serve" in (await deployment(stub, model.name)).message:
            break
        await asyncio.sleep(0.25)
    else:
        raise AssertionError("the missing application was not noticed")
    for _ in range(240):
        response = await call(endpoint, {"x": 1})
        if response.status_code == 200:
            break
        await asyncio.sleep(0.5)
    assert response.json()["build"] == f"{model.name}/builds/1"
    op = await stub.StopModel(rpc.StopModelRequest(name=model.name))
    op = await wait(stub, op, 120)
    assert not op.HasField("error"), op.error
