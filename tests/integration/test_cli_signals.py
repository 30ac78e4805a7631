"""`modelctl logs`, `metrics` and `top` against a real server on a socket, fed with what
replicas would push (the fake backend's ``report``): what a person or a script sees."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from controlplane.series import quantile
from controlplane.server import Server
from modellifecycle.v1 import service_pb2 as rpc
from tests.helpers import eventually
from tests.helpers.api import Stub, build, create_model, resources
from tests.integration.conftest import Cli
from workers.backend import app_name_for
from workers.fake_backend import FakeBackend
from workers.signals import LogLine, ReplicaFigures, Report, latency_bucket

LATENCY = {latency_bucket(25.0): 10}  # 10 requests of about 25 ms
P99 = f"{quantile(LATENCY, 0.99):.1f}"  # as the tables show it: 25.2


def _report(project: str, model: str, started: float, replica: str) -> Report:
    """The replica of build 1: 10 requests (1 the model's error) at 25 ms, and one line."""
    app = app_name_for(project.removeprefix("projects/"), model)
    build = f"{project}/models/{model}/builds/1"
    now = time.time()
    figures = ReplicaFigures(
        app=app,
        replica=replica,
        build=build,
        node="10.0.0.1",
        pid=42,
        start_time=started,  # after the server started: every request counts
        time=now,
        requests=10,
        model_errors=1,
        latency=tuple(LATENCY.items()),
        requested_cpus=1.0,
        requested_memory_bytes=512 * 1024 * 1024,
        requested_gpus=0.5,  # and its use not measured
        rss_bytes=100 * 1024 * 1024,
    )
    line = LogLine(
        app=app,
        replica=replica,
        build=build,
        node="10.0.0.1",
        seq=0,
        time=now,
        stream="stdout",
        text="hello",
        request_id="req-1",
    )
    return Report(figures=figures, lines=(line,))


@pytest.fixture
async def replica(server: Server, project: str) -> str:
    """Model ``iris`` built and deployed on the fake backend: the id of its one replica
    (figures count for the replicas Serve lists)."""
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = Stub(channel)
        model = await create_model(stub, project)
        op = await build(stub, model.name, deploy=rpc.DeployOptions(resources=resources(1)))
        assert not op.HasField("error"), op.error
        model = await stub.GetModel(rpc.GetModelRequest(name=model.name))
        dep = await stub.GetDeployment(rpc.GetDeploymentRequest(name=model.active_deployment))
        return str(dep.replicas[0].id)


@pytest.fixture
async def reported(cli: Cli, server: Server, project: str, replica: str) -> str:
    """Model ``iris`` deployed, and its replica's report read by the server (its log line
    shows): the model's name."""
    started = time.time()  # after the server started: every request it reports counts
    backend = server.backend
    assert isinstance(backend, FakeBackend)
    report = _report(project, "iris", started, replica)

    async def line_shows() -> str:
        # Pushed again until read: the server reads a model's lines once it knows the model
        # (within seconds of its creation); the same line and the same cumulative figures
        # count once.
        backend.report(report)
        code, out, err = await cli("logs", "iris")
        assert code == 0, err
        return out

    await eventually("the replica's line is read", line_shows, timeout=10, interval=0.3)
    return f"{project}/models/iris"


async def test_logs_show_each_line_with_its_replica_build_and_request(
    cli: Cli, reported: str, replica: str
) -> None:
    code, out, err = await cli("logs", "iris")
    assert code == 0, err
    [line] = out.splitlines()
    assert line.endswith(f"{replica}  build 1  stdout  [req-1]  hello"), line

    code, out, _ = await cli("logs", "iris", "--replica", replica, "--build", "1", "--since", "10m")
    assert out.splitlines() == [line]
    code, out, err = await cli("logs", "iris", "--replica", "other")
    assert code == 0 and out == "", err
    code, out, _ = await cli("logs", "iris", "--build", "2")
    assert code == 0 and out == ""
    code, out, _ = await cli("logs", reported, "--tail", "1", "-o", "json")
    [doc] = [json.loads(x) for x in out.splitlines()]
    assert doc["replica"] == replica and doc["request_id"] == "req-1" and doc["text"] == "hello"
    assert doc["build"] == f"{reported}/builds/1" and doc["stream"] == "stdout"


async def test_metrics_show_totals_builds_replicas_and_health(
    cli: Cli, reported: str, replica: str
) -> None:
    async def counted() -> str:
        code, out, err = await cli("metrics", "iris", "--window", "10m")
        assert code == 0, err
        return out if f"replica {replica}" in out else ""

    out = await eventually("the figures are counted", counted, timeout=5)
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line}
    # requests, errors model/4xx/5xx, refused, in flight, queued, p50/p95/p99
    assert rows["model"][1:7] == ["10", "1/0/0", "0", "0", "0", f"{P99}/{P99}/{P99}"]
    assert rows["build 1"][2:4] == ["10", "1/0/0"]
    assert rows[f"replica {replica}"][2:4] == ["10", "1/0/0"]
    assert rows["model"][7:] == ["0.00/1", "100.0MiB/512.0MiB", "n/m/0.5"]  # cpu, memory, gpu
    row = next(line for line in out.splitlines() if line.startswith(f"{replica} "))
    assert row.split() == [replica, "build", "1", "10.0.0.1", "42", "running"]
    assert "\nhealth: " in out

    code, out, err = await cli("metrics", "iris", "--window", "10m", "--step", "1m", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["name"] == reported
    totals = doc["series"]["model"]["totals"]
    assert totals["requests"] == 10 and totals["model_errors"] == 1
    assert totals["gpu_used"] == -1 and totals["gpu_requested"] == 0.5
    assert totals["cpu_requested"] == 1.0
    assert doc["series"]["step_s"] == 60 and len(doc["series"]["model"]["points"]) == 10
    assert [r["replica"] for r in doc["series"]["replicas"]] == [replica]
    assert list(doc["series"]["builds"]) == [f"{reported}/builds/1"]


async def test_top_once_lists_every_model(cli: Cli, reported: str) -> None:
    code, _, err = await cli("models", "create", "idle")
    assert code == 0, err

    async def listed() -> str:
        code, out, err = await cli("top", "--once")
        assert code == 0, err
        return out if " 10.0 " in out else ""  # iris' error %, once counted

    out = await eventually("top shows iris' figures", listed, timeout=5)
    lines = out.splitlines()
    assert "2 model(s)" in lines[0]
    assert lines[2].split()[:3] == ["MODEL", "STATE", "REQ/S"]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line}
    assert set(rows) == {"iris", "idle"}
    # 10 requests in the last minute, 1 an error; nothing refused; 1 CPU requested, 1 replica
    assert rows["iris"][2:8] == ["0.17", "10.0", "0", P99, "0.00/1", "1"]
    assert rows["idle"][2:4] == ["0.00", "-"]
    assert "\x1b[" not in out  # no terminal: nothing cleared

    code, out, _ = await cli("top", "--once", "-o", "json")
    doc = json.loads(out)
    names = {m["name"].rsplit("/", 1)[-1]: m for m in doc["models"]}
    assert names["iris"]["totals"]["requests"] == 10 and names["iris"]["error_percent"] == 10.0


async def test_mistakes_give_clear_errors(cli: Cli, reported: str) -> None:
    other = "projects/someone-else/models/iris"
    for argv in (
        ["logs", other],
        ["metrics", other],
        ["--project", "someone-else", "logs", "iris"],
    ):
        code, _, err = await cli(*argv)
        assert code == 1 and "NOT_FOUND" in err, (argv, err)

    code, _, err = await cli("metrics", "iris", "--window", "lots")
    assert code == 2 and "--window 'lots'" in err and "10m" in err
    code, _, err = await cli("metrics", "iris", "--window", "2h")
    assert code == 1 and "INVALID_ARGUMENT" in err and "window" in err and "3600s" in err
    code, _, err = await cli("metrics", "iris", "--step", "15s")
    assert code == 1 and "step" in err and "multiple of 10s" in err
    code, _, err = await cli("logs", "iris", "--build", "latest")
    assert code == 2 and "number" in err
    code, _, err = await cli("logs", "iris", "--since", "yesterday")
    assert code == 2 and "--since" in err
    code, _, err = await cli("top", "--once", "--interval", "0s")
    assert code == 2 and "--interval" in err
