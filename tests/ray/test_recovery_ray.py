"""On a real Ray Serve: a failing new build leaves the last good deployment serving under
load; a replica killed from outside is replaced and the event says so; an application
deleted behind our back comes back."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, Stub, build, resources, wait
from tests.helpers.ray_cluster import call, ray_server, under_load
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

    async def all_running() -> list[pb.Replica]:  # the last good spec re-applied
        dep = await deployment(stub, model.name)
        running = [r for r in dep.replicas if r.state == pb.REPLICA_STATE_RUNNING]
        assert len(running) == 2 and len(dep.replicas) == 2, dep
        return running

    running = await eventually("its 2 replicas running", all_running, 120, 0.5)
    victim = running[0]
    os.kill(victim.pid, signal.SIGKILL)

    async def replaced() -> pb.Deployment:
        dep = await deployment(stub, model.name)
        ids = {r.id for r in dep.replicas if r.state == pb.REPLICA_STATE_RUNNING}
        assert victim.id not in ids and len(ids) == 2, dep
        return dep

    dep = await eventually("the killed replica replaced", replaced, 120, 0.5)
    ids = {r.id for r in dep.replicas if r.state == pb.REPLICA_STATE_RUNNING}
    assert f"{victim.id} (pid {victim.pid} on {victim.node}) stopped unexpectedly" in dep.message, (
        dep.message
    )
    assert len(ids - {r.id for r in running}) == 1, "one replica runs in its place"
    # Serve sometimes starts a replacement and stops it again for another (seen twice in
    # CI since replicas start in ready workers): the note names what it saw start first.
    said = dep.message.split("Serve replaced it with ", 1)
    assert len(said) == 2 and said[1].split()[0], dep.message

    # The application deleted behind our back comes back.
    await server.backend.apply([])

    async def noticed() -> bool:
        return "missing from Serve" in (await deployment(stub, model.name)).message

    await eventually("the missing application noticed", noticed, 60, 0.25)

    async def answers() -> httpx.Response:
        response = await call(endpoint, {"x": 1})
        assert response.status_code == 200, response.text
        return response

    response = await eventually("the application back and answering", answers, 120, 0.5)
    assert response.json()["build"] == f"{model.name}/builds/1"
    op = await stub.StopModel(rpc.StopModelRequest(name=model.name))
    op = await wait(stub, op, 120)
    assert not op.HasField("error"), op.error
