"""After the whole Ray cluster restarts (the server and the local Ray it owns stop, then
start again on the same data dir), every model that should serve serves again."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually, ray_nodes
from tests.helpers.api import MODEL_V1, Stub, build, error_info, resources, wait
from tests.helpers.embedded import Serve, answers, serving
from tests.helpers.servers import free_port

pytestmark = pytest.mark.ray


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from serving(tmp_path / "data")


async def test_models_serve_again_after_the_cluster_restarts(serve: Serve) -> None:
    await asyncio.to_thread(serve.start)
    async with grpc.aio.insecure_channel(serve.grpc) as ch:
        stub = Stub(ch)
        model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/rr", model_id="m"))
        deploy = rpc.DeployOptions(resources=resources(1, cpus=0.25))
        op = await build(stub, model.name, MODEL_V1, deploy=deploy, seconds=240)
        assert not op.HasField("error"), op.error
        assert (await answers(stub, model.name, 60))["success"] is True
    assert await asyncio.to_thread(serve.stop) == 0  # the server and its Ray are gone

    await asyncio.to_thread(serve.start)  # a new Ray cluster: nothing runs on it yet
    async with grpc.aio.insecure_channel(serve.grpc) as ch:
        stub = Stub(ch)
        body = await answers(stub, model.name, 180)
        assert body["build"] == f"{model.name}/builds/1"
    assert await asyncio.to_thread(serve.stop) == 0


async def deployed(stub: Stub, project: str) -> tuple[pb.Model, pb.Operation]:
    """A model of ``project`` built and deployed (1 replica), answering."""
    model = await stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="x"))
    deploy = rpc.DeployOptions(resources=resources(1, cpus=0.25))
    op = await build(stub, model.name, MODEL_V1, deploy=deploy, seconds=240)
    assert not op.HasField("error"), op.error
    assert (await answers(stub, model.name, 60))["success"] is True
    return model, op


async def scale_refused_while_gone(stub: Stub, model: str, build_name: str) -> None:
    """A change that needs the cluster answers UNAVAILABLE with a retry hint."""
    req = rpc.CreateDeploymentRequest(parent=model, build=build_name, resources=resources(2))

    async def refused() -> str:
        try:
            await stub.CreateDeployment(req)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            return error_info(e)[0]
        raise AssertionError("accepted while the cluster is gone")

    assert await eventually("changes refused", refused, 60, 0.5) == "CLUSTER_UNAVAILABLE"


async def test_the_server_reconnects_when_its_ray_cluster_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ray start --head` stopped under a running `modelctl serve --ray-address`, then
    started again at the same address: while it is gone, changes are refused with a
    retry hint and reads answer; once it is back the server starts itself again (the
    same process id, ports and records), re-applies every model, and each serves again."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="cprr", dir="/tmp")
    port = free_port()
    ray_nodes.start_head(port, temp)
    server = Serve(tmp_path / "data", f"--ray-address=127.0.0.1:{port}")
    try:
        await asyncio.to_thread(server.start)
        async with grpc.aio.insecure_channel(server.grpc) as ch:
            stub = Stub(ch)
            model, op = await deployed(stub, "projects/rr")

            ray_nodes.kill_all(temp)  # the whole cluster, at once
            await scale_refused_while_gone(stub, model.name, op.target)
            read = await stub.GetModel(rpc.GetModelRequest(name=model.name))
            assert read.name == model.name, "reads keep working"

            ray_nodes.start_head(port, temp)  # the same address, a new cluster
            body = await answers(stub, model.name, 240)
            assert body["build"] == op.target, "the same build serves again"
            scaled = await stub.CreateDeployment(
                rpc.CreateDeploymentRequest(
                    parent=model.name, build=op.target, resources=resources(2, cpus=0.25)
                )
            )
            done = await wait(stub, scaled, 180)
            assert not done.HasField("error"), done.error
        assert await asyncio.to_thread(server.stop) == 0
    finally:
        server.kill()
        ray_nodes.kill_all(temp)
        shutil.rmtree(temp, ignore_errors=True)
