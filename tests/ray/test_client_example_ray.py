"""examples/python-client/workflow.py, as its docs say to run it, against a control plane
on the session's real Ray cluster: the example a newcomer copies keeps working."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import EXAMPLES
from tests.helpers.ray_cluster import ray_server
from workers.backend import Backend

pytestmark = pytest.mark.ray


async def test_the_python_client_example_runs_the_whole_workflow(
    ray_backend: Backend, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with ray_server(ray_backend, data, metrics_port=0, insecure_no_auth=False) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "python-client" / "workflow.py"),
            "--server",
            server.grpc_address,
            "--token-file",
            str(data / "admin.token"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 240)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://{server.metrics_address}/metrics")).text
    out = stdout.decode()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "bad request -> INVALID_ARGUMENT (('model_id'," in out, out
    assert "create_build: deployed (done)" in out, out
    assert "-> 200 {'classes': ['setosa'], 'version': 1}" in out, out
    assert "scaled: DEPLOYED with 3 replicas" in out, out
    assert "stopped: STOPPED" in out, out
    assert "UPDATED Model DEPLOYING" in out, "the watch followed the changes"
    # What an operator's dashboard shows after it, from real Serve (docs/operators.md).
    figures = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    for kind in ("CREATE_BUILD", "CREATE_DEPLOYMENT", "RESTART_MODEL", "STOP_MODEL"):
        key = ("modelctl_operations_total", (("kind", kind), ("outcome", "succeeded")))
        assert figures.get(key) == 1, (kind, metrics)
    model = "projects/default/models/iris-from-python"
    assert figures[("modelctl_model_replicas_desired", (("model", model),))] == 0, "stopped"
    assert figures[("modelctl_model_replicas_running", (("model", model),))] == 0
    assert figures[("modelctl_models", (("state", "STOPPED"),))] == 1
