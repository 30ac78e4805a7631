"""Secret environment values reach the replicas and nothing else: no RPC answer, no
event, no error message and no log line carries them; re-deploys keep them."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from sqlmodel import select

from controlplane.cli.main import main
from controlplane.server import Server
from controlplane.storage import repo
from controlplane.storage.tables import DeploymentRow, ModelRow
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from modellifecycle.v1 import service_pb2_grpc
from tests.helpers.api import (
    MODEL_V1,
    Stub,
    build,
    create_model,
    fake_settings,
    resources,
    running,
    wait,
)
from workers.backend import AppSpec

SECRET = "s3cr3t-do-not-show"


def applied(server: Server, model: str) -> AppSpec:
    """What the replicas are given (the fake cluster's record of the applied spec)."""
    apps = {a.spec.model_name: a.spec for a in server.backend.apps.values()}  # type: ignore[attr-defined]
    spec = apps[model]
    assert isinstance(spec, AppSpec)
    return spec


def spec_environment(server: Server, model: str) -> dict[str, str]:
    """The replicas' environment: the plain one and the secret values (apart)."""
    spec = applied(server, model)
    return {**spec.environment, **spec.secrets}


def repo_version(server: Server, model: str) -> str:
    """The serving deployment's secrets version as recorded (replicas restart on it)."""
    with server.db.read() as s:
        active = s.exec(select(ModelRow.active_deployment).where(ModelRow.name == model)).one()
        return repo.secrets_version(repo.deployment_row(s, active))


def stored_secrets(server: Server, model: str) -> str:
    """The deployments' secret column as the database holds it."""
    with server.db.read() as s:
        rows = s.exec(select(DeploymentRow).where(DeploymentRow.model == model)).all()
        return "\n".join(r.secret_environment for r in rows)


async def read_until_bookmark(
    stub: Stub, model: str, since: int, head: int = 0
) -> list[pb.ModelEvent]:
    """A watch's events up to its first BOOKMARK (since 0), or up to revision ``head``."""
    watch = stub.WatchModel(rpc.WatchModelRequest(name=model, since_revision=since))
    events: list[pb.ModelEvent] = []
    try:
        while True:
            event = await watch.read()
            assert isinstance(event, pb.ModelEvent)
            events.append(event)
            if event.type == pb.EVENT_TYPE_BOOKMARK or (head and event.revision >= head):
                return events
    finally:
        watch.cancel()


async def everything_said_about(stub: Stub, model: str, since: int) -> str:
    """Every answer a client can get about the model, as text."""
    parts = [
        await stub.GetModel(rpc.GetModelRequest(name=model)),
        await stub.ListDeployments(rpc.ListDeploymentsRequest(parent=model)),
        await stub.ListOperations(rpc.ListOperationsRequest(parent=model)),
        await stub.ListBuilds(rpc.ListBuildsRequest(parent=model)),
    ]
    events = await read_until_bookmark(stub, model, 0)  # the current state, then the head
    head = events[-1].revision
    history = await read_until_bookmark(stub, model, since, head)  # every change since
    events += history
    return "\n".join(json_format.MessageToJson(p) for p in [*parts, *events])


async def test_secrets_reach_the_replicas_and_no_answer_event_or_log(
    server: Server, stub: Stub, project: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = (await create_model(stub, project)).name
    start = (await read_until_bookmark(stub, model, 0))[-1].revision
    deploy = rpc.DeployOptions(
        resources=resources(1),
        environment={"MODE": "fast"},
        secret_environment={"API_KEY": SECRET},
    )
    with caplog.at_level("DEBUG"):
        op = await build(stub, model, MODEL_V1, deploy=deploy)
        assert not op.HasField("error")
        dep = await stub.GetDeployment(
            rpc.GetDeploymentRequest(
                name=(await stub.GetModel(rpc.GetModelRequest(name=model))).active_deployment
            )
        )
        assert dict(dep.environment) == {"MODE": "fast"}
        assert list(dep.secret_environment_keys) == ["API_KEY"]
        assert spec_environment(server, model) == {"MODE": "fast", "API_KEY": SECRET}
        assert "API_KEY" not in applied(server, model).environment, "apart from the config"
        version = applied(server, model).secrets_version
        assert version and SECRET not in version

        # A re-deploy that gives no secrets keeps them (they cannot be read back), and
        # one that gives the same value again: neither restarts the replicas.
        for secrets in ({}, {"API_KEY": SECRET}):
            scaled = await stub.CreateDeployment(
                rpc.CreateDeploymentRequest(
                    parent=model,
                    build=op.target,
                    resources=resources(2),
                    secret_environment=secrets,
                )
            )
            await wait(stub, scaled)
            assert spec_environment(server, model)["API_KEY"] == SECRET
            assert applied(server, model).secrets_version == version, "same values, in place"
        changed = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model, build=op.target, secret_environment={"API_KEY": SECRET + "2"}
            )
        )
        await wait(stub, changed)
        assert spec_environment(server, model)["API_KEY"] == SECRET + "2"
        assert applied(server, model).secrets_version != version, "a new value rolls"
        at_rest = stored_secrets(server, model)
        assert "API_KEY" in at_rest and "enc1:" in at_rest
        assert SECRET not in at_rest, "sealed in the database"
        said = await everything_said_about(stub, model, start)
    assert "API_KEY" in said, "the names are shown"
    assert SECRET not in said
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("environment", "secrets", "field"),
    [
        ({"API_KEY": "plain"}, {"API_KEY": SECRET}, "secret_environment"),
        ({}, {"RAY_ADDRESS": SECRET}, "secret_environment['RAY_ADDRESS']"),
        ({}, {"BIG": SECRET * 10_000}, "secret_environment['BIG']"),
    ],
    ids=["both-plain-and-secret", "reserved-name", "too-long"],
)
async def test_bad_secrets_are_refused_without_echoing_them(
    stub: Stub, project: str, environment: dict[str, str], secrets: dict[str, str], field: str
) -> None:
    model = (await create_model(stub, project)).name
    op = await build(stub, model, MODEL_V1)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(
                parent=model,
                build=op.target,
                resources=resources(1),
                environment=environment,
                secret_environment=secrets,
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(e.value.details()) or field in str(e.value.trailing_metadata())
    assert SECRET not in str(e.value.details()) and SECRET not in str(e.value.trailing_metadata())


async def test_values_from_before_encryption_are_sealed_and_rotate_keeps_replicas(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = fake_settings(database_url, tmp_path)
    async with running(settings) as server, grpc.aio.insecure_channel(server.grpc_address) as ch:
        stub = service_pb2_grpc.ModelLifecycleStub(ch)
        model = (await create_model(stub, f"projects/rot-{uuid.uuid4().hex[:8]}")).name
        deploy = rpc.DeployOptions(resources=resources(1), secret_environment={"API_KEY": SECRET})
        op = await build(stub, model, MODEL_V1, deploy=deploy)
        assert not op.HasField("error")
        # As a server from before encryption left it: the value in plain text.
        with server.db.write() as tx:
            row = tx.session.exec(select(DeploymentRow).where(DeploymentRow.model == model)).one()
            row.secret_environment = json.dumps({"API_KEY": SECRET})
            tx.session.add(row)
    async with running(settings) as server, grpc.aio.insecure_channel(server.grpc_address) as ch:
        stub = service_pb2_grpc.ModelLifecycleStub(ch)
        at_rest = stored_secrets(server, model)
        assert SECRET not in at_rest and "enc1:" in at_rest, "sealed at start"
        version = repo_version(server, model)
        key_before = json.loads((settings.data_dir / "secrets.key").read_text())["current"]

        said = await asyncio.to_thread(
            main,
            [
                "secrets",
                "rotate",
                "--data-dir",
                str(settings.data_dir),
                "--database-url",
                settings.database_url,
            ],
        )
        assert said == 0, capsys.readouterr().err
        assert "1 secret value(s) sealed under new key" in capsys.readouterr().out
        ring = json.loads((settings.data_dir / "secrets.key").read_text())
        assert ring["current"] != key_before and list(ring["keys"]) == [ring["current"]]
        assert f"enc1:{ring['current']}:" in stored_secrets(server, model)
        assert repo_version(server, model) == version, "replicas are not restarted"
        # The running server (its old key gone) still hands the value to the replicas.
        scaled = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model, build=op.target, resources=resources(2))
        )
        await wait(stub, scaled)
        assert spec_environment(server, model)["API_KEY"] == SECRET
        assert applied(server, model).secrets_version == version
