"""The benchmarks never rot: `make bench-smoke` (bench/run.py --smoke) runs every one of
them at tiny sizes, and each reports its figures beside its anchor's. Those on Ray are
run here; those without (the fake backend, databases, files) in
tests/integration/test_bench_smoke.py, beside the other tests without Ray.

bench/serve.py starts a Ray cluster of its own: tests/ray/conftest.py runs this module
(as every test with a Ray of its own) before the session's cluster starts, so two
clusters never share the 2 cores."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.helpers import ROOT
from tests.helpers.bench_smoke import smoke_table

RESULTS = ROOT / "bench" / "results"
OUR_CHANGES = ("scale", "resources", "new_build", "rollback", "restart")
SMOKED = ("serve", "models", "signals", "big_build")  # those on Ray; the rest: tests/integration
pytestmark = pytest.mark.ray


def result(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def smoke() -> subprocess.CompletedProcess[str]:
    # bench/traffic.py's smoke is tests/ray/test_bench_traffic_smoke.py's (a deadline of
    # its own): the rest on Ray in one table.
    return smoke_table(SMOKED, 900)


def test_one_table_with_every_benchmark(smoke: subprocess.CompletedProcess[str]) -> None:
    summary = result("summary")
    assert summary["smoke"] is True
    assert {r["benchmark"] for r in summary["rows"]} == set(SMOKED)
    figures = [r for r in summary["rows"] if r["target"] != "0"]  # not the failure counts
    assert figures and all(r["ours"] > 0 for r in figures), summary["rows"]
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["ray"]


def test_signals_beside_the_same_replicas_without(
    smoke: subprocess.CompletedProcess[str],
) -> None:
    figures = result("signals")
    assert figures["smoke"] is True and figures["rounds"] == 1
    for side in ("signals", "plain"):
        assert figures["sides"][side]["requests_per_s"] > 0, side
        assert figures["sides"][side]["p50_ms"] > 0, side
    check = figures["signals_check"]
    assert check["sent"] > 0 and check["counted"] == check["sent"], "signals counted every request"
    assert figures["leftover_ray_processes"] == 0


def test_a_build_made_and_deployed_on_a_node_without_the_disk(
    smoke: subprocess.CompletedProcess[str],
) -> None:
    figures = result("big_build")
    assert figures["smoke"] is True and figures["mib"] == 32
    for key in ("big_build_s", "big_deploy_s", "small_deploy_s", "copy_once_s"):
        assert figures[key] > 0, key


def test_models_grow_on_one_cluster(smoke: subprocess.CompletedProcess[str]) -> None:
    figures = result("models")
    assert [p["models"] for p in figures["points"]] == [1, 3]
    assert [p["added"] for p in figures["points"]] == [1, 2], "2 brought up at once"
    for point in figures["points"]:
        assert point["up_s"] > 0 and point["anchor_up_s"] > 0, point
        assert point["up_jobs"].get("apply", 0) >= 1, point["up_jobs"]
        assert point["up_jobs_run_twice"] == 0 and point["up_jobs_unfinished"] == 0, point
        assert point["scale_s"] > 0 and point["new_build_s"] > 0, point
        assert 0 < point["idle_cpu_server_pct"] <= point["idle_cpu_pct"], point
        assert point["anchor_scale_s"] > 0, "raw Serve ran the same sizes"
        said = [e["what"] for e in point["scale_timeline"]]
        assert said[-1] == "GetModel returned: DEPLOYED", said
        assert any(w.startswith("reconciler: look: model DEPLOYING") for w in said), said
        anchor = [e["what"] for e in point["anchor_scale_timeline"]]
        assert anchor[0] == "config handed to Serve" and "2 RUNNING" in anchor[-1], anchor
    assert figures["leftover_ray_processes"] == 0


def test_serve_beside_raw_serve(smoke: subprocess.CompletedProcess[str]) -> None:
    figures = result("serve")
    assert figures["smoke"] is True and figures["rounds"] == 1
    for side in ("ours", "anchor"):
        for key in ("deploy_s", "scale_s", "restart_s"):
            assert figures["medians"][side][key] > 0, (side, key)
    assert figures["scale_kept_replica"] is True, "scaling in place restarted a replica"
    assert figures["restart_replaced_all"] is True
    assert figures["leftover_ray_processes"] == 0


def test_serve_timeline_of_a_change(smoke: subprocess.CompletedProcess[str]) -> None:
    """The worst round's timeline has the client's marks and the server's own steps in it:
    the job, the apply's, and the reconciler's looks at the changing model."""
    events = result("serve")["timelines"]["deploy_s"]["worst"]["events"]
    said = [e["what"] for e in events]
    # The server may start the job before the client has the call's reply: its first
    # line can come before the client's mark.
    assert "CREATE_DEPLOYMENT returned its operation" in said[:3], said
    assert said[-1] == "GetModel returned: DEPLOYED", said
    assert any(w.startswith("apply_job: ") or w.startswith("dispatcher: job ") for w in said)
    assert any(w.startswith("ray_backend: apply: ") for w in said), said
    looks = [w for w in said if w.startswith("reconciler: look: model DEPLOYING")]
    assert looks and "RUNNING, replicas 1 RUNNING" in looks[-1], said
    assert [e["ms"] for e in events] == sorted(e["ms"] for e in events)


def test_no_request_fails_during_any_change(smoke: subprocess.CompletedProcess[str]) -> None:
    failures = result("serve")["failures"]
    ours = failures["ours"]
    assert tuple(ours) == OUR_CHANGES
    for change, counts in ours.items():
        assert counts["sent"] > 0, change
        assert counts["failed"] == 0, (change, counts["examples"])
    assert ours["new_build"]["versions"][-1] == 2, "the new build answered"
    assert 1 in ours["rollback"]["versions"], "the rolled-back build answered"
    assert set(failures["anchor"]) == {"scale", "rolling"}
