"""The traffic benchmark never rots: `bench/traffic.py --smoke` runs a split and two
rollouts on a Ray cluster of its own, and its figures are what a user would check first.

Only what the run did is asserted here (who answered, what failed); its timing targets
live in the benchmark's table. Like every test with a Ray of its own, tests/ray/conftest.py
runs it before the session's cluster starts. Past its deadline it is stopped with SIGTERM,
so that it stops its cluster too."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.bench_smoke import smoke_figures

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    return smoke_figures("traffic")


def test_a_smoke_run_on_this_machine(figures: dict[str, Any]) -> None:
    assert figures["smoke"] is True
    assert figures["machine"]["cores"] >= 1 and figures["machine"]["ray"]
    assert figures["leftover_ray_processes"] == 0


def test_both_models_answered_without_a_failure(figures: dict[str, Any]) -> None:
    hop = figures["hop"]
    plain, split = hop["plain"], hop["split"]
    for side in (plain, split):
        assert side["sent"] > 0 and side["failed"] == 0, side["examples"]
        assert side["counted"] > 0 and side["p50_ms"] > 0
    # The model that does not split: every answer from its one build.
    assert hop["plain_build"].endswith("/builds/1")
    assert plain["builds"] == {"1": plain["sent"]}
    assert plain["counted"] == plain["sent"]


def test_the_split_forwards_to_build_2(figures: dict[str, Any]) -> None:
    hop = figures["hop"]
    split = hop["split"]
    assert hop["split_percent"] == 99
    assert hop["stable_build"].endswith("/builds/1")
    assert hop["candidate_build"].endswith("/builds/2")
    # Counted: only the answers build 2 gave (forwarded), and nearly all of them were.
    assert set(split["builds"]) <= {"1", "2"}, split["builds"]
    assert split["forwarded"] == split["builds"]["2"] == split["counted"]
    assert split["answered_by_stable"] == split["builds"].get("1", 0)
    assert split["forwarded"] >= 0.9 * split["sent"], split["builds"]


def test_no_request_failed_during_either_rollout(figures: dict[str, Any]) -> None:
    rollouts = figures["rollouts"]
    immediate, canary = rollouts["immediate"], rollouts["canary"]
    assert canary["steps"] == [50, 100]
    for name, r in (("immediate", immediate), ("canary", canary)):
        assert r["sent"] > 0, name
        assert r["failed"] == 0, (name, r["examples"])
        assert r["seconds"] > 0, name
        assert r["last_answers_from_new_build"] is True, (name, r["builds"])
    assert immediate["to_build"].endswith("/builds/2")
    assert set(immediate["builds"]) <= {"1", "2"} and immediate["builds"]["2"] > 0
    assert canary["to_build"].endswith("/builds/3")
    # Both builds answered while the canary stepped.
    assert set(canary["builds"]) == {"2", "3"}, canary["builds"]
