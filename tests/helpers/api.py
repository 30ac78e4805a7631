"""A control plane in this process, on a real socket with the fake backend, and the gRPC
calls of a workflow: create a model, upload and build a source, wait for an operation,
read the rich error of a failed call."""

from __future__ import annotations

import contextlib
import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controlplane.config import Settings
from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc
from tests.helpers import eventually
from workers.fake_backend import FakeBackend

if TYPE_CHECKING:  # the typed view of a stub on a grpc.aio channel (mypy-protobuf)
    Stub = service_pb2_grpc.ModelLifecycleAsyncStub
else:
    Stub = service_pb2_grpc.ModelLifecycleStub


def fake_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """A server on a free port with the fake backend and short deadlines, for tests."""
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "grpc_port": 0,
        "database_url": database_url,
        "backend": "fake",
        "num_gpus": 2,
        "deploy_timeout_s": 3.0,
        "placement_timeout_s": 1.0,
        "reconcile_interval_s": 0.05,
        "max_source_bytes": 256 * 1024,
        "grace_s": 1.0,
        "insecure_no_auth": True,  # tests/integration/test_auth.py turns tokens on
    }
    return Settings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Server]:
    srv = Server(settings, backend=FakeBackend(num_gpus=settings.num_gpus))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def op_reason(op: pb.Operation) -> str:
    """The ErrorInfo reason of a failed operation's error."""
    for detail in op.error.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def zip_bytes(files: dict[str, str]) -> bytes:
    """The same files give the same bytes (fixed timestamps), as `modelctl build` zips."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return buf.getvalue()


MODEL_V1 = "def predict(body):\n    return {'echo': body, 'version': 1}\n"
MODEL_V2 = "def classify(body):\n    return {'echo': body, 'version': 2}\n"
# A model whose import takes a minute: its build is still running while a test acts on it
# (cancels it, stops the server); the tests wait on conditions, never on this.
SLOW_IMPORT = "import time\ntime.sleep(60)\ndef predict(body):\n    return body\n"


async def upload(stub: Stub, parent: str, data: bytes, chunk: int = 1000) -> pb.Source:
    async def gen() -> AsyncIterator[rpc.UploadSourceRequest]:
        for i in range(0, len(data), chunk):
            yield rpc.UploadSourceRequest(
                parent=parent if i == 0 else "", chunk=data[i : i + chunk]
            )

    result: pb.Source = await stub.UploadSource(gen())
    return result


async def create_model(stub: Stub, project: str, model_id: str = "iris") -> pb.Model:
    model: pb.Model = await stub.CreateModel(
        rpc.CreateModelRequest(parent=project, model_id=model_id)
    )
    return model


async def wait(stub: Stub, op: pb.Operation, seconds: float = 30) -> pb.Operation:
    """``op`` once done, asked with WaitOperation (which itself waits up to a second)."""

    async def finished() -> pb.Operation:
        got: pb.Operation = await stub.WaitOperation(
            rpc.WaitOperationRequest(name=op.name, timeout=duration_pb2.Duration(seconds=1))
        )
        assert got.done, f"not done yet: {got}"
        return got

    return await eventually(f"operation {op.name} done", finished, seconds, interval=0)


async def build(
    stub: Stub,
    model: str,
    source: str = MODEL_V1,
    function: str = "predict",
    deploy: rpc.DeployOptions | None = None,
    seconds: float = 30,
    **more: Any,
) -> pb.Operation:
    """Uploads ``source`` as model.py, builds it (and deploys when asked), waits till done
    (``more``: other CreateBuildRequest fields, e.g. wait_for_capacity)."""
    op = await start_build(stub, model, {"model.py": source}, function, deploy=deploy, **more)
    return await wait(stub, op, seconds)


async def start_build(
    stub: Stub,
    model: str,
    files: dict[str, str],
    function: str = "predict",
    file_path: str = "model.py",
    **more: Any,
) -> pb.Operation:
    """Uploads ``files`` and starts building ``file_path``'s ``function``; returns the
    operation (``more``: other CreateBuildRequest fields, e.g. deploy, no_cache)."""
    src = await upload(stub, model, zip_bytes(files))
    op: pb.Operation = await stub.CreateBuild(
        rpc.CreateBuildRequest(
            parent=model,
            source_sha256=src.sha256,
            file_path=file_path,
            function_name=function,
            **more,
        )
    )
    return op


def resources(
    replicas: int = 1, cpus: float = 0, memory_mib: int = 0, gpus: float = 0
) -> pb.Resources:
    return pb.Resources(replicas=replicas, cpus=cpus, memory_mib=memory_mib, gpus=gpus)


def error_info(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str], list[str]]:
    """(reason, metadata, violated fields) from the rich status of a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status details on the error"
    reason, metadata, fields = "", {}, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, metadata, fields


async def reconciler_passes(server: Server, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Returns once the reconciler has made ``n`` more passes (each a look at what Serve
    runs; a settled model that did not change is skipped in it)."""
    reconciler = server.reconciler
    assert reconciler is not None
    tick, passes = reconciler.tick, 0

    async def counted() -> None:
        nonlocal passes
        await tick()
        passes += 1

    monkeypatch.setattr(reconciler, "tick", counted)
    await eventually(f"{n} reconciler passes", lambda: passes >= n)
    monkeypatch.setattr(reconciler, "tick", tick)
