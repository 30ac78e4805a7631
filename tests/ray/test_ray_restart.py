"""After the whole Ray cluster restarts (the server and the local Ray it owns stop, then
start again on the same data dir), every model that should serve serves again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import MODEL_V1, Stub, build, resources
from tests.helpers.embedded import Serve, answers, serving

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
