"""The benchmarks without Ray never rot: bench/run.py --smoke runs them at tiny sizes, in
one table, each with its figures beside its anchor's (those on Ray: tests/ray/
test_bench_smoke.py; the console's: test_bench_console_smoke.py). One test, so that the
run is made once: a module fixture would run again on each xdist worker that takes one of
the module's tests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.helpers import ROOT
from tests.helpers.bench_smoke import smoke_table

RESULTS = ROOT / "bench" / "results"
SMOKED = ("rpc", "pgreads", "operations", "watchers", "records", "builds", "artifacts")
pytestmark = pytest.mark.slow  # seven benchmarks' servers and databases: a minute


def result(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return loaded


def test_a_smoke_run_of_each_in_one_table() -> None:
    done = smoke_table(SMOKED, 600)
    for name in SMOKED:
        assert f"| {name} |" in done.stdout, name
    a_build_fetched_by_a_new_node_beside_one_copy()
    rpc_against_a_bare_grpc_server()
    pgreads_on_both_databases()
    concurrent_operations_each_job_runs_once()
    watchers_get_every_event()
    records_pages_see_every_record()
    builds_rebuilds_are_cache_hits()


def a_build_fetched_by_a_new_node_beside_one_copy() -> None:
    figures = result("artifacts")
    assert figures["smoke"] is True and figures["mib"] == 32
    assert figures["first_fetch_s"] > 0 and figures["copy_s"] > 0 and figures["pack_s"] > 0
    assert figures["again_s"] < figures["first_fetch_s"], "a second replica uses the cache"
    assert figures["database"] == "sqlite", "the embedded default, unless --database-url"
    assert figures["db_put_s"] > 0 and figures["db_first_use_s"] > 0


def rpc_against_a_bare_grpc_server() -> None:
    figures = result("rpc")
    assert [p["callers"] for p in figures["points"]] == [1, 10, 100]
    assert all(
        p["ours"]["calls_per_s"] > 0 and p["bare"]["calls_per_s"] > 0 for p in figures["points"]
    )
    assert figures["paced"]["ours"]["p99_ms"] > 0


def pgreads_on_both_databases() -> None:
    figures = result("pgreads")
    assert [(p["method"], p["callers"]) for p in figures["points"]] == [
        ("GetModel", 1),
        ("GetModel", 10),
        ("GetModel", 100),
        ("ListModels", 10),
    ]
    for point in figures["points"]:
        for side in ("postgresql", "sqlite"):
            assert point[side]["calls_per_s"] > 0, (point["method"], side)


def concurrent_operations_each_job_runs_once() -> None:
    figures = result("operations")
    assert figures["models"] == 10 and figures["servers"] == 2
    assert figures["jobs"] >= 10, "each change made its apply job"
    assert figures["jobs_run_twice"] == 0 and figures["jobs_unfinished"] == 0
    assert figures["operations_per_s"] > 0


def watchers_get_every_event() -> None:
    figures = result("watchers")
    assert figures["watchers"] == 50 and figures["processes"] == 2
    assert set(figures["kinds"]) == {"model", "models"}, "WatchModel and WatchModels"
    for kind, sides in figures["kinds"].items():
        for side in ("ours", "bare"):
            got = sides[side]
            assert got["events_per_watcher"] >= 2 * 2, "each change makes several events"
            assert got["watchers_complete"] == 50, (kind, side)
            assert got["events_delivered"] == 50 * got["events_per_watcher"], (kind, side)
            # CPU per event is what the watchers add to the changes' own (clock ticks of
            # 10 ms, a smoke of 50 watchers beside other tests: it may round to 0).
            assert got["server_cpu_s"] > 0 and got["server_cpu_us_per_event"] >= 0, (kind, side)


def records_pages_see_every_record() -> None:
    figures = result("records")
    assert figures["deployments"] == 200 * 9 + 1000
    assert figures["list_deployments_big"]["records"] == 1000, "paging saw every record once"


def builds_rebuilds_are_cache_hits() -> None:
    figures = result("builds")
    assert figures["rebuilds"] == 3, "every rebuild was checked to be a cache hit"
    assert figures["hit_p50_s"] < figures["cold_build_s"]
