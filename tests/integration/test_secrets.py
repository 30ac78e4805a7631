"""Secret environment values reach the replicas and nothing else: no RPC answer, no
event, no error message and no log line carries them; re-deploys keep them."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format

from controlplane.server import Server
from modellifecycle.v1 import resources_pb2 as pb
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers.api import MODEL_V1, Stub, build, create_model, resources, wait

SECRET = "s3cr3t-do-not-show"


def spec_environment(server: Server, model: str) -> dict[str, str]:
    """What the replicas are given (the fake cluster's record of the applied spec)."""
    apps = {a.spec.model_name: a.spec for a in server.backend.apps.values()}  # type: ignore[attr-defined]
    return dict(apps[model].environment)


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

        # A re-deploy that gives no secrets keeps them (they cannot be read back).
        scaled = await stub.CreateDeployment(
            rpc.CreateDeploymentRequest(parent=model, build=op.target, resources=resources(2))
        )
        await wait(stub, scaled)
        assert spec_environment(server, model)["API_KEY"] == SECRET
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
