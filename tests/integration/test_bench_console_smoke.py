"""The console's benchmark never rots: bench/console.py at its smoke size (50 models, 10 live
pages), as `make bench-smoke` runs it, with the figures it reports beside its anchors. It
needs no Ray (`modelctl serve --backend fake`), so it runs here and not in tests/ray."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from typing import Any

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # two server processes and 10 sessions: seconds


def test_a_smoke_run_of_the_console_benchmark() -> None:
    """One test, so that the run is made once: a module fixture would run again on each
    xdist worker that takes one of the module's tests."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "console.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Models page p95 ms" in done.stdout and "target" in done.stdout
    figures: dict[str, Any] = json.loads((ROOT / "bench" / "results" / "console.json").read_text())
    the_pages_are_timed_beside_the_api_reads_they_make(figures)
    every_live_page_and_every_watcher_sees_the_change(figures)
    one_row_per_figure_for_the_table(figures)


def the_pages_are_timed_beside_the_api_reads_they_make(figures: dict[str, Any]) -> None:
    assert figures["smoke"] is True and figures["models"] == 50
    render = figures["render"]
    assert render["models_status"] == 200
    assert render["models_rows"] == 50, "the first page of the Models page is full"
    assert render["overview_status"] in (200, 404), "404 only while the page is unwritten"
    for key in ("models_page", "models_reads", "overview_page", "overview_reads"):
        assert render[key]["n"] == figures["requests"] and render[key]["p95_ms"] > 0, key


def every_live_page_and_every_watcher_sees_the_change(figures: dict[str, Any]) -> None:
    live, anchor = figures["live"], figures["anchor_live"]
    assert live["pages"] == 10 and live["reached"] == 10
    assert anchor["watchers"] == 10 and anchor["reached"] == 10
    for side in (live, anchor):
        assert side["rss_open_mb"] >= side["rss_before_mb"] > 0
        assert 0 < side["delivery_p50_s"] <= side["delivery_max_s"]
    assert live["updates_per_page"] >= 1


def one_row_per_figure_for_the_table(figures: dict[str, Any]) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        bench: Any = importlib.import_module("console")  # as bench/run.py imports it
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = bench.summary(figures)
    assert len(rows) == 4
    assert all(r.ours > 0 and r.anchor and r.target for r in rows), rows
