"""`modelctl` and capacity: autoscaling flags, --dry-run plans, the cluster's room
(the fake cluster: one node of 8 CPUs, 2 GPUs, 16 GiB) and --wait-for-capacity."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.commands import EXIT_NO_ROOM
from tests.helpers import eventually
from tests.helpers.api import MODEL_V1
from tests.integration.conftest import Cli


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_V1)
    return folder


async def _deployed(cli: Cli, code_dir: Path, *flags: str) -> None:
    """Model ``m`` with build 1 deployed with ``flags``."""
    code, _, err = await cli("models", "create", "m")
    assert code == 0, err
    code, out, err = await cli(
        "build", str(code_dir), "-m", "m", "--file", "model.py", "--function", "predict",
        "-q", "--deploy", *flags,
    )  # fmt: skip
    assert code == 0 and "DEPLOYED" in out, err


async def _json(cli: Cli, *argv: str) -> Any:
    code, out, err = await cli(*argv, "-o", "json")
    assert code == 0, err
    return json.loads(out)


async def test_autoscaling_flags_deploy_and_show(cli: Cli, code_dir: Path) -> None:
    await _deployed(
        cli, code_dir, "--min-replicas", "1", "--max-replicas", "3",
        "--target-ongoing-requests", "4", "--upscale-delay", "10s", "--downscale-delay", "2m",
    )  # fmt: skip
    dep = await _json(cli, "deployments", "get", "m", "1")
    assert dep["resources"]["replicas"] == 1  # none given: it starts with max(1, min)
    assert dep["resources"]["autoscaling"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4.0,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 120.0,
    }
    code, out, _ = await cli("deployments", "get", "m", "1")
    assert "1-3x autoscaling" in out
    assert "autoscaling: 1 to 3 replicas, target 4 requests in flight per replica" in out
    assert "upscale delay 10s, downscale delay 2m, starts with 1" in out

    async def scaled() -> str:
        _, out, _ = await cli("models", "get", "m")
        assert "replicas: 1 wanted, 1 running (autoscaling)" in out, out
        return out

    out = await eventually("the model's scale", scaled)
    assert re.search(r"last scale: \d+ -> 1 at [0-9:]+: deployment 1: autoscaling 1-3", out), out
    code, out, _ = await cli("models", "list")
    assert "REPLICAS" in out and "1/1 auto" in out

    # Only --cpus: the autoscaling is kept; --no-autoscaling ends it.
    code, _, err = await cli("deploy", "m", "--build", "1", "--cpus", "0.5")
    assert code == 0, err
    dep = await _json(cli, "deployments", "get", "m", "2")
    assert dep["resources"]["autoscaling"]["max_replicas"] == 3 and dep["resources"]["cpus"] == 0.5
    code, _, err = await cli("deploy", "m", "--build", "1", "--no-autoscaling")
    assert code == 0, err
    dep = await _json(cli, "deployments", "get", "m", "3")
    assert dep["resources"]["autoscaling"] is None and dep["resources"]["replicas"] == 1


async def test_dry_runs_show_the_plan_and_change_nothing(cli: Cli, code_dir: Path) -> None:
    await _deployed(cli, code_dir, "--replicas", "2")
    model = await _json(cli, "models", "get", "m")
    deployments = await _json(cli, "deployments", "list", "m")
    operations = await _json(cli, "operations", "list", "m")

    code, out, err = await cli("deploy", "m", "--build", "1", "--replicas", "3", "--dry-run")
    assert code == 0, err
    assert "change: IN_PLACE" in out and "  resources.replicas: 2 -> 3" in out
    assert "replicas: 2 kept, 0 replaced, 0 removed, 1 added, 3 after" in out
    assert "capacity: fits" in out and "fake-node" in out

    code, out, err = await cli(
        "deploy", "m", "--build", "1", "--gpus", "1", "--env", "A=b", "--dry-run"
    )
    assert code == 0, err
    assert "change: ROLLING" in out
    assert "  resources.gpus: 0 -> 1" in out and "  environment[A]: (unset) -> b" in out
    assert "0 kept, 2 replaced" in out and "per replica: 0 CPU, 1 GPU" in out
    plan = await _json(cli, "deploy", "m", "--build", "1", "--gpus", "1", "--dry-run")
    assert plan["change_class"] == "ROLLING" and plan["fit"]["fits"] is True

    # A build with --deploy --dry-run: the plan of the deploy; nothing is built.
    code, out, err = await cli(
        "build", str(code_dir), "-m", "m", "--file", "model.py", "--function", "predict",
        "--deploy", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    assert "change: REBUILD" in out and "build: builds/1 -> a new build from source" in out
    assert len(await _json(cli, "builds", "list", "m")) == 1

    code, out, err = await cli("restart", "m", "--dry-run")  # no --yes: nothing to confirm
    assert code == 0, err
    assert "change: RESTART" in out and "  restart_generation: 0 -> 1" in out
    assert "0 kept, 2 replaced" in out

    code, out, err = await cli("stop", "m", "--dry-run")
    assert code == 0, err
    assert "change: STOP" in out and "2 removed, 0 added, 0 after" in out

    assert await _json(cli, "deployments", "list", "m") == deployments
    assert await _json(cli, "operations", "list", "m") == operations
    now = await _json(cli, "models", "get", "m")
    assert now["active_deployment"] == model["active_deployment"]
    assert now["state"] == "DEPLOYED" and not now["running_operation"]


async def test_a_change_with_no_room_is_refused_unless_it_waits(cli: Cli, code_dir: Path) -> None:
    await _deployed(cli, code_dir)

    code, out, err = await cli("deploy", "m", "--build", "1", "--gpus", "4", "--dry-run")
    assert code == EXIT_NO_ROOM == 4, err
    assert "change: ROLLING" in out and "  resources.gpus: 0 -> 4" in out
    assert "capacity: DOES NOT FIT: 1 of 1 new replicas (0 CPU, 4 GPU each) fit on no node" in out
    assert "per replica: 0 CPU, 4 GPU; 0 of 1 new replica placed" in out
    node = next(line for line in out.splitlines() if line.startswith("fake-node"))
    assert node.split()[1:3] == ["8/8", "2/2"], node  # CPU and GPU free/total

    code, out, err = await cli(
        "build", str(code_dir), "-m", "m", "--file", "model.py", "--function", "predict",
        "--deploy", "--gpus", "4", "--dry-run",
    )  # fmt: skip
    assert code == EXIT_NO_ROOM and "change: REBUILD" in out and "DOES NOT FIT" in out, err

    code, out, err = await cli("deploy", "m", "--build", "1", "--gpus", "4")
    assert code == 1 and not out
    assert "FAILED_PRECONDITION" in err and "[INSUFFICIENT_CAPACITY]" in err
    assert "the cluster has no room for this change: 1 of 1 new replicas" in err
    assert "(0 CPU, 4 GPU each)" in err and "free now: fake-node 8/8 CPU 2/2 GPU" in err
    assert "--wait-for-capacity starts it anyway" in err
    assert len(await _json(cli, "deployments", "list", "m")) == 1

    code, _, err = await cli(
        "deploy", "m", "--build", "1", "--gpus", "4", "--wait-for-capacity", "--wait", "0"
    )  # it goes on waiting for room: the CLI stops following at once
    assert "CREATE_DEPLOYMENT" in err and "INSUFFICIENT_CAPACITY" not in err, err
    kinds = [o["kind"] for o in await _json(cli, "operations", "list", "m")]
    assert kinds == ["CREATE_DEPLOYMENT", "CREATE_BUILD"]
    dep = await _json(cli, "deployments", "get", "m", "2")
    assert dep["resources"]["gpus"] == 4


async def test_bad_autoscaling_input(cli: Cli, code_dir: Path) -> None:
    await cli("models", "create", "m")
    code, _, err = await cli(
        "deploy", "m", "--build", "1", "--min-replicas", "3", "--max-replicas", "2"
    )
    assert code == 1 and "INVALID_ARGUMENT" in err, err
    assert "resources.autoscaling.max_replicas: must be between max(1, min_replicas)" in err

    code, _, err = await cli("deploy", "m", "--build", "1", "--min-replicas", "2")
    assert code == 2 and "needs --max-replicas" in err
    code, _, err = await cli(
        "deploy", "m", "--build", "1", "--max-replicas", "2", "--upscale-delay", "soon"
    )
    assert code == 2 and "--upscale-delay 'soon'" in err
    code, _, err = await cli(
        "deploy", "m", "--build", "1", "--max-replicas", "2", "--no-autoscaling"
    )
    assert code == 2 and "choose one" in err
    for flags, says in ((["--max-replicas", "3"], "add --deploy"), (["--dry-run"], "add --deploy")):
        code, _, err = await cli(
            "build", str(code_dir), "-m", "m", "--file", "model.py", "--function", "f", *flags
        )
        assert code == 2 and says in err, err
