"""Who gets in, on SQLite and PostgreSQL: every principal (none, a bad token, expired,
revoked, viewer/deployer/admin of the project, admin of another project) x every RPC,
each with the code it must get; the first admin token; audit records; health stays open.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlmodel import select

from controlplane.access import Access
from controlplane.api.client import Client, ClientError
from controlplane.domain.access import MUTATIONS, RULES, Role, hash_secret, id_of, matches
from controlplane.server import Server
from controlplane.storage.db import Database
from controlplane.storage.jobs import JobKind
from controlplane.storage.tables import JobRow, TokenRow
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import (
    MODEL_V1,
    Stub,
    error_info,
    fake_settings,
    resources,
    running,
    zip_bytes,
)
from tests.helpers.servers import MODELCTL, run, serve
from workers.fake_backend import FakeBackend

A, B = "projects/team-a", "projects/team-b"
OK = "OK"
Md = tuple[tuple[str, str], ...]


def md(secret: str) -> Md:
    return (("authorization", f"Bearer {secret}"),) if secret else ()


@dataclass
class World:
    """Project A's model ``live`` (built and deployed: build 1, deployment 1, a done
    operation) and ``idle`` (never deployed), a token to revoke, and every principal."""

    stub: Stub
    server: Server
    admin: str
    live: str
    idle: str
    build: str
    deployment: str
    operation: str
    throwaway: str
    throwaway_key: str
    secrets: dict[str, str]
    counter: int = 0

    def fresh(self) -> str:
        self.counter += 1
        return f"m{self.counter}"


async def new_token(stub: Stub, admin: str, parent: str, role: int, ttl: float = 0) -> str:
    req = rpc.CreateTokenRequest(parent=parent, role=role, description="test")  # type: ignore[arg-type]
    if ttl:
        req.ttl.CopyFrom(duration_pb2.Duration(nanos=int(ttl * 1e9)))
    r: rpc.CreateTokenResponse = await stub.CreateToken(req, metadata=md(admin))
    return str(r.secret)


@pytest.fixture
async def secured(fresh_db: str, tmp_path: Path) -> AsyncIterator[Server]:
    async with running(fake_settings(fresh_db, tmp_path, insecure_no_auth=False)) as srv:
        yield srv


@pytest.fixture
async def world(secured: Server) -> AsyncIterator[World]:
    admin = (secured.settings.data_dir / "admin.token").read_text().strip()
    async with grpc.aio.insecure_channel(secured.grpc_address) as channel:
        stub = Stub(channel)
        auth = md(admin)
        for parent, model_id in ((A, "live"), (A, "idle"), (B, "other")):
            await stub.CreateModel(
                rpc.CreateModelRequest(parent=parent, model_id=model_id), metadata=auth
            )
        live = f"{A}/models/live"
        op = await build_with(stub, admin, live)
        model = await stub.GetModel(rpc.GetModelRequest(name=live), metadata=auth)
        secrets = {
            "none": "",
            "garbage": "not-a-token",
            "forged": "mlc_0123456789abcdef_guessed",
            "viewer of A": await new_token(stub, admin, A, pb.ROLE_VIEWER),
            "deployer of A": await new_token(stub, admin, A, pb.ROLE_DEPLOYER),
            "admin of A": await new_token(stub, admin, A, pb.ROLE_ADMIN),
            "admin of B": await new_token(stub, admin, B, pb.ROLE_ADMIN),
            "expired": await new_token(stub, admin, A, pb.ROLE_ADMIN, ttl=0.001),
            "revoked": await new_token(stub, admin, A, pb.ROLE_ADMIN),
        }
        tokens = await stub.ListTokens(rpc.ListTokensRequest(parent=A), metadata=auth)
        revoked_id = id_of(secrets["revoked"])
        (revoked,) = [t.name for t in tokens.tokens if t.name.endswith(f"/{revoked_id}")]
        await stub.RevokeToken(rpc.RevokeTokenRequest(name=revoked), metadata=auth)
        throwaway = (
            await stub.CreateToken(
                rpc.CreateTokenRequest(parent=A, role=pb.ROLE_VIEWER), metadata=auth
            )
        ).token.name
        throwaway_key = (
            await stub.CreateInvocationKey(
                rpc.CreateInvocationKeyRequest(parent=live), metadata=auth
            )
        ).key.name
        yield World(
            stub,
            secured,
            admin,
            live,
            f"{A}/models/idle",
            op.target,
            model.active_deployment,
            op.name,
            throwaway,
            throwaway_key,
            secrets,
        )


async def build_with(stub: Stub, admin: str, model: str) -> pb.Operation:
    async def chunks() -> AsyncIterator[rpc.UploadSourceRequest]:
        yield rpc.UploadSourceRequest(parent=model, chunk=zip_bytes({"model.py": MODEL_V1}))

    src = await stub.UploadSource(chunks(), metadata=md(admin))
    op = await stub.CreateBuild(
        rpc.CreateBuildRequest(
            parent=model,
            source_sha256=src.sha256,
            file_path="model.py",
            function_name="predict",
            deploy=rpc.DeployOptions(resources=resources(1)),
        ),
        metadata=md(admin),
    )

    async def done() -> pb.Operation:
        got = await stub.GetOperation(rpc.GetOperationRequest(name=op.name), metadata=md(admin))
        assert got.done, f"not done yet: {got}"
        return got

    return await eventually(f"operation {op.name} done", done)


async def first(call: Any) -> None:
    """Reads one message of a server stream (auth is checked before the first), then
    cancels it."""
    try:
        await call.read()
    finally:
        call.cancel()


async def upload(w: World, m: Md) -> None:
    async def chunks() -> AsyncIterator[rpc.UploadSourceRequest]:
        yield rpc.UploadSourceRequest(parent=w.live, chunk=zip_bytes({"model.py": MODEL_V1}))

    await w.stub.UploadSource(chunks(), metadata=m)


Call = Callable[[World, Md], Awaitable[Any]]
# Each RPC: the least role it needs, the call (aimed at project A), and the code it gets
# once let in (chosen so that no call changes what the next one sees).
RPCS: dict[str, tuple[Role, Call, str]] = {
    "GetModel": (
        Role.VIEWER,
        lambda w, m: w.stub.GetModel(rpc.GetModelRequest(name=w.live), metadata=m),
        OK,
    ),
    "ListModels": (
        Role.VIEWER,
        lambda w, m: w.stub.ListModels(rpc.ListModelsRequest(parent=A), metadata=m),
        OK,
    ),
    "GetBuild": (
        Role.VIEWER,
        lambda w, m: w.stub.GetBuild(rpc.GetBuildRequest(name=w.build), metadata=m),
        OK,
    ),
    "ListBuilds": (
        Role.VIEWER,
        lambda w, m: w.stub.ListBuilds(rpc.ListBuildsRequest(parent=w.live), metadata=m),
        OK,
    ),
    "GetDeployment": (
        Role.VIEWER,
        lambda w, m: w.stub.GetDeployment(rpc.GetDeploymentRequest(name=w.deployment), metadata=m),
        OK,
    ),
    "ListDeployments": (
        Role.VIEWER,
        lambda w, m: w.stub.ListDeployments(rpc.ListDeploymentsRequest(parent=w.live), metadata=m),
        OK,
    ),
    "GetOperation": (
        Role.VIEWER,
        lambda w, m: w.stub.GetOperation(rpc.GetOperationRequest(name=w.operation), metadata=m),
        OK,
    ),
    "ListOperations": (
        Role.VIEWER,
        lambda w, m: w.stub.ListOperations(rpc.ListOperationsRequest(parent=w.live), metadata=m),
        OK,
    ),
    "WaitOperation": (
        Role.VIEWER,
        lambda w, m: w.stub.WaitOperation(rpc.WaitOperationRequest(name=w.operation), metadata=m),
        OK,
    ),
    "WatchModel": (
        Role.VIEWER,
        lambda w, m: first(w.stub.WatchModel(rpc.WatchModelRequest(name=w.live), metadata=m)),
        OK,
    ),
    "WatchModels": (
        Role.VIEWER,
        lambda w, m: first(w.stub.WatchModels(rpc.WatchModelsRequest(parent=A), metadata=m)),
        OK,
    ),
    "StreamBuildLogs": (
        Role.VIEWER,
        lambda w, m: first(
            w.stub.StreamBuildLogs(rpc.StreamBuildLogsRequest(name=w.build), metadata=m)
        ),
        OK,
    ),
    "GetModelMetrics": (
        Role.VIEWER,
        lambda w, m: w.stub.GetModelMetrics(rpc.GetModelMetricsRequest(name=w.live), metadata=m),
        OK,
    ),
    "StreamModelLogs": (
        Role.VIEWER,
        lambda w, m: first(
            w.stub.StreamModelLogs(rpc.StreamModelLogsRequest(name=w.live), metadata=m)
        ),
        OK,
    ),
    "GetCaller": (
        Role.VIEWER,
        lambda w, m: w.stub.GetCaller(rpc.GetCallerRequest(), metadata=m),
        OK,
    ),
    "CreateModel": (
        Role.DEPLOYER,
        lambda w, m: w.stub.CreateModel(
            rpc.CreateModelRequest(parent=A, model_id=w.fresh()), metadata=m
        ),
        OK,
    ),
    "UploadSource": (Role.DEPLOYER, upload, OK),
    "CreateBuild": (
        Role.DEPLOYER,
        lambda w, m: w.stub.CreateBuild(
            rpc.CreateBuildRequest(
                parent=w.live, source_sha256="0" * 64, file_path="../x.py", function_name="f"
            ),
            metadata=m,
        ),
        "INVALID_ARGUMENT",
    ),
    "CreateDeployment": (
        Role.DEPLOYER,
        lambda w, m: w.stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=w.live, build=w.build, resources=resources(-1)),
            metadata=m,
        ),
        "INVALID_ARGUMENT",
    ),
    "StopModel": (
        Role.DEPLOYER,
        lambda w, m: w.stub.StopModel(rpc.StopModelRequest(name=w.idle), metadata=m),
        "FAILED_PRECONDITION",
    ),
    "RestartModel": (
        Role.DEPLOYER,
        lambda w, m: w.stub.RestartModel(rpc.RestartModelRequest(name=w.idle), metadata=m),
        "FAILED_PRECONDITION",
    ),
    "CancelOperation": (
        Role.DEPLOYER,
        lambda w, m: w.stub.CancelOperation(
            rpc.CancelOperationRequest(name=w.operation), metadata=m
        ),
        "FAILED_PRECONDITION",
    ),
    "SetTraffic": (
        Role.DEPLOYER,
        lambda w, m: w.stub.SetTraffic(
            rpc.SetTrafficRequest(
                name=w.live, weights=[rpc.TrafficWeight(build=w.build, percent=100)]
            ),
            metadata=m,
        ),
        "FAILED_PRECONDITION",
    ),
    "PromoteRollout": (
        Role.DEPLOYER,
        lambda w, m: w.stub.PromoteRollout(rpc.PromoteRolloutRequest(name=w.operation), metadata=m),
        "FAILED_PRECONDITION",
    ),
    "ExportBuild": (
        Role.DEPLOYER,
        lambda w, m: first(
            w.stub.ExportBuild(rpc.ExportBuildRequest(name=w.build, tag="no tag!"), metadata=m)
        ),
        "INVALID_ARGUMENT",
    ),
    "DeleteModel": (
        Role.ADMIN,
        lambda w, m: w.stub.DeleteModel(rpc.DeleteModelRequest(name=w.live), metadata=m),
        "FAILED_PRECONDITION",
    ),
    "CreateToken": (
        Role.ADMIN,
        lambda w, m: w.stub.CreateToken(
            rpc.CreateTokenRequest(parent=A, role=pb.ROLE_VIEWER), metadata=m
        ),
        OK,
    ),
    "ListTokens": (
        Role.ADMIN,
        lambda w, m: w.stub.ListTokens(rpc.ListTokensRequest(parent=A), metadata=m),
        OK,
    ),
    "RevokeToken": (
        Role.ADMIN,
        lambda w, m: w.stub.RevokeToken(rpc.RevokeTokenRequest(name=w.throwaway), metadata=m),
        OK,
    ),
    "CreateInvocationKey": (
        Role.DEPLOYER,
        lambda w, m: w.stub.CreateInvocationKey(
            rpc.CreateInvocationKeyRequest(parent=w.live), metadata=m
        ),
        OK,
    ),
    "ListInvocationKeys": (
        Role.VIEWER,
        lambda w, m: w.stub.ListInvocationKeys(
            rpc.ListInvocationKeysRequest(parent=w.live), metadata=m
        ),
        OK,
    ),
    "RevokeInvocationKey": (
        Role.DEPLOYER,
        lambda w, m: w.stub.RevokeInvocationKey(
            rpc.RevokeInvocationKeyRequest(name=w.throwaway_key), metadata=m
        ),
        OK,
    ),
    "ListAuditRecords": (
        Role.ADMIN,
        lambda w, m: w.stub.ListAuditRecords(rpc.ListAuditRecordsRequest(parent=A), metadata=m),
        OK,
    ),
}

PRINCIPALS = {
    "none": None,
    "garbage": None,
    "forged": None,
    "expired": None,
    "revoked": None,
    "viewer of A": Role.VIEWER,
    "deployer of A": Role.DEPLOYER,
    "admin of A": Role.ADMIN,
    "admin of B": "elsewhere",
}


def expected(principal: str, rpc_name: str) -> str:
    needed, _, allowed = RPCS[rpc_name]
    role = PRINCIPALS[principal]
    if role is None:
        return "UNAUTHENTICATED"
    if role == "elsewhere":  # GetCaller names no project: any valid token may ask
        return OK if rpc_name == "GetCaller" else "NOT_FOUND"
    assert isinstance(role, Role)
    return allowed if role >= needed else "PERMISSION_DENIED"


async def outcome(w: World, principal: str, rpc_name: str) -> str:
    try:
        await RPCS[rpc_name][1](w, md(w.secrets[principal]))
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return OK


def test_every_rpc_of_the_service_is_in_the_matrix_and_has_a_rule() -> None:
    names = set(rpc.DESCRIPTOR.services_by_name["ModelLifecycle"].methods_by_name)
    assert names == set(RPCS), "a new RPC needs a row in RPCS (and a rule)"
    assert names == set(RULES)


def test_every_rpc_but_the_reads_is_audited() -> None:
    names = set(rpc.DESCRIPTOR.services_by_name["ModelLifecycle"].methods_by_name)
    reads = {n for n in names if n.startswith(("Get", "List", "Watch", "Wait", "Stream"))}
    assert names - reads == MUTATIONS, "a new RPC that changes something is audited"


async def test_the_matrix_of_principals_and_rpcs(world: World) -> None:
    got = {(p, r): await outcome(world, p, r) for p in PRINCIPALS for r in RPCS}
    want = {(p, r): expected(p, r) for p in PRINCIPALS for r in RPCS}
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert wrong == {}, "(principal, rpc): (got, expected)"


async def test_refusals_say_nothing_that_helps_a_guess(world: World) -> None:
    messages = set()
    for principal in ("none", "garbage", "forged", "expired", "revoked"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await world.stub.GetModel(
                rpc.GetModelRequest(name=world.live), metadata=md(world.secrets[principal])
            )
        messages.add((e.value.details(), error_info(e.value)[0]))
    assert len(messages) == 1, "every bad token gets the very same answer"
    hidden: list[str] = []
    missing: list[str] = []
    for name, into in ((world.live, hidden), (f"{A}/models/nope", missing)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await world.stub.GetModel(
                rpc.GetModelRequest(name=name), metadata=md(world.secrets["admin of B"])
            )
        into.append(error_info(e.value)[0])
    assert hidden == missing == ["MODEL_NOT_FOUND"], "another project's model: as if absent"


async def test_another_projects_operation_is_refused_like_one_that_does_not_exist(
    world: World,
) -> None:
    viewer_of_b = await new_token(world.stub, world.admin, B, pb.ROLE_VIEWER)
    answers = []
    for name in (world.operation, "operations/00000000-0000-0000-0000-000000000000"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await world.stub.CancelOperation(
                rpc.CancelOperationRequest(name=name), metadata=md(viewer_of_b)
            )
        answers.append((e.value.code(), error_info(e.value)[0]))
    assert answers[0] == answers[1] == (grpc.StatusCode.NOT_FOUND, "OPERATION_NOT_FOUND")


async def test_too_weak_a_role_is_told_which_role_it_needs(world: World) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await world.stub.StopModel(
            rpc.StopModelRequest(name=world.live), metadata=md(world.secrets["viewer of A"])
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reason, metadata, _ = error_info(e.value)
    assert reason == "ROLE_TOO_WEAK" and metadata == {"needed": "deployer", "role": "viewer"}


async def test_the_first_admin_token_is_written_once_for_its_owner_only(
    world: World, tmp_path: Path
) -> None:
    path = world.server.settings.data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert world.admin.startswith("mlc_")
    tokens = await world.stub.ListTokens(
        rpc.ListTokensRequest(parent="projects/-"), metadata=md(world.admin)
    )
    assert [t.role for t in tokens.tokens] == [pb.ROLE_ADMIN]
    # Project tokens never see the every-project ones.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await world.stub.ListTokens(
            rpc.ListTokensRequest(parent="projects/-"), metadata=md(world.secrets["admin of A"])
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_revoked_token_stops_at_once_and_secrets_are_never_listed(world: World) -> None:
    secret = await new_token(world.stub, world.admin, A, pb.ROLE_VIEWER)
    auth = md(secret)
    await world.stub.ListModels(rpc.ListModelsRequest(parent=A), metadata=auth)
    tokens = await world.stub.ListTokens(rpc.ListTokensRequest(parent=A), metadata=md(world.admin))
    assert secret not in str(tokens)
    name = next(t.name for t in tokens.tokens if t.name.endswith(f"/{id_of(secret)}"))
    revoked = await world.stub.RevokeToken(
        rpc.RevokeTokenRequest(name=name), metadata=md(world.admin)
    )
    assert revoked.revoked
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await world.stub.ListModels(rpc.ListModelsRequest(parent=A), metadata=auth)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_every_mutation_leaves_an_audit_record(world: World) -> None:
    deployer, viewer = world.secrets["deployer of A"], world.secrets["viewer of A"]
    await world.stub.CreateModel(
        rpc.CreateModelRequest(parent=A, model_id="audited"), metadata=md(deployer)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await world.stub.StopModel(rpc.StopModelRequest(name=world.live), metadata=md(viewer))
    await world.stub.GetModel(rpc.GetModelRequest(name=world.live), metadata=md(viewer))
    records = (
        await world.stub.ListAuditRecords(
            rpc.ListAuditRecordsRequest(parent=A), metadata=md(world.admin)
        )
    ).records
    tokens = {
        t.name.rsplit("/", 1)[-1]: t.name
        for t in (
            await world.stub.ListTokens(rpc.ListTokensRequest(parent=A), metadata=md(world.admin))
        ).tokens
    }
    newest = [(r.principal, r.method.rsplit("/", 1)[-1], r.resource, r.code) for r in records[:2]]
    assert newest == [
        (tokens[str(id_of(viewer))], "StopModel", world.live, "PERMISSION_DENIED"),
        (tokens[str(id_of(deployer))], "CreateModel", f"{A}/models/audited", "OK"),
    ], "reads are not audited; a refused mutation is"
    assert all(r.peer and r.time.seconds > 0 and r.project == "team-a" for r in records)
    built = [r for r in records if r.method.endswith("/CreateBuild") and r.code == "OK"]
    assert built and built[-1].operation == world.operation
    made = [r.resource for r in records if r.method.endswith("/CreateToken")]
    assert made and all(name.startswith(f"{A}/tokens/") for name in made), "which token"
    assert tokens[str(id_of(viewer))] in made


async def test_a_refused_attempt_on_another_project_is_audited_for_the_callers_project(
    world: World,
) -> None:
    """B's token tries A's model: B's admins read of it; A's records do not name B's token."""
    b = world.secrets["admin of B"]
    with pytest.raises(grpc.aio.AioRpcError):
        await world.stub.StopModel(rpc.StopModelRequest(name=world.live), metadata=md(b))

    async def records(parent: str) -> list[pb.AuditRecord]:
        got = await world.stub.ListAuditRecords(
            rpc.ListAuditRecordsRequest(parent=parent), metadata=md(world.admin)
        )
        return list(got.records)

    of_b = [(r.method.rsplit("/", 1)[-1], r.resource, r.code) for r in await records(B)]
    assert ("StopModel", world.live, "NOT_FOUND") in of_b
    assert all("team-b" not in r.principal for r in await records(A))


