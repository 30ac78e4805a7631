"""`modelctl serve` as users run it: a real process, ready line, health, reflection, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc
from tests.helpers import eventually
from tests.helpers.api import SLOW_IMPORT, build, create_model, resources, start_build
from tests.helpers.servers import MODELCTL, metric

pytestmark = pytest.mark.slow  # a server process, and an RPC that waits seconds

# An import that takes a minute (what is tested: an RPC waiting for it is in flight).


class Proc:
    def __init__(self, popen: subprocess.Popen[str], fields: dict[str, str]) -> None:
        self.popen = popen
        self.grpc = fields["grpc"]
        self.http = fields["http"]
        self.metrics = fields["metrics"]

    async def in_flight(self, method: str) -> float:
        """RPCs of ``method`` the server has started and not finished, from its /metrics."""
        started = await metric(self.metrics, "grpc_server_started_total", grpc_method=method)
        handled = await metric(self.metrics, "grpc_server_handled_total", grpc_method=method)
        return started - handled


@pytest.fixture
def serve(tmp_path: Path, fresh_db: str) -> Iterator[Proc]:
    """A database of its own: its /metrics read every record, and other tests leave theirs
    in the shared one (test_recovery.py's corrupt deployment fails the scrape)."""
    popen = subprocess.Popen(
        [
            MODELCTL,
            "serve",
            "--insecure-no-auth",
            "--console-port=0",
            "--grpc-port",
            "0",
            "--http-port",
            "18999",
            "--data-dir",
            str(tmp_path / "data"),
            "--database-url",
            fresh_db,
            "--backend",
            "fake",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert popen.stdout is not None
    line = popen.stdout.readline().strip()
    assert line.startswith("ready grpc="), f"unexpected first line {line!r}"
    proc = Proc(popen, dict(part.split("=", 1) for part in line.split()[1:]))
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

        # An RPC in flight when SIGTERM arrives completes; then the process exits 0. The
        # RPC waits for a build whose import takes a minute: it is still waiting then.
        stub = service_pb2_grpc.ModelLifecycleStub(channel)
        model = await create_model(stub, "projects/sig")
        op = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
        assert op.done and not op.HasField("error"), op
        slow = await start_build(stub, model.name, {"model.py": SLOW_IMPORT})
        waiting = asyncio.ensure_future(
            stub.WaitOperation(
                rpc.WaitOperationRequest(name=slow.name, timeout=duration_pb2.Duration(seconds=3))
            )
        )
        await eventually("the WaitOperation in flight", lambda: serve.in_flight("WaitOperation"))
        serve.popen.send_signal(signal.SIGTERM)
        result = await waiting
        assert result.name == slow.name
    assert await asyncio.to_thread(serve.popen.wait, 30) == 0
