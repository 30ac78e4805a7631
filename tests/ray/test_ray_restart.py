"""After the whole Ray cluster restarts (the server and the local Ray it owns stop, then
start again on the same data dir), every model that should serve serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, Stub, build, resources
from tests.helpers.servers import MODELCTL

pytestmark = pytest.mark.ray


class Serve:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.popen: subprocess.Popen[str] | None = None
        self.grpc = ""

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [
                MODELCTL,
                "serve",
                "--insecure-no-auth",
                "--console-port=0",
                "--grpc-port=0",
                "--http-port=0",
                f"--data-dir={self.data}",
                "--num-cpus=2",
                "--num-gpus=1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().strip()
        assert line.startswith("ready grpc="), f"unexpected first line {line!r}"
        self.grpc = line.split()[1].removeprefix("grpc=")

    def stop(self) -> int:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(120)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return code


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path / "data")
    yield s
    if s.popen is not None and s.popen.poll() is None:
        s.popen.kill()
        s.popen.wait()
        if s.popen.stdout is not None:
            s.popen.stdout.close()


async def answers(stub: Stub, model: str, seconds: float) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as http:

        async def answer() -> dict[str, object]:
            m = await stub.GetModel(rpc.GetModelRequest(name=model))
            assert m.state == pb.MODEL_STATE_DEPLOYED, pb.ModelState.Name(m.state)
            try:
                r = await http.post(m.endpoint, json={"x": 1})
            except httpx.HTTPError as e:
                raise AssertionError(f"no answer: {e!r}") from e
            assert r.status_code == 200, r.text
            body: dict[str, object] = r.json()
            return body

        return await eventually(f"{model} answering", answer, seconds, 1)


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
