"""A 100 KB value in any string field of any request: the real error, readable by a
standard client with default options (gRPC's 8 KB soft / 16 KB hard metadata limits).

Every error quotes what it refuses, and all of it travels in the trailers (the status
message and grpc-status-details-bin); unbounded, a long name turned every refusal into
RESOURCE_EXHAUSTED on the client. Each request message of the service is walked through
its descriptor (nested messages and maps too), so a new field is covered without a word
here; a new RPC needs one valid request in VALID below. On SQLite and PostgreSQL, with
auth off and on (the first admin token, which may do everything).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, duration_pb2, message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1, Stub, fake_settings, resources, running, zip_bytes
from tests.helpers.databases import new_postgres_database

LONG = "a" * 100_000
# What a refusal may send back in all: far below gRPC's default 8 KB soft limit.
MAX_TRAILER_BYTES = 4096
SERVICE = rpc.DESCRIPTOR.services_by_name["ModelLifecycle"]
PROJECT = "projects/long"
Md = tuple[tuple[str, str], ...]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
NEVER = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
}


@dataclass
class World:
    """A project with a built and deployed model (``live``: a build, a deployment, a done
    operation, an uploaded source, an invocation key) and a never-deployed one, a token."""

    stub: Stub
    md: Md
    live: str
    idle: str
    sha: str
    build: str
    deployment: str
    operation: str
    token: str
    key: str
    ids: Iterator[int] = field(default_factory=itertools.count)

    def fresh(self) -> str:
        return f"m{next(self.ids)}"


# One valid request of each RPC: each call below makes one of its string fields long.
VALID: dict[str, Callable[[World], message.Message]] = {
    "CreateModel": lambda w: rpc.CreateModelRequest(
        parent=PROJECT,
        model_id=w.fresh(),
        model=pb.Model(display_name="Iris", description="a model"),
        request_id=f"r-{w.fresh()}",
    ),
    "GetModel": lambda w: rpc.GetModelRequest(name=w.live),
    "ListModels": lambda w: rpc.ListModelsRequest(parent=PROJECT),
    "DeleteModel": lambda w: rpc.DeleteModelRequest(name=w.idle),
    "UploadSource": lambda w: rpc.UploadSourceRequest(
        parent=w.live, chunk=zip_bytes({"model.py": MODEL_V1})
    ),
    "CreateBuild": lambda w: rpc.CreateBuildRequest(
        parent=w.live,
        source_sha256=w.sha,
        file_path="model.py",
        function_name="predict",
        comment="a build",
        deploy=rpc.DeployOptions(
            resources=resources(1), environment={"MODE": "x"}, secret_environment={"KEY": "y"}
        ),
        request_id=f"r-{w.fresh()}",
    ),
    "GetBuild": lambda w: rpc.GetBuildRequest(name=w.build),
    "ListBuilds": lambda w: rpc.ListBuildsRequest(parent=w.live),
    "CreateDeployment": lambda w: rpc.CreateDeploymentRequest(
        parent=w.live,
        build=w.build,
        resources=resources(1),
        environment={"MODE": "x"},
        request_id=f"r-{w.fresh()}",
        secret_environment={"KEY": "y"},
    ),
    "GetDeployment": lambda w: rpc.GetDeploymentRequest(name=w.deployment),
    "ListDeployments": lambda w: rpc.ListDeploymentsRequest(parent=w.live),
    "StopModel": lambda w: rpc.StopModelRequest(name=w.live, request_id=f"r-{w.fresh()}"),
    "RestartModel": lambda w: rpc.RestartModelRequest(name=w.live, request_id=f"r-{w.fresh()}"),
    "GetOperation": lambda w: rpc.GetOperationRequest(name=w.operation),
    "ListOperations": lambda w: rpc.ListOperationsRequest(parent=w.live),
    "WaitOperation": lambda w: rpc.WaitOperationRequest(
        name=w.operation, timeout=duration_pb2.Duration()
    ),
    "WatchModel": lambda w: rpc.WatchModelRequest(name=w.live),
    "WatchModels": lambda w: rpc.WatchModelsRequest(parent=PROJECT, filter='state = "DEPLOYED"'),
    "CancelOperation": lambda w: rpc.CancelOperationRequest(name=w.operation),
    "SetTraffic": lambda w: rpc.SetTrafficRequest(
        name=w.live,
        weights=[rpc.TrafficWeight(build=w.build, percent=100)],
        sticky_header="X-User",
        request_id=f"r-{w.fresh()}",
    ),
    "PromoteRollout": lambda w: rpc.PromoteRolloutRequest(name=w.operation),
    "StreamBuildLogs": lambda w: rpc.StreamBuildLogsRequest(name=w.build),
    "ExportBuild": lambda w: rpc.ExportBuildRequest(
        name=w.build, base_image="python:3.11-slim", tag="v1"
    ),
    "CreateToken": lambda w: rpc.CreateTokenRequest(
        parent=PROJECT, role=pb.ROLE_VIEWER, description="a token"
    ),
    "ListTokens": lambda w: rpc.ListTokensRequest(parent=PROJECT),
    "RevokeToken": lambda w: rpc.RevokeTokenRequest(name=w.token),
    "CreateInvocationKey": lambda w: rpc.CreateInvocationKeyRequest(
        parent=w.live, description="a key"
    ),
    "ListInvocationKeys": lambda w: rpc.ListInvocationKeysRequest(parent=w.live),
    "RevokeInvocationKey": lambda w: rpc.RevokeInvocationKeyRequest(name=w.key),
    "ListAuditRecords": lambda w: rpc.ListAuditRecordsRequest(parent=PROJECT),
    "GetModelMetrics": lambda w: rpc.GetModelMetricsRequest(name=w.live),
    "StreamModelLogs": lambda w: rpc.StreamModelLogsRequest(
        name=w.live, replica="r1", build=w.build, tail=10
    ),
}


# ---- the long values, from the request's descriptor ---------------------------------------

Change = Callable[[message.Message], None]


def _set(path: tuple[str, ...], value: str | Callable[[str], str]) -> Change:
    """Sets the string field at ``path`` (its message fields on the way are made)."""

    def change(msg: message.Message) -> None:
        for name in path[:-1]:
            msg = getattr(msg, name)
        old = getattr(msg, path[-1])
        setattr(msg, path[-1], value(old) if callable(value) else value)

    return change


def _add(path: tuple[str, ...], key: Any, value: Any) -> Change:
    """Adds ``key`` to the map, or ``value`` to the repeated field, at ``path``."""

    def change(msg: message.Message) -> None:
        for name in path[:-1]:
            msg = getattr(msg, name)
        container = getattr(msg, path[-1])
        if key is None:
            container.append(value)
        else:
            container[key] = value

    return change


def long_values(
    desc: descriptor.Descriptor, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, Change]]:
    """(what, how) for each way to put LONG into a string of a ``desc`` message: a string
    field replaced by it and, where valid, its valid value made that much longer; a map
    key or value; a string in a repeated field."""
    for f in desc.fields:
        here = (*path, f.name)
        label = ".".join(here)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, value_f = (
                f.message_type.fields_by_name["key"],
                f.message_type.fields_by_name["value"],
            )
            if key_f.type == key_f.TYPE_STRING:
                yield f"{label}[<long key>]", _add(here, LONG, _valid_scalar(value_f))
            if value_f.type == value_f.TYPE_STRING:
                yield f"{label}[VALUE]", _add(here, "VALUE", LONG)
        elif f.type == f.TYPE_STRING and f.is_repeated:
            yield f"{label}[]", _add(here, None, LONG)
        elif f.type == f.TYPE_STRING:
            yield label, _set(here, LONG)
            yield f"{label} (valid + long)", _set(here, lambda old: old + LONG if old else LONG)
        elif f.message_type is not None and not f.is_repeated:
            yield from long_values(f.message_type, here)


def _valid_scalar(f: descriptor.FieldDescriptor) -> Any:
    return "x" if f.type == f.TYPE_STRING else f.default_value


# ---- the server ---------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A database of this module's own (a fresh one: the first admin token is made)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'cp.db'}"
    else:
        with new_postgres_database() as url:
            yield url


@pytest.fixture(
    scope="module",
    params=[
        ("sqlite", False),
        ("sqlite", True),
        ("postgresql", False),
        ("postgresql", True),
    ],
    ids=["sqlite-no-auth", "sqlite-auth", "postgresql-no-auth", "postgresql-auth"],
)
async def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    kind, auth = request.param
    tmp = tmp_path_factory.mktemp(f"long-{kind}")
    with database(kind, tmp) as url:
        async with (
            running(fake_settings(url, tmp, insecure_no_auth=not auth)) as srv,
            # Default options: no raised metadata (or message) limits, as any client has.
            grpc.aio.insecure_channel(srv.grpc_address) as channel,
        ):
            yield await _world(srv, Stub(channel), auth)


async def _world(srv: Server, stub: Stub, auth: bool) -> World:
    secret = (srv.settings.data_dir / "admin.token").read_text().strip() if auth else ""
    m: Md = (("authorization", f"Bearer {secret}"),) if secret else ()
    live, idle = f"{PROJECT}/models/live", f"{PROJECT}/models/idle"
    for name in (live, idle):
        await stub.CreateModel(
            rpc.CreateModelRequest(parent=PROJECT, model_id=name.rsplit("/", 1)[1]), metadata=m
        )

    async def chunks() -> AsyncIterator[rpc.UploadSourceRequest]:
        yield rpc.UploadSourceRequest(parent=live, chunk=zip_bytes({"model.py": MODEL_V1}))

    src = await stub.UploadSource(chunks(), metadata=m)
    op = await stub.CreateBuild(
        rpc.CreateBuildRequest(
            parent=live,
            source_sha256=src.sha256,
            file_path="model.py",
            function_name="predict",
            deploy=rpc.DeployOptions(resources=resources(1)),
        ),
        metadata=m,
    )

    async def done() -> pb.Operation:
        now = await stub.GetOperation(rpc.GetOperationRequest(name=op.name), metadata=m)
        assert now.done, now.progress
        return now

    op = await eventually("the model's first build deployed", done, timeout=30)
    assert not op.HasField("error"), op
    model = await stub.GetModel(rpc.GetModelRequest(name=live), metadata=m)
    token = await stub.CreateToken(
        rpc.CreateTokenRequest(parent=PROJECT, role=pb.ROLE_VIEWER), metadata=m
    )
    key = await stub.CreateInvocationKey(rpc.CreateInvocationKeyRequest(parent=live), metadata=m)
    return World(
        stub=stub,
        md=m,
        live=live,
        idle=idle,
        sha=src.sha256,
        build=op.target,
        deployment=model.active_deployment,
        operation=op.name,
        token=token.token.name,
        key=key.key.name,
    )


# ---- the calls ----------------------------------------------------------------------------


async def call(w: World, method: descriptor.MethodDescriptor, request: message.Message) -> Any:
    """Makes the call; returns its response (a server stream's first message)."""
    behavior = getattr(w.stub, method.name)
    if method.client_streaming:

        async def requests() -> AsyncIterator[message.Message]:
            yield request

        stream: Any = requests()
        if method.server_streaming:
            return await _first(behavior(stream, metadata=w.md, timeout=10))
        return await behavior(stream, metadata=w.md, timeout=10)
    if method.server_streaming:
        return await _first(behavior(request, metadata=w.md, timeout=10))
    return await behavior(request, metadata=w.md, timeout=10)


async def _first(stream: Any) -> Any:
    try:
        return await stream.read()
    finally:
        stream.cancel()


def trailer_bytes(err: grpc.aio.AioRpcError) -> int:
    """What the error took in the trailers: its metadata and its message."""
    sizes = [len(v if isinstance(v, bytes) else v.encode()) for _, v in err.trailing_metadata()]
    return sum(sizes) + len((err.details() or "").encode())


def problem(what: str, err: grpc.aio.AioRpcError | None, expected: grpc.StatusCode) -> str:
    """What is wrong with the outcome of one call ("" if nothing)."""
    if err is None:
        return f"{what}: accepted, expected {expected.name}"
    code = err.code()
    if code in NEVER or code != expected:
        return f"{what}: {code.name}, expected {expected.name}: {(err.details() or '')[:300]!r}"
    status = rpc_status.from_call(err)
    if status is None:
        return f"{what}: {code.name} without google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    if not any(d.Unpack(info) for d in status.details) or not info.reason:
        return f"{what}: {code.name} without an ErrorInfo reason"
    if trailer_bytes(err) > MAX_TRAILER_BYTES:
        return f"{what}: {trailer_bytes(err)} bytes of trailers"
    return ""


# What a long value gets where it is not INVALID_ARGUMENT: a well-formed name of nothing.
EXPECTED: dict[tuple[str, str], grpc.StatusCode] = {
    ("RevokeToken", "name (valid + long)"): NOT_FOUND,
    ("RevokeInvocationKey", "name (valid + long)"): NOT_FOUND,
}

# Where a long value is rightly taken: output-only fields, ignored on create (AIP-203).
ACCEPTED = {
    ("CreateModel", f"model.{name}{how}")
    for name in (
        "name",
        "active_deployment",
        "endpoint",
        "etag",
        "message",
        "running_operation",
        "health",
        "traffic.stable.deployment",
        "traffic.stable.build",
        "traffic.candidate.deployment",
        "traffic.candidate.build",
        "traffic.sticky_header",
        "scale.last_decision.reason",
    )
    for how in ("", " (valid + long)")
}


async def problems(w: World, method_name: str, wanted: Callable[[str], bool]) -> list[str]:
    """What is wrong with the outcome of each call of ``method_name`` with a long value
    in one of the places ``wanted`` names (each call otherwise valid)."""
    method = SERVICE.methods_by_name[method_name]
    assert method_name in VALID, f"add a valid {method.input_type.name} to VALID"
    request_class = GetMessageClass(method.input_type)
    found: list[str] = []
    tried = 0
    for what, change in long_values(method.input_type):
        if not wanted(what):
            continue
        request = VALID[method_name](w)
        assert isinstance(request, request_class)
        change(request)
        tried += 1
        expected = EXPECTED.get((method_name, what), INVALID)
        try:
            response = await call(w, method, request)
        except grpc.aio.AioRpcError as e:
            found.append(problem(what, e, expected))
            continue
        if (method_name, what) not in ACCEPTED:
            found.append(problem(what, None, expected))
        if isinstance(response, pb.Operation):  # the next call finds the model idle
            await finished(w, response)
    assert tried, f"{method_name}: no string field to try"
    return [p for p in found if p]


async def finished(w: World, op: pb.Operation) -> None:
    for _ in range(30):
        if op.done:
            return
        op = await w.stub.WaitOperation(
            rpc.WaitOperationRequest(name=op.name, timeout=duration_pb2.Duration(seconds=1)),
            metadata=w.md,
        )
    raise AssertionError(f"not done: {op}")


# Every RPC whose request has a string to make long (GetCaller's has no field at all).
WITH_STRINGS = [m.name for m in SERVICE.methods if any(long_values(m.input_type))]


def test_only_requests_without_strings_are_left_out() -> None:
    left_out = {m.name for m in SERVICE.methods} - set(WITH_STRINGS)
    assert left_out == {"GetCaller"}
    assert not rpc.GetCallerRequest.DESCRIPTOR.fields


@pytest.mark.parametrize("method_name", WITH_STRINGS)
async def test_long_value_gets_the_real_error(world: World, method_name: str) -> None:
    found = await problems(world, method_name, lambda what: True)
    assert not found, "\n".join(found)
