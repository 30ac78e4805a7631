"""The autoscaling benchmark never rots: `bench/autoscale.py --smoke` steps the load on an
autoscaled model and cold-starts it from zero, through the control plane and on raw Serve
with the same config, on a Ray cluster of its own.

Only what the run did is asserted here (both sides got the same config, new replicas
answered after the load step, each cold start answered 200, the figures are there); its
timing targets live in the benchmark's table. Like every test with a Ray of its own,
tests/ray/conftest.py runs it before the session's cluster starts. Past its deadline it
is stopped with SIGTERM, so that it stops its cluster too."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.bench_smoke import smoke_figures

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
SIDES = ("ours", "raw")


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    return smoke_figures("autoscale")


def test_a_smoke_run_on_this_machine(figures: dict[str, Any]) -> None:
    assert figures["smoke"] is True
    assert figures["repetitions"] == 1
    assert figures["machine"]["cores"] >= 1 and figures["machine"]["ray"]
    assert figures["leftover_ray_processes"] == 0


def test_both_sides_ran_with_the_same_config(figures: dict[str, Any]) -> None:
    # The run itself fails unless Serve holds the same config for both deployments.
    for phase, min_replicas in (("load_step", 1), ("cold_start", 0)):
        config = figures["configs"][phase]
        autoscaling = config["autoscaling_config"]
        assert {k: v for k, v in autoscaling.items() if k != "initial_replicas"} == {
            "min_replicas": min_replicas,
            "max_replicas": 3,
            "target_ongoing_requests": 1.0,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 2.0,
        }
        assert config["num_cpus"] == 0.1
    # A new application starts with its one replica.
    assert figures["configs"]["load_step"]["autoscaling_config"]["initial_replicas"] == 1


def test_new_replicas_answered_after_the_load_step(figures: dict[str, Any]) -> None:
    for side in SIDES:
        (step,) = figures["load_step"][side]
        assert len(step["replicas_before"]) == 1, (side, step)
        assert step["new_replicas_answered"] >= 1, (side, step)
        assert step["replicas_answered"] <= 3, (side, step)
        assert 0 < step["first_new_replica_s"] <= step["seconds"], (side, step)
        assert step["sent"] > 0 and step["failed"] == 0, (side, step["failed_examples"])
        # Serve raised its target before a new replica answered. (When Serve listed the
        # new replica RUNNING is polled every 0.25 s: a step that ends within a poll of
        # its first new answer may not have seen it, so it is recorded, not asserted.)
        assert 0 < step["serve_target_up_s"] <= step["first_new_replica_s"], (side, step)


def test_each_cold_start_answered_200(figures: dict[str, Any]) -> None:
    for side in SIDES:
        (cold,) = figures["cold_start"][side]
        assert cold["status"] == 200, (side, cold)
        assert cold["seconds"] > 0 and cold["replica"], (side, cold)
    # Ours was measured only once GetModel said 0 replicas wanted and running.
    (ours,) = figures["cold_start"]["ours"]
    assert ours["model_state_at_zero"] == "DEPLOYED"


def test_the_figures_and_their_ratios(figures: dict[str, Any]) -> None:
    for key in ("load_step_s", "cold_start_s"):
        f = figures["figures"][key]
        assert f["ours"] > 0 and f["raw"] > 0, (key, f)
        assert f["ratio"] == pytest.approx(f["ours"] / f["raw"])
        assert f["target"] == 1.10 and isinstance(f["met"], bool)