async def test_health_needs_no_token(secured: Server) -> None:
    async with grpc.aio.insecure_channel(secured.grpc_address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_insecure_no_auth_says_so_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = fake_settings(f"sqlite:///{tmp_path / 'cp.db'}", tmp_path)
    with caplog.at_level("WARNING"):
        async with running(settings) as srv, grpc.aio.insecure_channel(srv.grpc_address) as ch:
            await Stub(ch).ListModels(rpc.ListModelsRequest(parent=A))
    assert any("--insecure-no-auth" in r.getMessage() for r in caplog.records)
    assert not (settings.data_dir / "admin.token").exists()


async def test_a_restarted_server_keeps_its_tokens(fresh_db: str, tmp_path: Path) -> None:
    settings = fake_settings(fresh_db, tmp_path, insecure_no_auth=False)
    async with running(settings):
        admin = (settings.data_dir / "admin.token").read_text()
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.grpc_address) as ch:
        assert (settings.data_dir / "admin.token").read_text() == admin, "not written again"
        await Stub(ch).ListModels(rpc.ListModelsRequest(parent=A), metadata=md(admin.strip()))


async def cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    """The CLI in ``cwd``, with none of the caller's MODELCTL_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCTL_")}
    return await run(MODELCTL, *args, cwd=cwd, env=env)


@pytest.mark.slow
async def test_the_cli_finds_the_admin_token_and_manages_tokens(tmp_path: Path) -> None:
    """`modelctl serve` in a folder, the CLI in the same folder: no flag needed."""
    flags = ("--grpc-port=0", "--http-port=0", "--backend=fake")
    async with serve(*flags, cwd=tmp_path) as (_, address):
        at = f"--server={address}"
        code, _, err = await cli(tmp_path, "models", "create", "iris", at, "--project=team-a")
        assert code == 0, err
        code, secret, err = await cli(
            tmp_path, "tokens", "create", "--role=viewer", at, "--project=team-a", "--ttl=1h"
        )
        assert code == 0 and secret.startswith("mlc_") and "shown once" in err, err
        name = err.split()[1]
        viewer = f"--token={secret.strip()}"
        code, out, _ = await cli(tmp_path, "models", "list", at, "--project=team-a", viewer)
        assert code == 0 and "iris" in out
        code, _, err = await cli(tmp_path, "models", "create", "x", at, "--project=team-a", viewer)
        assert code == 1 and "PERMISSION_DENIED" in err and "ROLE_TOO_WEAK" in err, err
        code, out, _ = await cli(tmp_path, "audit", at, "--project=team-a")
        assert code == 0 and "PERMISSION_DENIED" in out and name in out, out
        code, out, _ = await cli(tmp_path, "tokens", "list", at, "--project=team-a")
        assert code == 0 and name in out and secret.strip() not in out
        code, out, _ = await cli(tmp_path, "tokens", "list", at, "--project=team-a", "-o", "json")
        assert code == 0 and '"role": "viewer"' in out, out
        code, _, _ = await cli(tmp_path, "tokens", "revoke", name, at)
        assert code == 0
        code, _, err = await cli(tmp_path, "models", "list", at, "--project=team-a", viewer)
        assert code == 1 and "UNAUTHENTICATED" in err, err
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        code, _, err = await cli(elsewhere, "models", "list", at, "--project=team-a")
        assert code == 1 and "UNAUTHENTICATED" in err, "no token file here"


async def test_the_python_client_sends_its_token_with_every_kind_of_call(world: World) -> None:
    """Unary, server streaming (a watch) and client streaming (an upload)."""
    async with Client(world.server.grpc_address, token=world.secrets["deployer of A"]) as c:
        assert [m.name for m in (await c.list_models(A)).items][:1] == [world.live]
        source = await c.upload_source(world.live, zip_bytes({"model.py": MODEL_V1}))
        assert len(source.sha256) == 64
        async for event in c.watch_model(world.live):
            assert event.resource is not None and event.resource.name.startswith(world.live)
            break
        with pytest.raises(ClientError) as e:
            await c.delete_model(world.idle)
        assert e.value.code == "PERMISSION_DENIED"
    async with Client(world.server.grpc_address) as anonymous:
        with pytest.raises(ClientError) as e:
            await anonymous.upload_source(world.live, zip_bytes({"model.py": MODEL_V1}))
        assert e.value.code == "UNAUTHENTICATED"


@pytest.mark.slow
async def test_invocation_keys_reach_the_desired_apps_hashed_and_leave_when_revoked(
    world: World,
) -> None:
    """What the replicas get (their Serve user_config): the hashes of the model's live
    keys, never a secret; a revoked key is gone from the next apply."""
    auth = md(world.admin)
    made = await world.stub.CreateInvocationKey(
        rpc.CreateInvocationKeyRequest(parent=world.live, description="rotation"), metadata=auth
    )
    assert made.secret.startswith("mlk_") and made.key.name.startswith(f"{world.live}/keys/")
    backend = world.server.backend
    hashed = hash_secret(made.secret)

    def applied_hashes() -> list[tuple[str, ...]]:
        apps = {a.spec.model_name: a.spec for a in backend.apps.values()}  # type: ignore[attr-defined]
        spec = apps.get(world.live)
        assert spec is not None, f"{world.live} not applied"
        assert (hashed in spec.access.key_hashes) == wanted, spec.access.key_hashes
        return [tuple(spec.access.key_hashes)]  # a list: truthy even when there is no key

    wanted = True
    (hashes,) = await eventually("the key in the applied spec", applied_hashes)
    assert made.secret not in str(hashes) and len(hashes) == 2, "throwaway's and this one"
    listed = await world.stub.ListInvocationKeys(
        rpc.ListInvocationKeysRequest(parent=world.live), metadata=auth
    )
    assert made.secret not in str(listed)
    await world.stub.RevokeInvocationKey(
        rpc.RevokeInvocationKeyRequest(name=made.key.name), metadata=auth
    )
    wanted = False
    (hashes,) = await eventually("the key out of the applied spec", applied_hashes)
    assert hashed not in hashes


@pytest.mark.slow
async def test_a_key_revoked_while_the_cluster_cannot_be_reached_is_refused_once_it_can(
    world: World,
) -> None:
    """The revoke's apply fails for good while the cluster is away; the key must not stay
    live on the replicas until some unrelated change: the desired set is applied again."""
    auth = md(world.admin)
    made = await world.stub.CreateInvocationKey(
        rpc.CreateInvocationKeyRequest(parent=world.live), metadata=auth
    )
    backend = world.server.backend
    assert isinstance(backend, FakeBackend)
    hashed = hash_secret(made.secret)

    def applied() -> tuple[str, ...]:
        spec = next(a.spec for a in backend.apps.values() if a.spec.model_name == world.live)
        return spec.access.key_hashes

    await eventually("the new key applied", lambda: hashed in applied())
    backend.unreachable = True
    await world.stub.RevokeInvocationKey(
        rpc.RevokeInvocationKeyRequest(name=made.key.name), metadata=auth
    )
    db = world.server.db

    def apply_failed() -> bool:
        with db.read() as s:
            jobs = s.exec(select(JobRow).where(JobRow.kind == JobKind.APPLY.value)).all()
            return any(j.state == "done" and "cannot be reached" in j.error for j in jobs)

    await eventually("the revoke's apply failed", apply_failed, 15)
    assert hashed in applied(), "nothing reached the cluster while it was away"
    backend.unreachable = False
    await eventually("the revoked key gone from the replicas", lambda: hashed not in applied())


@pytest.mark.parametrize("ends", ["revoked", "expired"])
async def test_an_idle_watch_ends_within_2s_once_its_token_is_revoked_or_expires(
    world: World, ends: str
) -> None:
    """A watch is checked when it opens and again as it goes on, also while nothing
    happens: once its token is no longer live, it ends UNAUTHENTICATED within 2 s,
    with no change to deliver."""
    auth = md(world.admin)
    viewer = await new_token(world.stub, world.admin, A, pb.ROLE_VIEWER, ttl=2.0)
    watch = world.stub.WatchModels(rpc.WatchModelsRequest(parent=A), metadata=md(viewer))
    while True:  # the snapshot, up to its bookmark
        first = await asyncio.wait_for(watch.read(), 10)
        assert isinstance(first, pb.ModelEvent), first
        if first.type == pb.EVENT_TYPE_BOOKMARK:
            break
    if ends == "revoked":
        tokens = await world.stub.ListTokens(rpc.ListTokensRequest(parent=A), metadata=auth)
        (name,) = [t.name for t in tokens.tokens if t.name.endswith(f"/{id_of(viewer)}")]
        await world.stub.RevokeToken(rpc.RevokeTokenRequest(name=name), metadata=auth)
        deadline = 2.0
    else:
        deadline = 2.0 + 2.0  # its time to live, then the same 2 s

    async def ends_by_itself() -> None:
        while True:  # only bookmarks may come: nothing changes meanwhile
            event = await watch.read()
            assert isinstance(event, pb.ModelEvent), event
            assert event.type == pb.EVENT_TYPE_BOOKMARK, event

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(ends_by_itself(), deadline)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_following_log_stream_ends_once_its_token_expires(world: World) -> None:
    """A stream that yields its messages (the model's log, followed) is rechecked as a
    watch is: nothing is logged meanwhile, and it ends UNAUTHENTICATED within 2 s of its
    token's end, not before (it was let in)."""
    ttl = 2.0
    viewer = await new_token(world.stub, world.admin, A, pb.ROLE_VIEWER, ttl=ttl)
    opened = time.monotonic()
    logs = world.stub.StreamModelLogs(
        rpc.StreamModelLogsRequest(name=world.live, follow=True), metadata=md(viewer)
    )

    async def ends_by_itself() -> None:
        async for line in logs:
            raise AssertionError(f"nothing was logged, yet {line}")

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(ends_by_itself(), ttl + 2.0)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - opened >= ttl - 0.5, "refused as it opened, not ended later"


async def test_a_watch_with_a_token_delivers_changes_and_keeps_its_errors_codes(
    world: World,
) -> None:
    """With tokens on, a watch runs in a task of its own beside its token's rechecks: a
    change made while it watches reaches it, and a bad watch ends with its own code."""
    viewer = md(await new_token(world.stub, world.admin, A, pb.ROLE_VIEWER))
    watch = world.stub.WatchModel(rpc.WatchModelRequest(name=world.live), metadata=viewer)
    while True:  # the snapshot, up to its bookmark
        first = await asyncio.wait_for(watch.read(), 10)
        assert isinstance(first, pb.ModelEvent), first
        if first.type == pb.EVENT_TYPE_BOOKMARK:
            break
    stop = await world.stub.StopModel(
        rpc.StopModelRequest(name=world.live), metadata=md(world.admin)
    )

    async def the_change() -> pb.ModelEvent:
        while True:
            event = await watch.read()
            assert isinstance(event, pb.ModelEvent), event
            if event.type == pb.EVENT_TYPE_CREATED:
                return event

    changed = await asyncio.wait_for(the_change(), 10)
    assert changed.operation.name == stop.name, "the stop, as the watch saw it"
    watch.cancel()
    for request, code in (
        (rpc.WatchModelRequest(name=f"{A}/models/nope"), grpc.StatusCode.NOT_FOUND),
        (
            rpc.WatchModelRequest(name=world.idle, since_revision=10**12),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in world.stub.WatchModel(request, metadata=viewer):
                pass
        assert e.value.code() == code, request


def test_servers_starting_together_make_one_first_admin_token(
    fresh_postgres: str, tmp_path: Path
) -> None:
    """Eight servers' first start at the same instant, each with its own connection."""
    dbs = [Database(fresh_postgres) for _ in range(8)]
    dbs[0].migrate()
    dirs = [tmp_path / f"server-{i}" for i in range(len(dbs))]
    start = threading.Barrier(len(dbs))

    def first_start(i: int) -> Path | None:
        dirs[i].mkdir()
        start.wait()
        return Access(dbs[i]).ensure_admin_token(dirs[i])

    try:
        with ThreadPoolExecutor(len(dbs)) as pool:
            written = [p for p in pool.map(first_start, range(len(dbs))) if p is not None]
        with dbs[0].read() as s:
            tokens = s.exec(select(TokenRow)).all()
    finally:
        for db in dbs:
            db.close()
    assert len(tokens) == 1 and len(written) == 1
    assert matches(written[0].read_text().strip(), tokens[0].secret_hash)


async def test_anonymous_refusals_leave_no_audit_record(world: World) -> None:
    async def count() -> int:
        records = await world.stub.ListAuditRecords(
            rpc.ListAuditRecordsRequest(parent=A, page_size=1000), metadata=md(world.admin)
        )
        return len(records.records)

    before = await count()
    for secret in ("", "forged-token"):
        with pytest.raises(grpc.aio.AioRpcError):
            await world.stub.StopModel(rpc.StopModelRequest(name=world.live), metadata=md(secret))
    assert await count() == before, "no one without a token can fill the audit table"


async def test_a_model_made_again_under_a_deleted_name_has_no_keys(world: World) -> None:
    auth = md(world.admin)
    create = rpc.CreateModelRequest(parent=A, model_id="again")
    model = (await world.stub.CreateModel(create, metadata=auth)).name
    await world.stub.CreateInvocationKey(
        rpc.CreateInvocationKeyRequest(parent=model), metadata=auth
    )
    await world.stub.DeleteModel(rpc.DeleteModelRequest(name=model), metadata=auth)
    await world.stub.CreateModel(create, metadata=auth)
    keys = await world.stub.ListInvocationKeys(
        rpc.ListInvocationKeysRequest(parent=model), metadata=auth
    )
    assert list(keys.keys) == []
