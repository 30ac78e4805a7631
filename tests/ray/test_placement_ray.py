"""A deploy asking for more GPUs than the cluster has fails at its deadline, saying why;
on a model that serves, it and a restart whose replicas fail at start leave the replicas
from before serving, with no failed request."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, Stub, build, op_reason, resources, wait
from tests.helpers.ray_cluster import ray_server, under_load
from workers.backend import Backend

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
async def short_deadline_stub(
    ray_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stub]:
    data = tmp_path_factory.mktemp("cp-placement")
    async with (
        ray_server(ray_backend, data, placement_timeout_s=6.0) as server,
        grpc.aio.insecure_channel(server.grpc_address) as channel,
    ):
        yield Stub(channel)


async def test_gpus_that_cannot_be_placed_fail_the_deploy_with_the_reason(
    short_deadline_stub: Stub,
) -> None:
    stub = short_deadline_stub
    model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/gpu", model_id="big"))
    deploy = rpc.DeployOptions(resources=resources(1, cpus=0.1, gpus=3))
    # Asked to wait for capacity: else it is refused up front (test_capacity_ray.py).
    op = await build(stub, model.name, MODEL_V1, deploy=deploy, seconds=120, wait_for_capacity=True)
    assert op.HasField("error")
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
    assert dep.state == pb.DEPLOYMENT_STATE_FAILED
    assert "after 6s" in dep.message
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "each needs 3 GPU" in dep.message and "the cluster has 2 GPU" in dep.message, dep.message
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_FAILED


# Starts at restart generation 0; fails at start in generation 1 (its first restart).
FIRST_RESTART_FAILS = (
    "import os\n"
    "if os.environ.get('CP_RESTART_GENERATION') == '1':\n"
    "    raise RuntimeError('the restarted replica cannot reach the feature store')\n"
    "def predict(body):\n    return {'echo': body, 'version': 1}\n"
)


async def serving(stub: Stub, model: str, ids: set[str]) -> pb.Deployment:
    """The active deployment once exactly the replicas ``ids`` run (nothing else left)."""

    async def only_those() -> pb.Deployment:
        m = await stub.GetModel(rpc.GetModelRequest(name=model))
        dep: pb.Deployment = await stub.GetDeployment(
            rpc.GetDeploymentRequest(name=m.active_deployment)
        )
        running = {r.id for r in dep.replicas if r.state == pb.REPLICA_STATE_RUNNING}
        assert running == ids and len(dep.replicas) == len(ids), dep
        return dep

    return await eventually(f"{model} back to the replicas {ids}", only_those, 60, 0.25)


async def test_failed_changes_leave_the_last_good_replicas_serving(
    short_deadline_stub: Stub,
) -> None:
    stub = short_deadline_stub
    model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/gpu", model_id="ok"))
    op = await build(
        stub,
        model.name,
        FIRST_RESTART_FAILS,
        deploy=rpc.DeployOptions(resources=resources(2, cpus=0.25)),
        seconds=180,
    )
    assert not op.HasField("error"), op.error
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=m.active_deployment))
    before = {r.id for r in dep.replicas}

    async def gpu_deploy() -> pb.Operation:
        op = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name,
                build=f"{model.name}/builds/1",
                resources=resources(2, cpus=0.25, gpus=3),
                wait_for_capacity=True,
            )
        )
        op = await wait(stub, op, 120)
        await serving(stub, model.name, before)  # the load goes on until it settles
        return op

    op, failures, total = await under_load(m.endpoint, gpu_deploy())
    assert op_reason(op) == "PLACEMENT_TIMEOUT", op.error
    assert total > 20 and failures == [], failures[:5]
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_DEPLOYED and m.active_deployment == dep.name
    assert "GPU" in m.message

    async def restart() -> pb.Operation:
        op = await stub.RestartModel(rpc.RestartModelRequest(name=model.name))
        op = await wait(stub, op, 180)
        await serving(stub, model.name, before)
        return op

    op, failures, total = await under_load(m.endpoint, restart())
    assert op_reason(op) == "DEPLOY_FAILED" and "feature store" in op.error.message, op.error
    assert total > 20 and failures == [], failures[:5]
    dep = await serving(stub, model.name, before)
    assert dep.state == pb.DEPLOYMENT_STATE_DEPLOYED and "restart failed" in dep.message
