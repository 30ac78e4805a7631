"""CancelOperation on a real Ray cluster: a running build's Ray task is interrupted, its
import subprocess killed and its partial output removed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub, op_reason, start_build
from tests.helpers.ray_cluster import ray_server
from workers.backend import Backend

pytestmark = pytest.mark.ray

# An import that takes long (what the cancel must interrupt).
SLOW_IMPORT = "import time\ntime.sleep(30)\ndef predict(body):\n    return body\n"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        line = " ".join(w.decode(errors="replace") for w in words if w)
        if text in line:
            found.append(line)
    return found


async def test_cancelling_a_running_build_interrupts_its_ray_task(
    ray_backend: Backend, tmp_path: Path
) -> None:
    async with (
        ray_server(ray_backend, tmp_path / "data") as server,
        grpc.aio.insecure_channel(server.grpc_address) as channel,
    ):
        stub = Stub(channel)
        model = await stub.CreateModel(rpc.CreateModelRequest(parent="projects/cx", model_id="m"))
        files = {"slow_model.py": SLOW_IMPORT}
        op = await start_build(stub, model.name, files, file_path="slow_model.py")
        staging = str(server.settings.artifacts_dir / ".staging")
        await eventually(  # the Ray task imports the module, which sleeps there
            "the build's import running", lambda: processes_mentioning(staging), 60, 0.1
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = await stub.CancelOperation(rpc.CancelOperationRequest(name=op.name))
        took = loop.time() - started
        assert done.done and took < 15, f"not stopped after {took:.1f}s"
        assert done.error.code == grpc.StatusCode.CANCELLED.value[0]
        assert op_reason(done) == "OPERATION_CANCELLED"
        build = await stub.GetBuild(rpc.GetBuildRequest(name=op.target))
        assert build.state == pb.BUILD_STATE_FAILED and "cancelled" in build.error

        def cleaned_up() -> bool:  # the interrupted task cleans up as it ends
            left = [p for p in server.settings.artifacts_dir.rglob("*") if p.name != ".staging"]
            assert left == [], f"a cancelled build left {left}"
            assert processes_mentioning(staging) == [], "the import subprocess survived"
            return True

        await eventually("the cancelled build cleaned up", cleaned_up, 10, 0.1)
