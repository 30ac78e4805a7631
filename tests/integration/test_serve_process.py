"""`modelctl serve` as users run it: a real process, ready line, health, reflection, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc
from tests.integration.conftest import build, create_model, resources

MODELCTL = str(Path(sys.executable).with_name("modelctl"))


class Proc:
    def __init__(self, popen: subprocess.Popen[str], grpc_addr: str, http_addr: str) -> None:
        self.popen = popen
        self.grpc = grpc_addr
        self.http = http_addr


@pytest.fixture
def serve(tmp_path: Path, database_url: str) -> Iterator[Proc]:
    popen = subprocess.Popen(
        [
            MODELCTL,
            "serve",
            "--insecure-no-auth",
            "--grpc-port",
            "0",
            "--http-port",
            "18999",
            "--data-dir",
            str(tmp_path / "data"),
            "--database-url",
            database_url,
            "--backend",
            "fake",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert popen.stdout is not None
    line = popen.stdout.readline().strip()
    assert line.startswith("ready grpc="), f"unexpected first line {line!r}"
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    proc = Proc(popen, fields["grpc"], fields["http"])
    yield proc
    if popen.poll() is None:
        popen.kill()
        popen.wait()
    popen.stdout.close()


async def test_ready_line_health_reflection_and_clean_sigterm(serve: Proc) -> None:
    assert serve.http == "127.0.0.1:18999"
    async with grpc.aio.insecure_channel(serve.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "modellifecycle.v1.ModelLifecycle"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> reflection_pb2.ServerReflectionRequest:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        services: set[str] = set()
        async for reply in refl.ServerReflectionInfo(ask()):
            services |= {s.name for s in reply.list_services_response.service}
        assert "modellifecycle.v1.ModelLifecycle" in services
        assert "grpc.health.v1.Health" in services

        # An RPC in flight when SIGTERM arrives completes; then the process exits 0.
        stub = service_pb2_grpc.ModelLifecycleStub(channel)
        model = await create_model(stub, "projects/sig")
        op = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
        restart = await stub.RestartModel(rpc.RestartModelRequest(name=model.name))
        waiting = asyncio.ensure_future(
            stub.WaitOperation(
                rpc.WaitOperationRequest(
                    name=restart.name, timeout=duration_pb2.Duration(seconds=5)
                )
            )
        )
        await asyncio.sleep(0.2)
        serve.popen.send_signal(signal.SIGTERM)
        result = await waiting
        assert result.name == restart.name
        assert op.done
    assert await asyncio.to_thread(serve.popen.wait, 30) == 0
