"""`modelctl` against a real server on a socket: what a person or a script sees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import EXAMPLES, eventually
from tests.integration.conftest import Cli


@pytest.mark.slow
async def test_build_deploy_scale_stop_restart_through_the_cli(cli: Cli, project: str) -> None:
    code, out, _ = await cli("models", "create", "iris")
    assert code == 0 and f"{project}/models/iris" in out

    code, out, err = await cli(
        "build", str(EXAMPLES / "iris-v1"), "--model", "iris", "--file", "model.py",
        "--function", "predict", "--deploy", "--replicas", "2", "--memory", "1GiB",
        "--env", "MODE=fast",
    )  # fmt: skip
    assert code == 0, err
    assert "uploading" in err and "CREATE_BUILD" in err and "done" in err  # progress, live
    assert "  | step 3/4: import model.py" in err, "the build's log, as it is written"
    assert "DEPLOYED" in out and "2x" in out and "mem=1024MiB" in out

    # Re-deploy with only --replicas: memory and environment are kept.
    code, out, err = await cli("-o", "json", "deploy", "iris", "--build", "1", "--replicas", "3")
    assert code == 0, err
    result = json.loads(out)
    assert result["operation"]["error"] is None
    assert result["model"]["state"] == "DEPLOYED"
    code, out, _ = await cli("deployments", "get", "iris", "2", "--output", "json")
    dep = json.loads(out)
    assert dep["resources"] == {
        "replicas": 3,
        "cpus": 0.0,
        "memory_mib": 1024,
        "gpus": 0.0,
        "autoscaling": None,
    }
    assert dep["environment"] == {"MODE": "fast"} and len(dep["replicas"]) == 3

    code, out, _ = await cli("deployments", "list", "iris")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["DEPLOYMENT", "STATE"]
    assert "deployments/2" in lines[1] and "DEPLOYED" in lines[1]
    assert "deployments/1" in lines[2] and "REPLACED" in lines[2]

    # Stop and restart ask first; without a terminal and without --yes nothing happens.
    code, _, err = await cli("stop", "iris")
    assert code == 2 and "--yes" in err
    code, out, _ = await cli("models", "get", "iris", "-o", "json")
    assert json.loads(out)["state"] == "DEPLOYED"

    code, out, err = await cli("stop", "iris", "--yes")
    assert code == 0 and "STOPPED" in out, err
    code, out, err = await cli("restart", "iris", "--yes")
    assert code == 0 and "DEPLOYED" in out, err

    code, out, _ = await cli("watch", "iris", "--count", "3", "-o", "json")
    events = [json.loads(line) for line in out.splitlines()]
    # The current state (the active deployment, then the model), then a bookmark.
    assert [e["type"] for e in events] == ["CURRENT", "CURRENT", "BOOKMARK"]
    assert events[1]["resource"]["name"] == f"{project}/models/iris"
    assert events[1]["resource"]["state"] == "DEPLOYED"
    revisions = [e["revision"] for e in events]
    assert revisions == sorted(revisions) and revisions[0] > 0

    code, out, _ = await cli("operations", "list", "iris", "-o", "json")
    kinds = [o["kind"] for o in json.loads(out)]
    assert kinds == ["RESTART_MODEL", "STOP_MODEL", "CREATE_DEPLOYMENT", "CREATE_BUILD"]


async def test_failures_give_reasons_and_non_zero_exit_codes(cli: Cli, tmp_path: Path) -> None:
    code, _, err = await cli("models", "get", "nope")
    assert code == 1 and "NOT_FOUND" in err and "MODEL_NOT_FOUND" in err

    code, _, err = await cli("models", "create", "Bad_Name")
    assert code == 1 and "INVALID_ARGUMENT" in err

    await cli("models", "create", "m")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.py").write_text("def predict(body)\n    return body\n")
    code, _, err = await cli(
        "build", str(broken), "-m", "m", "--file", "model.py", "--function", "predict"
    )
    assert code == 1 and "FAILED" in err and "line 1" in err, err

    code, _, err = await cli(
        "build", str(broken), "-m", "m", "--file", "model.py", "--function", "f", "--replicas", "2"
    )
    assert code == 2 and "--deploy" in err

    code, _, err = await cli("deploy", "m", "--build", "1", "--memory", "lots")
    assert code == 2 and "memory" in err

    code, _, err = await cli("deploy", "m", "--build", "1")
    assert code == 1 and "FAILED_PRECONDITION" in err  # build 1 failed: nothing to deploy

    code, _, err = await cli("--server", "127.0.0.1:1", "models", "list")
    assert code == 3 and "cannot reach" in err


@pytest.mark.slow
async def test_a_canary_a_split_promote_and_abort_through_the_cli(cli: Cli, project: str) -> None:
    await cli("models", "create", "iris")
    for folder, function, deploy in (
        ("iris-v1", "predict", ["--deploy"]),
        ("iris-v2", "classify", []),
    ):
        code, _, err = await cli(
            "build", str(EXAMPLES / folder), "--model", "iris", "--file", "model.py",
            "--function", function, "-q", *deploy,
        )  # fmt: skip
        assert code == 0, err

    # A canary that no figures ever reach waits; promote ends it at once.
    code, out, err = await cli(
        "deploy", "iris", "--build", "2", "--canary", "10,50", "--bake", "10m",
        "--max-error-rate", "1%", "--max-p99", "250ms", "--wait", "0",
    )  # fmt: skip
    code, out, _ = await cli("models", "get", "iris", "-o", "json")
    model = json.loads(out)
    assert model["state"] == "DEPLOYING" and model["traffic"]["candidate"].endswith("/2")

    async def baking() -> dict[str, Any]:
        _, out, _ = await cli("operations", "get", model["running_operation"], "-o", "json")
        rollout: dict[str, Any] = json.loads(out)["rollout"]
        assert rollout["phase"] == "BAKING", rollout
        return rollout

    rollout = await eventually("the first step", baking)
    gates = rollout["strategy"]["gates"]
    assert gates["max_error_rate"] == 0.01 and gates["max_p99_ms"] == 250
    code, out, err = await cli("promote", "iris")
    assert code == 0 and "DEPLOYED" in out, err
    code, out, _ = await cli("deployments", "get", "iris", "2", "-o", "json")
    assert json.loads(out)["build"].endswith("/builds/2")

    # A split by hand, shown, then ended; an abort with nothing running says so.
    code, out, err = await cli("traffic", "iris", "2=80", "1=20", "--sticky-header", "X-User")
    assert code == 0, err
    code, out, _ = await cli("traffic", "iris")
    assert "builds/1" in out and "20%" in out and "sticky by X-User" in out
    code, out, _ = await cli("traffic", "iris", "-o", "json")
    split = json.loads(out)
    assert split["percent"] == 20 and split["candidate_build"].endswith("/builds/1")
    assert split["sticky_header"] == "X-User"
    code, out, err = await cli("traffic", "iris", "2=100")
    assert code == 0, err
    code, out, _ = await cli("traffic", "iris")
    assert "no split" in out
    code, _, err = await cli("abort", "iris")
    assert code == 2 and "no operation running" in err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--canary", "10,x"], "--canary"),
        (["--canary", "10", "--max-error-rate", "lots"], "--max-error-rate"),
        (["--canary", "10", "--max-p99", "fast"], "--max-p99"),
        (["--canary", "10", "--bake", "soon"], "--bake"),
        (["--canary", "10", "--shadow", "5"], "choose one"),
    ],
)
async def test_bad_rollout_flags_are_usage_errors(cli: Cli, flags: list[str], says: str) -> None:
    await cli("models", "create", "m")
    code, _, err = await cli("deploy", "m", "--build", "1", *flags)
    assert code == 2 and says in err, err


async def test_bad_weights_are_usage_errors(cli: Cli) -> None:
    await cli("models", "create", "m")
    code, _, err = await cli("traffic", "m", "1:90")
    assert code == 2 and "BUILD=PERCENT" in err
