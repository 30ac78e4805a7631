"""The benchmarks never rot: each runs in its smoke mode and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_watchers_benchmark_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "watchers.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "change -> delivery p99 ms" in done.stdout
    result = json.loads((ROOT / "bench" / "results" / "watchers.json").read_text())
    assert result["watchers"] == 50
    assert result["events_delivered"] >= 50 * 2, "each watcher gets each change's events"


def test_builds_benchmark_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "builds.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache hit p50 s" in done.stdout
    result = json.loads((ROOT / "bench" / "results" / "builds.json").read_text())
    assert result["rebuilds"] == 3, "every rebuild was checked to be a cache hit"
    assert result["hit_p50_s"] < result["cold_build_s"]
