"""The benchmarks never rot: each runs in its smoke mode and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT


def smoke(script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def result(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "bench" / "results" / name).read_text())
    return loaded


def test_watchers_benchmark_smoke() -> None:
    done = smoke("watchers.py", timeout=120)
    assert "change -> delivery p99 ms" in done.stdout
    figures = result("watchers.json")
    assert figures["watchers"] == 50
    assert figures["events_delivered"] >= 50 * 2, "each watcher gets each change's events"


def test_builds_benchmark_smoke() -> None:
    done = smoke("builds.py")
    assert "cache hit p50 s" in done.stdout
    figures = result("builds.json")
    assert figures["rebuilds"] == 3, "every rebuild was checked to be a cache hit"
    assert figures["hit_p50_s"] < figures["cold_build_s"]


def test_rpc_benchmark_smoke() -> None:
    done = smoke("rpc.py")
    assert "ours/s" in done.stdout
    points = result("rpc.json")["points"]
    assert [p["callers"] for p in points] == [1, 10, 100]
    assert all(p["ours"]["calls_per_s"] > 0 and p["bare"]["calls_per_s"] > 0 for p in points)


def test_records_benchmark_smoke() -> None:
    done = smoke("records.py")
    assert "ListDeployments (big model)" in done.stdout
    figures = result("records.json")
    assert figures["deployments"] == 200 * 9 + 1000
    assert figures["list_deployments_big"]["records"] == 1000, "paging saw every record once"
