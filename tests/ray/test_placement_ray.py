"""A deploy asking for more GPUs than the cluster has fails at its deadline, saying why."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.integration.conftest import MODEL_V1, Stub, build, resources
from tests.ray.conftest import ray_server
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
    op = await build(stub, model.name, MODEL_V1, deploy=deploy, seconds=120)
    assert op.HasField("error")
    dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=op.deployment))
    assert dep.state == pb.DEPLOYMENT_STATE_FAILED
    assert "after 6s" in dep.message
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "each needs 3 GPU" in dep.message and "the cluster has 2 GPU" in dep.message, dep.message
    m = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert m.state == pb.MODEL_STATE_FAILED
