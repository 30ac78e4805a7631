"""The soak benchmark never rots: `bench/soak.py --smoke` makes random changes under load
on a Ray cluster of its own, kills the server and a replica once each, and its figures
are what a user would check first.

Only what the run did is asserted here (kills happened, nothing was lost, stuck, missed
or failed for another cause). Like every test with a Ray of its own, tests/ray/conftest.py
runs it before the session's cluster starts. Past its deadline it is stopped with SIGTERM,
so that it stops its cluster and server too."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.bench_smoke import smoke_figures

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    return smoke_figures("soak", deadline_s=330)


def test_a_smoke_run_on_this_machine(figures: dict[str, Any]) -> None:
    assert figures["smoke"] is True
    assert figures["machine"]["cores"] >= 1 and figures["machine"]["ray"]
    assert figures["leftover_ray_processes"] == 0


def test_the_server_and_a_replica_were_killed_during_changes(figures: dict[str, Any]) -> None:
    assert figures["kills"]["server"] >= 1
    assert figures["kills"]["replica"] >= 1
    assert sum(figures["changes"].values()) >= 3, figures["changes"]
    # The server came back: one RSS sample per incarnation, each with its end.
    assert len(figures["rss"]) == figures["kills"]["server"] + 1
    assert all(r["start_mb"] > 0 and r["end_mb"] > 0 for r in figures["rss"])


def test_no_operation_was_lost_or_stuck(figures: dict[str, Any]) -> None:
    ops = figures["ops"]
    assert ops["accepted"] >= 3
    assert ops["lost"] == 0, ops["lost_names"]
    assert ops["stuck"] == 0, ops["stuck_names"]


def test_every_watcher_saw_every_event_once(figures: dict[str, Any]) -> None:
    watch = figures["watch"]
    assert watch["streams"] == 50 and watch["incomplete"] == 0
    assert watch["gaps"] == 0 and watch["repeats"] == 0 and watch["extra"] == 0
    assert watch["reference_events"] > 0 and watch["reference_in_order"] is True
    assert watch["reference_holes"] == 0
    assert watch["streams_without_events"] == 0 and watch["events_min"] > 0
    assert watch["identical_to_reference"] == watch["streams"]
    assert watch["distinct_lists"] == 1


def test_only_the_killed_replicas_requests_failed(figures: dict[str, Any]) -> None:
    requests = figures["requests"]
    assert requests["sent"] > 0
    assert requests["failed"]["other"] == 0, requests["examples"]
