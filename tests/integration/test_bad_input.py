"""Bad input for every RPC: a clear error, the right code, an ErrorInfo, nothing lost."""

from __future__ import annotations

import io
import stat
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import (
    MODEL_V1,
    Stub,
    build,
    create_model,
    error_info,
    resources,
    upload,
    zip_bytes,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def fails(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None, field: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, e.value.details()
    got_reason, _, fields = error_info(e.value)
    assert got_reason, "every error carries an ErrorInfo reason"
    assert got_reason == got_reason.upper()
    if reason is not None:
        assert got_reason == reason, e.value.details()
    if field is not None:
        assert any(f.startswith(field) for f in fields), fields
    return e.value


@pytest.mark.parametrize(
    "parent,model_id,field",
    [
        ("projects/p1", "Iris", "model_id"),
        ("projects/p1", "1iris", "model_id"),
        ("projects/p1", "iris-", "model_id"),
        ("projects/p1", "a" * 64, "model_id"),
        ("projects/p1", "", "model_id"),
        ("projects/P1", "iris", "parent"),
        ("project/p1", "iris", "parent"),
        ("", "iris", "parent"),
    ],
)
async def test_create_model_rejects_bad_ids(
    stub: Stub, parent: str, model_id: str, field: str
) -> None:
    await fails(
        stub.CreateModel(rpc.CreateModelRequest(parent=parent, model_id=model_id)),
        INVALID,
        field=field,
    )


async def test_models_errors(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    await fails(
        stub.CreateModel(rpc.CreateModelRequest(parent=project, model_id="iris")),
        grpc.StatusCode.ALREADY_EXISTS,
        "MODEL_EXISTS",
    )
    await fails(
        stub.GetModel(rpc.GetModelRequest(name=f"{project}/models/nope")),
        NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    await fails(stub.GetModel(rpc.GetModelRequest(name="models/iris")), INVALID, field="name")
    await fails(
        stub.ListModels(rpc.ListModelsRequest(parent=project, page_size=-1)),
        INVALID,
        field="page_size",
    )
    await fails(
        stub.ListModels(rpc.ListModelsRequest(parent=project, page_token="garbage")),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )
    await fails(stub.DeleteModel(rpc.DeleteModelRequest(name=f"{project}/models/nope")), NOT_FOUND)
    # Nothing was lost by the failures.
    got = await stub.GetModel(rpc.GetModelRequest(name=model.name))
    assert got.state == pb.MODEL_STATE_NOT_DEPLOYED


async def test_list_models_paginates(stub: Stub, project: str) -> None:
    for i in range(5):
        await create_model(stub, project, f"m{i}")
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListModels(
            rpc.ListModelsRequest(parent=project, page_size=2, page_token=token)
        )
        seen += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"{project}/models/m{i}" for i in range(5)]


def _zip_with(name: str, mode: int | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        z.writestr(info, "x")
        z.writestr("model.py", MODEL_V1)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        _zip_with("../evil.py"),
        _zip_with("/etc/evil.py"),
        _zip_with("a/../../evil.py"),
        _zip_with("link", stat.S_IFLNK | 0o777),
        b"this is not a zip file",
    ],
)
async def test_upload_rejects_unsafe_archives(stub: Stub, project: str, data: bytes) -> None:
    model = await create_model(stub, project)
    await fails(upload(stub, model.name, data), INVALID, "UNSAFE_ARCHIVE")


async def test_upload_errors(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    big = zip_bytes({"model.py": MODEL_V1, "blob.bin": "x" * 10}) + b"\0" * (300 * 1024)
    await fails(upload(stub, model.name, big, chunk=64 * 1024), INVALID, "SOURCE_TOO_LARGE")
    await fails(
        upload(stub, f"{project}/models/nope", zip_bytes({"model.py": MODEL_V1})), NOT_FOUND
    )
    await fails(upload(stub, "", zip_bytes({"model.py": MODEL_V1})), INVALID, field="parent")
    await fails(upload(stub, model.name, b""), INVALID)


async def test_create_build_errors(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    src = await upload(stub, model.name, zip_bytes({"model.py": MODEL_V1, "pkg/x.py": ""}))

    def req(**kw: Any) -> rpc.CreateBuildRequest:
        base: dict[str, Any] = dict(
            parent=model.name,
            source_sha256=src.sha256,
            file_path="model.py",
            function_name="predict",
        )
        base.update(kw)
        return rpc.CreateBuildRequest(**base)

    for path in ("../model.py", "/model.py", "pkg/../../model.py"):
        await fails(stub.CreateBuild(req(file_path=path)), INVALID, field="file_path")
    await fails(stub.CreateBuild(req(file_path="other.py")), INVALID, "FILE_NOT_IN_SOURCE")
    await fails(
        stub.CreateBuild(req(function_name="not an identifier")), INVALID, field="function_name"
    )
    await fails(stub.CreateBuild(req(source_sha256="abc")), INVALID, field="source_sha256")
    await fails(stub.CreateBuild(req(source_sha256="0" * 64)), NOT_FOUND, "SOURCE_NOT_FOUND")
    await fails(stub.CreateBuild(req(parent=f"{project}/models/nope")), NOT_FOUND)
    for bad, field in (
        (resources(0), "deploy.resources.replicas"),
        (resources(1, cpus=-1), "deploy.resources.cpus"),
        (resources(1, memory_mib=-5), "deploy.resources.memory_mib"),
        (resources(1, gpus=-0.5), "deploy.resources.gpus"),
        (resources(100_000), "deploy.resources.replicas"),
        (resources(1, cpus=1e9), "deploy.resources.cpus"),
    ):
        await fails(
            stub.CreateBuild(req(deploy=rpc.DeployOptions(resources=bad))),
            INVALID,
            "INVALID_RESOURCES",
            field=field,
        )
    await fails(
        stub.CreateBuild(
            req(deploy=rpc.DeployOptions(resources=resources(1), environment={"bad name": "x"}))
        ),
        INVALID,
        "INVALID_ENVIRONMENT",
    )
    builds = await stub.ListBuilds(rpc.ListBuildsRequest(parent=model.name))
    assert len(builds.builds) == 0, "no failed request created a build"


async def test_deployment_stop_restart_operation_errors(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)
    other = await create_model(stub, project, "other")
    await fails(
        stub.RestartModel(rpc.RestartModelRequest(name=model.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_NEVER_DEPLOYED",
    )
    await fails(
        stub.StopModel(rpc.StopModelRequest(name=model.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_NOT_RUNNING",
    )
    await fails(
        stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model.name, build=f"{model.name}/builds/7")
        ),
        NOT_FOUND,
        "BUILD_NOT_FOUND",
    )
    await fails(
        stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model.name, build=f"{other.name}/builds/1")
        ),
        INVALID,
        "BUILD_OF_ANOTHER_MODEL",
    )
    await fails(
        stub.CreateDeployment(rpc.CreateDeploymentRequest(parent=model.name, build="builds/1")),
        INVALID,
        field="build",
    )
    await build(stub, model.name)
    await fails(
        stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model.name, build=f"{model.name}/builds/1", resources=resources(-1)
            )
        ),
        INVALID,
        field="resources.replicas",
    )
    await fails(
        stub.GetDeployment(rpc.GetDeploymentRequest(name=f"{model.name}/deployments/9")), NOT_FOUND
    )
    await fails(stub.GetBuild(rpc.GetBuildRequest(name=f"{model.name}/builds/0")), INVALID)
    await fails(stub.GetOperation(rpc.GetOperationRequest(name="operations/nope")), NOT_FOUND)
    await fails(stub.GetOperation(rpc.GetOperationRequest(name="ops/x")), INVALID)
    await fails(
        stub.WaitOperation(
            rpc.WaitOperationRequest(
                name="operations/nope", timeout=duration_pb2.Duration(seconds=1)
            )
        ),
        NOT_FOUND,
    )
    await fails(
        stub.ListOperations(rpc.ListOperationsRequest(parent=f"{project}/models/x")), NOT_FOUND
    )


async def test_watch_errors(stub: Stub, project: str) -> None:
    model = await create_model(stub, project)

    async def first(req: rpc.WatchModelRequest) -> None:
        async for _ in stub.WatchModel(req):
            return

    watchers: list[Callable[[], Awaitable[None]]] = [
        lambda: first(rpc.WatchModelRequest(name=f"{project}/models/nope")),
        lambda: first(rpc.WatchModelRequest(name=model.name, since_revision=-1)),
        lambda: first(rpc.WatchModelRequest(name=model.name, since_revision=10**12)),
    ]
    codes = [NOT_FOUND, INVALID, INVALID]
    for watch, code in zip(watchers, codes, strict=True):
        await fails(watch(), code)
